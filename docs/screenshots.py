"""Retake the README's screenshots of the MLflow UI in headless Chromium (Debian's `chromium` package).

``make screenshots`` (after ``make demo``): serves this project's store with ``mlflow ui`` on a spare loopback port,
finds the newest pipeline run and the newest registered versions, and saves into ``docs/img/``:
runs.png (the runs table, the pipeline run expanded to its five children, with key metrics as columns),
pipeline-run.png (the parent run: child runs, child.* tags, copied metrics), model.png (zh-align-merged: versions,
aliases, tags) and model-version.png (the newest merged version's lineage tags).
Chromium is driven over its DevTools pipe (``--remote-debugging-pipe``, standard library only): the script opens the
"Model training" view, closes the assistant panel, expands the pipeline run, waits, then captures. Install the browser
once with ``sudo apt-get install chromium``. Nothing here is imported by the package or the tests.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import select
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                  "--disable-quic", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--mute-audio"]


def spare_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"error: the MLflow UI did not answer at {url} within {seconds:.0f} s")


def targets(uri: str, experiment: str, model: str) -> tuple[dict[str, str], str, str]:
    """(screenshot name → the UI route it shows, the experiment id, the newest pipeline run id)."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"error: no experiment {experiment!r} in {uri}; run `make demo` first")
    runs = client.search_runs([exp.experiment_id], "tags.stage = 'pipeline' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise SystemExit(f"error: no FINISHED pipeline run in {experiment!r}; run `make demo` first")
    versions = client.search_model_versions(f"name = '{model}'")
    if not versions:
        raise SystemExit(f"error: no registered model {model!r}; run `make demo` first")
    newest = max(versions, key=lambda v: int(v.version))
    ml = "?workflowType=machine_learning"
    shots = {"runs": f"#/experiments/{exp.experiment_id}/runs{ml}",
             "pipeline-run": f"#/experiments/{exp.experiment_id}/runs/{runs[0].info.run_id}{ml}",
             "model": f"#/models/{model}{ml}",
             "model-version": f"#/models/{model}/versions/{newest.version}{ml}"}
    return shots, exp.experiment_id, runs[0].info.run_id


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (fd 3 in, fd 4 out, NUL-separated JSON)."""

    def __init__(self, executable: str, size: tuple[int, int]) -> None:
        self.profile = tempfile.mkdtemp(prefix="zh-align-chromium-")
        to_browser, self._in = os.pipe()
        self._out, from_browser = os.pipe()
        flags = " ".join(shlex.quote(f) for f in [executable, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}",
                                                  "--remote-debugging-pipe", "about:blank"])
        self.proc = subprocess.Popen(["bash", "-c", f"exec {flags} 3<&{to_browser} 4>&{from_browser}"],
                                     pass_fds=(to_browser, from_browser), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._id = b"", 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1], deviceScaleFactor=1,
                  mobile=False, session=True)

    def call(self, method: str, session: bool = False, timeout: float = 60, **params: object) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._in, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buffer:
                ready, _, _ = select.select([self._out], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise SystemExit(f"error: chromium did not answer {method} within {timeout:.0f} s")
                self._buffer += os.read(self._out, 1 << 20)
            line, _, self._buffer = self._buffer.partition(b"\0")
            reply = json.loads(line)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise SystemExit(f"error: chromium {method}: {reply['error']}")
                return reply.get("result", {})

    def open(self, url: str, settle_s: float) -> None:
        self.call("Page.navigate", url=url, session=True)
        time.sleep(settle_s)

    def run_js(self, expression: str) -> object:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True, session=True)

    def screenshot(self, out: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png", session=True)["data"]
        out.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except SystemExit:
            self.proc.kill()
        self.proc.wait(timeout=30)
        shutil.rmtree(self.profile, ignore_errors=True)


def ui_state(experiment_id: str, parent_run: str) -> dict[str, str]:
    """localStorage of the MLflow UI: no assistant panel, the "Model training" view, the pipeline run expanded with
    the columns that tell the stages apart."""
    columns = ["tags.`stage`", "tags.`hw`", "metrics.`loss`", "metrics.`evaluate/delta/zh_smoke/acc`",
               "metrics.`export/merge.max_abs_logit_diff`", "attributes.`Models`"]
    page = {"searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": False, "startTime": "ALL",
            "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
            "selectedColumns": columns, "runsExpanded": {parent_run: True}, "runsHiddenMode": "FIRST_10_RUNS"}
    return {"mlflow.assistant.panelOpen_v1": "false", "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
            "mlflow.workflowType_v1": json.dumps("machine_learning"),
            f"MLflowLocalStorage-1.1-ExperimentPage-[\"{experiment_id}\"]-ReactComponentState": json.dumps(page)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    parser.add_argument("--experiment", default=os.environ.get("MLFLOW_EXPERIMENT_NAME", "zh-align"))
    parser.add_argument("--model", default="zh-align-merged")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--size", default="1600,1000", help="window width,height in pixels")
    parser.add_argument("--settle", type=float, default=8.0, help="seconds each page gets to load and render")
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("error: no chromium on PATH; install Debian's package: sudo apt-get install chromium", file=sys.stderr)
        return 2
    shots, experiment_id, parent_run = targets(args.store, args.experiment, args.model)
    port = spare_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", args.store,
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    width, height = (int(x) for x in args.size.split(","))
    browser = None
    try:
        base = f"http://127.0.0.1:{port}/"
        wait_for(base + "health")
        browser = Chromium(chromium, (width, height))
        browser.open(base, args.settle)
        for key, value in ui_state(experiment_id, parent_run).items():
            browser.run_js(f"localStorage.setItem({json.dumps(key)}, {json.dumps(value)})")
        browser.call("Page.reload", session=True)  # the app reads that state when it starts
        time.sleep(args.settle)
        args.out.mkdir(parents=True, exist_ok=True)
        for name, route in shots.items():
            browser.open(base + route, args.settle)
            out = args.out / f"{name}.png"
            browser.screenshot(out)
            print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}  ({route})")
    finally:
        if browser:
            browser.close()
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
