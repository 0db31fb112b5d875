"""The extra log backends beside MLflow: TensorBoard event files and an offline W&B run from a few real sft steps on
the tiny model, and a backend whose package is missing refused by the config check (before any model loads)."""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.projects import _project_spec

from pipeline import sft
from pipeline.core.errors import ConfigError
from pipeline.core.paths import ROOT
from pipeline.core.profiles import DEFAULT_HW
from pipeline.core.strict import parse_overrides
from pipeline.data import prepared
from pipeline.stage import cli
from pipeline.stage.resolve import resolve
from pipeline.stage.spec import get, names
from pipeline.training import config as training_config

FAST = ["hw.micro_batch=4", "hw.grad_accum=1", "train.logging_steps=1", "train.max_steps=2", "train.eval_steps=100",
        "train.save_steps=100"]


def _train(pool: Path, out: Path, backend: str):
    r = resolve("sft", hw="cpu", overrides=parse_overrides([f"data.path={pool}", f"output_dir={out}", *FAST,
                                                            f"log_backend={backend}"]))
    p = prepared.load_pool(r.cfg.data, "sft", r)
    trainer, _ = sft.build_trainer(r, p, list(range(8)), out)
    trainer.train()
    return r, trainer


def test_tensorboard_writes_event_files_inside_the_output_dir(pool, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    out = tmp_path / "sft"
    r, trainer = _train(pool, out, "tensorboard")
    events = sorted(out.glob("runs/*/events.out.tfevents.*"))
    assert events, f"no TensorBoard event files under {out}/runs: {sorted(p.name for p in out.rglob('*'))}"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"] and len(acc.Scalars("train/loss")) >= 2
    assert f"event files under {r.cfg.output_dir}/runs/" in dict([sft.plan(r).facts[-1]])["log backend"]


def test_wandb_offline_writes_an_offline_run_folder(pool, tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "zh-align-test")
    try:
        _train(pool, tmp_path / "sft", "wandb")
    finally:
        wandb.finish()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert runs, f"no offline W&B run under {tmp_path / 'wandb'}"
    assert any(runs[0].glob("run-*.wandb")), sorted(p.name for p in runs[0].iterdir())


@pytest.mark.parametrize("backend", ["tensorboard", "wandb"])
def test_a_backend_whose_package_is_missing_is_refused_with_the_extra_named(backend, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(training_config.importlib.util, "find_spec",
                        lambda name, *a: None if name == backend else real(name, *a))
    for stage in ("sft", "align"):
        with pytest.raises(ConfigError) as err:
            resolve(stage, hw="cpu", overrides=parse_overrides([f"log_backend={backend}"]))
        text = str(err.value)
        assert "`log_backend`" in text and f"the {backend} package is not installed" in text
        assert 'pip install -e ".[logging]"' in text
    capsys.readouterr()
    out = tmp_path / "sft"
    assert sft.main(["--hw", "cpu", "--dry-run", "false", "--set", f"log_backend={backend}",
                     "--set", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert f"the {backend} package is not installed" in err and 'pip install -e ".[logging]"' in err
    assert not out.exists()  # refused before any model or run


def test_an_installed_backend_passes_the_check():
    assert resolve("sft", hw="cpu", overrides=parse_overrides(["log_backend=tensorboard"])).cfg.log_backend == \
        "tensorboard"


# ----------------------------------------------------------------------------------------------------------------
# MLproject: every entry point runs alone (`mlflow run . -e X --env-manager local`, no -P)
# ----------------------------------------------------------------------------------------------------------------
def test_every_entry_point_renders_with_mlflows_own_loader_and_no_parameters(tmp_path):
    """MLflow's own project loader renders every command with no -P (a parameter with no default raises)."""
    project = _project_spec.load_project(str(ROOT))
    entry_points = project._entry_points
    assert {*names(), "plan", "pipeline"} == set(entry_points)
    for name, ep in entry_points.items():
        argv = shlex.split(ep.compute_command({}, str(tmp_path)))  # raises on a parameter with no default
        assert argv[:3] == ["python", "-m", f"pipeline.{name}"] and argv[argv.index("--hw") + 1] == DEFAULT_HW
        if name in names():
            args = cli.make_parser(get(name)).parse_args(argv[3:])
            assert args.hw == DEFAULT_HW and args.dry_run is True


def _mlflow_run(tmp_path: Path, *extra: str):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONPATH": str(ROOT),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "mlflow", "run", ".", "-e", "sft", "--env-manager", "local", *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    found = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return proc, found


def test_plain_mlflow_run_of_sft_is_a_dry_run_on_the_default_profile(tmp_path):
    proc, found = _mlflow_run(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--hw 4090 --dry-run true" in proc.stderr and "RTX 4090" in proc.stdout + proc.stderr
    assert [r.info.status for r in found] == ["FINISHED"]


def test_a_run_that_fails_before_the_stage_starts_is_failed_not_running(tmp_path):
    proc, found = _mlflow_run(tmp_path, "-P", "hw=nope")
    assert proc.returncode != 0 and "unknown hardware profile 'nope'" in proc.stderr
    assert [r.info.status for r in found] == ["FAILED"]
    assert "unknown hardware profile 'nope'" in found[0].data.tags["error"]
