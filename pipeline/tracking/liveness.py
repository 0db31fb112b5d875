"""Runs that tell the truth about their process: who runs them, whether it still does, and what ended them.

Every stage run carries ``pid``, ``pid.started``, ``host``, ``output_dir`` and a ``heartbeat`` (unix time; at the start,
at each logging step, every few minutes from a thread, at the end). When a stage starts it closes, as KILLED with a
``killed_reason`` that says how to go on, the RUNNING runs of the same stage and output folder whose process is gone:
on this host, the pid is not alive or belongs to a later process; on another host, no heartbeat for
:data:`STALE_AFTER_S`. A live run of another process is never touched. A stage that fails before it attaches to the
run that ``mlflow run`` created still leaves ``error`` and ``stage`` tags and its log there (:func:`record_failure`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.core import process
from pipeline.core.secrets import scrub

log = logging.getLogger(__name__)

HEARTBEAT_EVERY_S = 120.0   # the thread's beat; logging steps beat in between
STALE_AFTER_S = 900.0       # a run on another host whose heartbeat is older than this is taken for dead
TERMINAL = ("FINISHED", "FAILED", "KILLED")
MAX_VALUE = 6000            # MLflow's limit for a tag value


def identity(output_dir: str | None) -> dict[str, str]:
    """The tags that say which process runs this and where it writes."""
    return {"pid": str(os.getpid()), "pid.started": f"{process.started():.3f}", "host": process.host(),
            "heartbeat": f"{time.time():.0f}", "output_dir": output_dir or ""}


def how_to_go_on(stage: str, tags: Mapping[str, str], trains: bool) -> str:
    """What the user runs next after a run of ``stage`` was cut short."""
    parent = tags.get("mlflow.parentRunId")
    if parent:
        return f"continue the pipeline with `make pipeline … RESUME={parent}`"
    if trains:
        return f"continue from its newest whole checkpoint with `make {stage} … SET=\"train.resume=auto\"`"
    return f"run `make {stage} …` again"


def beat(client: Any, run_id: str) -> None:
    try:
        client.set_tag(run_id, "heartbeat", f"{time.time():.0f}")
    except Exception as err:  # a heartbeat is never worth failing the stage for
        log.debug("heartbeat not written: %s", err)


class Heartbeat:
    """A daemon thread writing ``heartbeat`` every :data:`HEARTBEAT_EVERY_S` until stopped."""

    def __init__(self, client: Any, run_id: str, every: float = HEARTBEAT_EVERY_S):
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, args=(client, run_id, every), daemon=True,
                                       name="zh-align-heartbeat")
        self.thread.start()

    def _loop(self, client: Any, run_id: str, every: float) -> None:
        while not self.done.wait(every):
            beat(client, run_id)

    def stop(self) -> None:
        self.done.set()


def gone(tags: Mapping[str, str], now: float | None = None) -> str | None:
    """Why the process of a RUNNING run is gone (None: alive, or nothing to judge by)."""
    pid, host = tags.get("pid", ""), tags.get("host", "")
    if not pid.isdigit() or not host:
        return None  # written by no stage of ours (a run `mlflow run` created and nobody attached to yet)
    if host == process.host():
        began = float(tags["pid.started"]) if tags.get("pid.started") else None
        return None if process.alive(int(pid), began) else f"its process {pid} on {host} is gone"
    try:
        age = (now or time.time()) - float(tags.get("heartbeat", ""))
    except ValueError:
        return None
    return f"no heartbeat from {host} for {age / 60:.0f} min" if age > STALE_AFTER_S else None


def sweep(client: Any, experiment_id: str, stage: str, output_dir: str | None, current: str, trains: bool) -> list[str]:
    """Close as KILLED the RUNNING runs of ``stage`` writing to ``output_dir`` whose process is gone; their ids."""
    closed = []
    found = client.search_runs([experiment_id], f"tags.stage = '{stage}' and attributes.status = 'RUNNING'",
                               max_results=500)
    for run in found:
        tags = run.data.tags
        if run.info.run_id == current or tags.get("output_dir", "") != (output_dir or ""):
            continue
        why = gone(tags)
        if why is None:
            continue
        reason = f"{why}; found by the {stage} run {current}; {how_to_go_on(stage, tags, trains)}"
        client.set_tag(run.info.run_id, "killed_reason", reason)
        if "error" not in tags:
            client.set_tag(run.info.run_id, "error", f"killed: {why}")
        last = tags.get("heartbeat", "")
        client.set_terminated(run.info.run_id, "KILLED", end_time=int(float(last) * 1000) if last else None)
        log.warning("run %s (%s) was left RUNNING: %s. Marked KILLED", run.info.run_id, stage, why)
        closed.append(run.info.run_id)
    return closed


def record_failure(client: Any, run_id: str, stage: str, err: BaseException, log_file: Path | None,
                   trains: bool) -> bool:
    """A stage that failed before its run was closed by :func:`pipeline.tracking.runs.start_run` (an error before it
    attached, or a signal): its ``mlflow run`` run gets ``error`` and ``stage`` tags, its log under ``logs/`` and the
    status FAILED (KILLED for a signal). Whether anything was recorded (not when the run was already closed)."""
    try:
        run = client.get_run(run_id)
        if run.info.status in TERMINAL:
            return False
        killed = isinstance(err, process.Interrupted)
        message = scrub(str(err) if killed else f"{type(err).__name__}: {err}")[:MAX_VALUE]
        tags = {**identity(None), "error": message, "stage": stage}
        del tags["output_dir"]
        if killed:
            tags["killed_reason"] = f"{message}; {how_to_go_on(stage, run.data.tags, trains)}"
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        if log_file is not None and log_file.exists():
            with log_file.open("a", encoding="utf-8") as f:
                f.write(f"error: {message}\n")
            client.log_artifact(run_id, str(log_file), "logs")
        client.set_terminated(run_id, "KILLED" if killed else "FAILED")
    except Exception as problem:  # the store itself may be what failed: say so, keep the original error
        log.warning("could not record the failure on run %s: %s", run_id, problem)
        return False
    return True
