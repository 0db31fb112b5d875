"""Runs: open or attach to the stage's run, log into it, read runs back.

``start_run`` opens the stage's run, or attaches to the one ``mlflow run`` created (``MLFLOW_RUN_ID``; no
``set_experiment`` there), logs the resolved config as flattened params and as a YAML artifact, the lineage tags,
``pip freeze`` and the stage's own log file (:mod:`.runlog`); on an exception it ends the run FAILED with the message
as a tag and lets the exception propagate. No secret is logged (:mod:`pipeline.core.secrets`): values of keys or environment
variables named like a token, key, secret or password, URL passwords, and those values wherever they reappear — in
params, tags, the ``error`` tag, text artifacts and the stage's log file. Only rank 0 of several processes talks to
MLflow.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.errors import StageError
from pipeline.core.paths import ROOT, repo_path
from pipeline.core.process import Interrupted
from pipeline.core.runtime import rank
from pipeline.core.secrets import REDACTED, Scrubber, is_secret, redact, remember
from pipeline.tracking import liveness, runlog
from pipeline.tracking.retry import first_use, retry_locked

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "zh-align"
TRUNCATED = "…[truncated]"
MAX_KEY, MAX_VALUE, BATCH = 250, 6000, 100  # MLflow's limits for param keys, values and one log_batch call
ENV_PREFIXES = ("HF_", "HUGGING_FACE_", "MLFLOW_", "TRANSFORMERS_", "TRL_", "WANDB_", "PYTORCH_", "CUDA_", "ACCELERATE_")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted params from a nested dict, within MLflow's key/value limits, secrets redacted."""
    flat: dict[str, str] = {}
    for key, value in redact(dict(tree), Scrubber()).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        if len(text) > MAX_VALUE:
            text = text[: MAX_VALUE - len(TRUNCATED)] + TRUNCATED
        flat[name[:MAX_KEY]] = text
    return flat


def environment() -> dict[str, str]:
    """The environment variables that shape a run (hub, tracking, CUDA), secrets redacted (URL passwords too)."""
    scrub = Scrubber()
    return {k: REDACTED if is_secret(k) else scrub(v) for k, v in sorted(os.environ.items())
            if k.startswith(ENV_PREFIXES)}


@functools.cache
def git_state() -> dict[str, str]:
    """The commit this process runs (read once): ``git.sha`` and ``git.dirty``."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"git.sha": git("rev-parse", "HEAD"), "git.dirty": str(bool(git("status", "--porcelain"))).lower()}
    except (OSError, subprocess.CalledProcessError):
        return {"git.sha": "unknown", "git.dirty": "unknown"}


def pip_freeze() -> str:
    dists = {(d.metadata["Name"] or "").lower(): d.version for d in metadata.distributions()}
    return "".join(f"{name}=={version}\n" for name, version in sorted(dists.items()) if name)


def rank0(fn: Any) -> Any:
    """Only rank 0 talks to MLflow; on the other ranks a logging call does nothing."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs) if rank() == 0 else None
    return wrapper


@contextmanager
def start_run(stage: str, config: Mapping[str, Any], *, hw: str, model: str, dry_run: bool = False,
              run_name: str | None = None, tags: Mapping[str, str] | None = None,
              system_metrics: bool = False) -> Iterator[Any]:
    """Open (or attach to) the stage's MLflow run and log what makes it reproducible; yields the ActiveRun.
    ``system_metrics``: MLflow samples CPU, memory, disk, network and (with nvidia-ml-py) GPU use as ``system/…``.
    On ranks other than 0 (several processes) it opens nothing and yields None."""
    if rank() != 0:
        yield None
        return
    import mlflow

    remember(config)  # its secret-named values are scrubbed wherever they turn up from here on
    mlflow.set_tracking_uri(tracking_uri())
    first_use(tracking_uri())  # a new sqlite store: one process at a time creates it
    owned = mlflow.active_run() is None
    if owned:
        run_id = os.environ.get("MLFLOW_RUN_ID")
        if run_id:  # launched by `mlflow run`: attach, never set_experiment
            active = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics or None)
        else:
            mlflow.set_experiment(experiment_name())
            active = mlflow.start_run(run_name=run_name or f"{stage}-{hw}", log_system_metrics=system_metrics or None)
    else:
        active = mlflow.active_run()
    output, trains = _output_dir(config), "resume" in dict(config.get("config") or {}).get("train", {})
    log_file = runlog.path(stage, output if trains else None, active.info.run_id)
    handler = runlog.capture(log_file)
    client = mlflow.MlflowClient(tracking_uri())
    heart = liveness.Heartbeat(client, active.info.run_id)
    try:
        set_tags({"stage": stage, "hw": hw, "model": model, "dry_run": str(dry_run).lower(), **git_state(),
                  **liveness.identity(output), **(tags or {})})
        _sweep(client, active, stage, output, trains)
        log_params(config)
        log_params(environment(), prefix="env.")
        log_text(yaml.safe_dump(redact(dict(config), Scrubber()), allow_unicode=True, sort_keys=False),
                 "resolved_config.yaml")
        log_text(pip_freeze(), "environment/pip-freeze.txt")
        yield active
    except BaseException as err:
        killed = isinstance(err, Interrupted)
        mlflow.set_tag("error", Scrubber()(str(err) if killed else f"{type(err).__name__}: {err}")[:MAX_VALUE])
        if killed:
            mlflow.set_tag("killed_reason", f"{err}; {liveness.how_to_go_on(stage, active.data.tags, trains)}")
        _close(mlflow, handler, log_file, stage, owned, "KILLED" if killed else "FAILED", heart)
        raise
    _close(mlflow, handler, log_file, stage, owned, "FINISHED", heart)


def _output_dir(config: Mapping[str, Any]) -> str | None:
    """The stage's output folder (resolved), from its resolved config; None for a command without one."""
    folder = dict(config.get("config") or {}).get("output_dir")
    return str(repo_path(folder)) if folder else None


def _sweep(client: Any, active: Any, stage: str, output: str | None, trains: bool) -> None:
    try:
        liveness.sweep(client, active.info.experiment_id, stage, output, active.info.run_id, trains)
    except Exception as err:  # looking at other runs never fails this one
        log.warning("could not look for runs left RUNNING by dead processes: %s", err)


def _close(mlflow: Any, handler: logging.Handler, log_file: Path, stage: str, owned: bool, status: str,
           heart: liveness.Heartbeat) -> None:
    heart.stop()
    runlog.release(handler)
    try:
        mlflow.set_tag("heartbeat", f"{time.time():.0f}")
        with tempfile.TemporaryDirectory(prefix="zh-align-log-") as tmp:
            named = Path(tmp) / f"{stage}.log"  # the artifact keeps the stage's name, as an early failure's does
            shutil.copyfile(log_file, named)
            mlflow.log_artifact(str(named), "logs")
    finally:
        if owned:
            mlflow.end_run(status)


TEXT_ARTIFACT_MAX = 64 * 2 ** 20  # text files up to this size are checked for secrets before they are logged


@contextmanager
def scrubbed_files(paths: Iterable[Path]) -> Iterator[list[Path]]:
    """The files to log: each text file (UTF-8, up to TEXT_ARTIFACT_MAX) that holds a secret is replaced by a scrubbed
    copy of the same name; weights and other binary files are logged as they are."""
    scrub = Scrubber()
    with tempfile.TemporaryDirectory(prefix="zh-align-scrubbed-") as tmp:
        out = []
        for i, path in enumerate(map(Path, paths)):
            if path.is_file() and path.stat().st_size <= TEXT_ARTIFACT_MAX:
                data = path.read_bytes()
                if scrub.bytes_hold_secret(data):
                    try:
                        text = data.decode("utf-8")
                    except UnicodeDecodeError:
                        text = None
                    if text is not None:
                        copy = Path(tmp) / str(i) / path.name
                        copy.parent.mkdir()
                        copy.write_text(scrub(text), encoding="utf-8")
                        path = copy
            out.append(path)
        yield out


@rank0
def heartbeat() -> None:
    """``heartbeat`` = now on the open run (each logging step): a run whose heartbeat stops is a dead one."""
    if has_run():
        import mlflow

        liveness.beat(mlflow.MlflowClient(tracking_uri()), mlflow.active_run().info.run_id)


@rank0
def record_failure(stage: str, err: BaseException, log_file: Path | None, trains: bool) -> bool:
    """An error or signal before the stage's run was attached or closed: onto the run ``mlflow run`` created."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return False
    import mlflow

    return liveness.record_failure(mlflow.MlflowClient(tracking_uri()), run_id, stage, err, log_file, trains)


@rank0
@retry_locked
def log_params(params: Mapping[str, Any], prefix: str = "") -> None:
    import mlflow

    items = list(flatten(params, prefix).items())
    for i in range(0, len(items), BATCH):
        mlflow.log_params(dict(items[i: i + BATCH]))


@rank0
@retry_locked
def log_text(text: str, artifact_file: str) -> None:
    import mlflow

    mlflow.log_text(Scrubber()(text), artifact_file)


@rank0
@retry_locked
def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    import mlflow

    mlflow.log_metrics(dict(metrics), step=step)


@rank0
@retry_locked
def set_tags(tags: Mapping[str, Any]) -> None:
    import mlflow

    scrub = Scrubber()
    mlflow.set_tags({k: REDACTED if is_secret(k) else scrub(str(v)) for k, v in tags.items()})


@rank0
@retry_locked
def log_artifacts(paths: Iterable[Path], artifact_path: str | None = None) -> None:
    import mlflow

    with scrubbed_files(paths) as clean:
        for path in clean:
            mlflow.log_artifact(str(path), artifact_path)


@rank0
@retry_locked
def log_dict(data: Mapping[str, Any], artifact_file: str) -> None:
    """A JSON artifact with Chinese kept readable (``mlflow.log_dict`` would escape it as \\uXXXX)."""
    import mlflow

    clean = redact(dict(data), Scrubber(), by_name=False)
    mlflow.log_text(json.dumps(clean, ensure_ascii=False, indent=2), artifact_file)


@rank0
@retry_locked
def log_table(columns: Mapping[str, list], artifact_file: str) -> None:
    """A table (equal-length columns) that `mlflow ui` shows in its artifact view and its evaluation tab."""
    import mlflow

    mlflow.log_table(data=redact(dict(columns), Scrubber(), by_name=False), artifact_file=artifact_file)


@rank0
@retry_locked
def log_file_input(path: Path, *, name: str, digest: str, context: str, tags: Mapping[str, Any] | None = None) -> None:
    """Record a file the run produced or read as a dataset input of the run (name, digest, where it lies)."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # MLflow registers its local-file source twice and says so on every call
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(Path(path).resolve().as_uri())
    dataset, tags = MetaDataset(source, name=name, digest=digest[:32]), {k: str(v) for k, v in (tags or {}).items()}
    try:
        mlflow.log_input(dataset, context=context, tags=tags)
    except mlflow.exceptions.MlflowException as err:
        # Two runs that log the same dataset (one pool, two stages started together) can both find it missing and
        # both insert it; the loser's insert breaks the store's unique key. The dataset is there now: log it again.
        if not re.search(r"unique constraint|duplicate key|UNIQUE", str(err), re.IGNORECASE):
            raise
        time.sleep(0.5)
        mlflow.log_input(dataset, context=context, tags=tags)


def has_run() -> bool:
    """Whether a run is open here (MLflow's fluent calls would otherwise start one silently). Never imported, MLflow
    has no run open: a process without it (``make bench`` on a GPU box) trains all the same."""
    mlflow = sys.modules.get("mlflow")
    return mlflow is not None and mlflow.active_run() is not None


def current_run_id() -> str | None:
    """The id of the run open here (None: none, or a rank other than 0)."""
    return sys.modules["mlflow"].active_run().info.run_id if has_run() else None


@rank0
@retry_locked
def log_to_run(run_id: str, metrics: Mapping[str, float], tags: Mapping[str, str], files: Iterable[Path],
               artifact_path: str) -> None:
    """Metrics, tags and files onto another (finished) run: a training run receives its evaluation."""
    import mlflow

    client, scrub = mlflow.MlflowClient(tracking_uri()), Scrubber()
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    for key, value in tags.items():
        client.set_tag(run_id, key, REDACTED if is_secret(key) else scrub(str(value)))
    with scrubbed_files(files) as clean:
        for path in clean:
            client.log_artifact(run_id, str(path), artifact_path)


def get_run(run_id: str) -> Any:
    """The run (info, data.params/tags/metrics); an unknown id is a StageError naming the store."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.MlflowClient(tracking_uri()).get_run(run_id)
    except MlflowException as err:
        raise StageError(f"run {run_id!r} is not in {tracking_uri()}; copy the id from `mlflow ui` (or set "
                         f"MLFLOW_TRACKING_URI to the store that holds it)") from err


def run_artifact_text(run_id: str, path: str) -> str:
    import mlflow

    with tempfile.TemporaryDirectory(prefix="zh-align-artifact-") as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp,
                                                    tracking_uri=tracking_uri())
        return Path(local).read_text(encoding="utf-8")


def run_entry_point(entry_point: str, parameters: Mapping[str, str], *, experiment_id: str | None = None,
                    run_name: str | None = None) -> tuple[str, str]:
    """Run an MLproject entry point through MLflow and wait for it: (run id, final status). Inside an active run the
    new run is its child (MLflow's multistep pattern) in the same experiment. MLflow marks a run whose process died
    before closing it (a crash, a kill) FAILED."""
    import re
    import sys

    import mlflow
    from mlflow.exceptions import ExecutionException

    mlflow.set_tracking_uri(tracking_uri())
    parent = mlflow.active_run()
    experiment_id = experiment_id or (parent.info.experiment_id if parent else None)
    here = str(Path(sys.executable).parent)  # the entry point's `python` is this interpreter, venv or not
    if os.environ.get("PATH", "").split(os.pathsep)[0] != here:
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")
    try:
        submitted = mlflow.projects.run(str(ROOT), entry_point, parameters=dict(parameters), env_manager="local",
                                        experiment_id=experiment_id, run_name=run_name, synchronous=True)
        run_id = submitted.run_id
    except ExecutionException as err:
        found = re.search(r"ID '([0-9a-f]+)'", str(err))
        if not found:
            raise
        run_id = found.group(1)
    return run_id, mlflow.MlflowClient().get_run(run_id).info.status
