"""What ``make rerun`` compares between a run and its re-run: each function takes a run and gives a value that is
equal for both exactly when that part came out the same. Stages name theirs in their declaration (``Stage.checks``)."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from pipeline.tracking.runs import run_artifact_text, tracking_uri


def manifest_digest(run: Any) -> str:
    """sha256 of the data manifest a prepare run logged."""
    return hashlib.sha256(run_artifact_text(run.info.run_id, "data/manifest.json").encode()).hexdigest()


def pool_digest(run: Any) -> str | None:
    """The sha256 of the pool a training run read (``data.sha256``)."""
    return run.data.params.get("data.sha256")


def final_loss(run: Any) -> float | None:
    return run.data.metrics.get("loss")


def scores(run: Any) -> dict[str, float]:
    """Every ``eval/…`` and ``delta/…`` metric, the earlier adapter's (``earlier/…``) too."""
    return {k: v for k, v in sorted(run.data.metrics.items()) if k.startswith(("eval/", "delta/", "earlier/"))}


def weights(run: Any) -> list[dict[str, str]]:
    """For each model version the run registered: the sha256 of each weights file (``*.safetensors``) by name."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri())
    found = []
    for mv in client.search_model_versions(f"run_id = '{run.info.run_id}'"):
        with tempfile.TemporaryDirectory(prefix="zh-align-fingerprint-") as tmp:
            root = Path(mlflow.artifacts.download_artifacts(mv.source, dst_path=tmp))
            found.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.safetensors"))})
    return sorted(found, key=json.dumps)
