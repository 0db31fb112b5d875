"""tracking/runs.py on a temporary sqlite store: start/attach, FAILED on error, limits, secrets, `mlflow run -e plan`."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from pipeline.core.paths import ROOT
from pipeline.core.secrets import REDACTED
from pipeline.stage.resolve import resolve
from pipeline.tracking import runs as tracking

SECRET = "hf_THIS_MUST_NOT_LEAK_42"


def _run_stage(**kwargs):
    r = resolve("sft", hw="cpu")
    return r, tracking.start_run("sft", r.as_dict(), hw=r.hw.name, model=r.model.name, **kwargs)


def _artifact_texts(client: MlflowClient, run_id: str) -> dict[str, str]:
    root = Path(client.download_artifacts(run_id, ""))
    return {str(p.relative_to(root)): p.read_text(encoding="utf-8") for p in root.rglob("*") if p.is_file()}


def test_a_standalone_run_carries_config_tags_environment_and_its_log(mlflow_store, caplog):
    caplog.set_level(logging.INFO)
    r, ctx = _run_stage()
    with ctx as active:
        logging.getLogger("pipeline.sft").info("训练开始 step 1")
    run = MlflowClient().get_run(active.info.run_id)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert (tags["stage"], tags["hw"], tags["model"], tags["dry_run"]) == ("sft", "cpu", "tiny-qwen2", "false")
    assert len(tags["git.sha"]) == 40 or tags["git.sha"] == "unknown"
    assert tags["git.dirty"] in ("true", "false", "unknown")
    params = run.data.params
    assert params["config.lora.r"] == "16" and params["hw.micro_batch"] == "4" and params["model.name"] == "tiny-qwen2"
    assert params["env.HF_HUB_OFFLINE"] == "1"
    texts = _artifact_texts(MlflowClient(), active.info.run_id)
    assert "lora:" in texts["resolved_config.yaml"] and "r: 16" in texts["resolved_config.yaml"]
    assert "mlflow==" in texts["environment/pip-freeze.txt"]
    assert "训练开始 step 1" in texts["logs/sft.log"]
    assert MlflowClient().get_experiment(run.info.experiment_id).name == "zh-align-test"


def test_attaches_to_the_run_that_mlflow_run_created(mlflow_store, monkeypatch):
    client = MlflowClient()
    exp = client.create_experiment("launched-by-mlflow-run")
    launched = client.create_run(exp)
    monkeypatch.setenv("MLFLOW_RUN_ID", launched.info.run_id)
    _, ctx = _run_stage()
    with ctx as active:
        assert active.info.run_id == launched.info.run_id
    runs = client.search_runs([exp])
    assert [x.info.run_id for x in runs] == [launched.info.run_id]
    assert runs[0].data.params["config.lora.r"] == "16"
    assert client.get_experiment_by_name("zh-align-test") is None  # set_experiment was not called


def test_attaches_to_an_already_active_run_and_leaves_it_open(mlflow_store):
    mlflow.set_tracking_uri(mlflow_store)
    mlflow.set_experiment("outer")
    with mlflow.start_run() as outer:
        _, ctx = _run_stage()
        with ctx as active:
            assert active.info.run_id == outer.info.run_id
        assert mlflow.active_run().info.run_id == outer.info.run_id
    assert MlflowClient().get_run(outer.info.run_id).data.tags["stage"] == "sft"


def test_an_exception_ends_the_run_failed_with_the_message_and_propagates(mlflow_store):
    _, ctx = _run_stage()
    with pytest.raises(RuntimeError, match="显存不足"), ctx as active:
        raise RuntimeError("显存不足: CUDA out of memory")
    run = MlflowClient().get_run(active.info.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "RuntimeError: 显存不足: CUDA out of memory"
    assert mlflow.active_run() is None


def test_params_stay_within_mlflows_limits(mlflow_store):
    config = {"long": "x" * 10_000, "many": {f"k{i}": i for i in range(250)}, "k" * 300: 1}
    with tracking.start_run("plan", config, hw="cpu", model="tiny-qwen2") as active:
        pass
    params = MlflowClient().get_run(active.info.run_id).data.params
    assert len(params["long"]) == tracking.MAX_VALUE and params["long"].endswith("[truncated]")
    assert sum(k.startswith("many.") for k in params) == 250
    assert all(len(k) <= tracking.MAX_KEY for k in params)


def test_secret_values_are_never_logged(mlflow_store, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    config = {"hub": {"token": SECRET, "api_key": SECRET, "n_tokens": 7}, "cli_overrides": [f"hub.password={SECRET}"]}
    with tracking.start_run("plan", config, hw="cpu", model="tiny-qwen2") as active:
        logging.getLogger("pipeline").info("token ok")
    client = MlflowClient()
    run = client.get_run(active.info.run_id)
    everything = [*run.data.params.values(), *run.data.tags.values(), *_artifact_texts(client, run.info.run_id).values()]
    assert not any(SECRET in text for text in everything)
    assert run.data.params["env.HF_TOKEN"] == REDACTED and run.data.params["hub.token"] == REDACTED
    assert run.data.params["hub.n_tokens"] == "7"  # a count named like tokens is not a secret


def test_mlflow_run_of_the_plan_entry_point_leaves_a_finished_run(mlflow_store, tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "plan", "--env-manager", "local",
         "--experiment-name", "zh-align-test", "-P", "hw=5090"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("zh-align-test").experiment_id])
    assert run.info.status == "FINISHED"
    assert (run.data.tags["stage"], run.data.tags["hw"]) == ("plan", "5090")
    assert run.data.params["sft.hw.max_length"] == "4096" and run.data.params["hw"] == "5090"
    texts = _artifact_texts(client, run.info.run_id)
    assert {f"resolved/{s}.yaml" for s in ("prepare", "sft", "align", "evaluate", "export")} <= set(texts)
    assert "━━ export ━━" in texts["plan.txt"] and "resolved_config.yaml" in texts
