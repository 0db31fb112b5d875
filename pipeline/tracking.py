"""The only module that talks to MLflow.

``start_run`` opens the stage's run, or attaches to the one ``mlflow run`` created (``MLFLOW_RUN_ID``; no
``set_experiment`` there), logs the resolved config as flattened params and as a YAML artifact, the lineage tags,
``pip freeze`` and the stage's own log file; on an exception it ends the run FAILED with the message as a tag and
lets the exception propagate. Values of keys or environment variables named like a token, key, secret or password
are never logged.

The light helpers (``tracking_uri``, ``experiment_name``) import nothing heavy: the plan uses them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import ROOT

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "zh-align"
REDACTED = "[redacted]"
TRUNCATED = "…[truncated]"
MAX_KEY, MAX_VALUE, BATCH = 250, 6000, 100  # MLflow's limits for param keys, values and one log_batch call
_SECRET = re.compile(r"(secret|password|passwd|credential)|(^|[_.\-])(token|key|api_?key|pwd|auth)$", re.IGNORECASE)
ENV_PREFIXES = ("HF_", "HUGGING_FACE_", "MLFLOW_", "TRANSFORMERS_", "TRL_", "WANDB_", "PYTORCH_", "CUDA_", "ACCELERATE_")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def is_secret(name: str) -> bool:
    return bool(_SECRET.search(name.rsplit(".", 1)[-1]))


def redact(tree: Any) -> Any:
    """A copy of a nested dict/list with the values of secret-looking keys replaced."""
    if isinstance(tree, Mapping):
        return {k: REDACTED if is_secret(str(k)) and v not in (None, "") else redact(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [redact(v) for v in tree]
    if isinstance(tree, str) and "=" in tree and is_secret(tree.split("=", 1)[0]):  # "key=value" overrides
        return tree.split("=", 1)[0] + "=" + REDACTED
    return tree


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted params from a nested dict, within MLflow's key/value limits, secrets redacted."""
    flat: dict[str, str] = {}
    for key, value in redact(dict(tree)).items():
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
    """The environment variables that shape a run (hub, tracking, CUDA), secrets redacted."""
    return {k: REDACTED if is_secret(k) else v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)}


def git_state() -> dict[str, str]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"git.sha": git("rev-parse", "HEAD"), "git.dirty": str(bool(git("status", "--porcelain"))).lower()}
    except (OSError, subprocess.CalledProcessError):
        return {"git.sha": "unknown", "git.dirty": "unknown"}


def pip_freeze() -> str:
    dists = {(d.metadata["Name"] or "").lower(): d.version for d in metadata.distributions()}
    return "".join(f"{name}=={version}\n" for name, version in sorted(dists.items()) if name)


@contextmanager
def start_run(stage: str, config: Mapping[str, Any], *, hw: str, model: str, dry_run: bool = False,
              run_name: str | None = None, tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """Open (or attach to) the stage's MLflow run and log what makes it reproducible; yields the ActiveRun."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    owned = mlflow.active_run() is None
    if owned:
        run_id = os.environ.get("MLFLOW_RUN_ID")
        if run_id:  # launched by `mlflow run`: attach, never set_experiment
            active = mlflow.start_run(run_id=run_id)
        else:
            mlflow.set_experiment(experiment_name())
            active = mlflow.start_run(run_name=run_name or f"{stage}-{hw}")
    else:
        active = mlflow.active_run()
    logdir = Path(tempfile.mkdtemp(prefix=f"zh-align-{stage}-"))
    handler = logging.FileHandler(logdir / f"{stage}.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        mlflow.set_tags({"stage": stage, "hw": hw, "model": model, "dry_run": str(dry_run).lower(),
                         **git_state(), **(tags or {})})
        log_params(config)
        log_params(environment(), prefix="env.")
        log_text(yaml.safe_dump(redact(dict(config)), allow_unicode=True, sort_keys=False), "resolved_config.yaml")
        log_text(pip_freeze(), "environment/pip-freeze.txt")
        yield active
    except BaseException as err:
        mlflow.set_tag("error", f"{type(err).__name__}: {err}"[:MAX_VALUE])
        _close(mlflow, handler, logdir, stage, owned, "FAILED")
        raise
    _close(mlflow, handler, logdir, stage, owned, "FINISHED")


def _close(mlflow: Any, handler: logging.Handler, logdir: Path, stage: str, owned: bool, status: str) -> None:
    logging.getLogger().removeHandler(handler)
    handler.close()
    try:
        mlflow.log_artifact(str(logdir / f"{stage}.log"), "logs")
    finally:
        if owned:
            mlflow.end_run(status)


def log_params(params: Mapping[str, Any], prefix: str = "") -> None:
    import mlflow

    flat = flatten(params, prefix)
    items = list(flat.items())
    for i in range(0, len(items), BATCH):
        mlflow.log_params(dict(items[i: i + BATCH]))


def log_text(text: str, artifact_file: str) -> None:
    import mlflow

    mlflow.log_text(text, artifact_file)


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    import mlflow

    mlflow.log_metrics(dict(metrics), step=step)


def set_tags(tags: Mapping[str, Any]) -> None:
    import mlflow

    mlflow.set_tags({k: REDACTED if is_secret(k) else str(v) for k, v in tags.items()})


def log_artifacts(paths: Iterable[Path], artifact_path: str | None = None) -> None:
    import mlflow

    for path in paths:
        mlflow.log_artifact(str(path), artifact_path)


def log_file_input(path: Path, *, name: str, digest: str, context: str, tags: Mapping[str, Any] | None = None) -> None:
    """Record a file the run produced or read as a dataset input of the run (name, digest, where it lies)."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # MLflow registers its local-file source twice and says so on every call
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(Path(path).resolve().as_uri())
    mlflow.log_input(MetaDataset(source, name=name, digest=digest[:32]), context=context,
                     tags={k: str(v) for k, v in (tags or {}).items()})
