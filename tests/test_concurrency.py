"""Several stages logging into one sqlite store at once: a real prepare stage and two training-shaped writers (every
step's metrics and a heartbeat tag through pipeline/tracking/runs.py) started together on a new mlflow.db all finish
with every metric; a store locked past MLflow's own wait is retried, then named with `make server`."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException

from pipeline.core.errors import StageError
from pipeline.core.paths import ROOT
from pipeline.tracking import retry

STEPS = 30
METRICS = ("loss", "grad_norm", "learning_rate", "tokens_per_second")
# What a training stage does with MLflow, without the model: open the run with the resolved sft config (params, tags,
# resolved_config.yaml, pip freeze), log every step's metrics and a heartbeat tag, then artifacts and a dataset input.
WRITER = """
import sys
import tempfile
from pathlib import Path
from pipeline.stage.resolve import resolve
from pipeline.tracking import runs

name, steps = sys.argv[1], int(sys.argv[2])
r = resolve("sft", hw="cpu")
with runs.start_run("sft", r.as_dict(), hw=r.hw.name, model=r.model.name, run_name=name):
    for step in range(1, steps + 1):
        runs.log_metrics({"loss": 10.0 / step, "grad_norm": 1.0 + step, "learning_rate": 1e-4 * step,
                          "tokens_per_second": 100.0 * step}, step=step)
        runs.set_tags({"progress": step})
        runs.heartbeat()
    runs.log_dict({"steps": steps, "写入者": name}, "summary.json")
    card = Path(tempfile.mkdtemp()) / "卡片.md"
    card.write_text("数据卡 " + name, encoding="utf-8")
    runs.log_artifacts([card], "data")
    runs.log_file_input(card, name="card", digest="0" * 32, context="training")
"""


def stage_env(uri: str, experiment: str) -> dict[str, str]:
    """A stage's environment: this store and experiment, this checkout's package (the stages run in a temporary
    folder, where a new store's artifacts land in ./mlruns)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": experiment,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        env.pop(key, None)
    return env


def writer(name: str, env: dict[str, str], cwd: Path, steps: int = STEPS) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, name, str(steps)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs: dict[str, subprocess.Popen], timeout: float = 300) -> dict[str, tuple[int, str]]:
    """Wait for every process (bounded), killing any still running at the deadline; name → (exit code, stderr)."""
    deadline, done = time.monotonic() + timeout, {}
    try:
        for name, proc in procs.items():
            _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            done[name] = (proc.returncode, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    return done


def assert_writer_logged_every_step(client: mlflow.MlflowClient, run, steps: int = STEPS) -> None:
    assert run.info.status == "FINISHED"
    for key in METRICS:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert [s for s, _ in history] == list(range(1, steps + 1)), key
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
    assert losses == [10.0 / s for s in range(1, steps + 1)]
    assert run.data.tags["progress"] == str(steps) and run.data.params["config.lora.r"] == "16"
    assert float(run.data.tags["heartbeat"]) >= run.info.start_time / 1000 - 1  # the liveness beat, at the close
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"summary.json", "resolved_config.yaml"}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "data")] == ["data/卡片.md"]
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["card"]


@pytest.fixture(scope="module")
def together(tmp_path_factory):
    """A prepare stage and two training-shaped writers started at the same moment on a sqlite store that does not
    exist yet (each process creates it on its first call)."""
    tmp = tmp_path_factory.mktemp("together")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    env = stage_env(uri, "together")
    prepare = subprocess.Popen([sys.executable, "-m", "pipeline.prepare", "--hw", "cpu", "--dry-run", "false",
                                "--set", f"output_dir={tmp / 'data'}"], cwd=tmp, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    done = finish({"prepare": prepare, "sft-a": writer("sft-a", env, tmp), "sft-b": writer("sft-b", env, tmp)})
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("together")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return done, client, runs, tmp / "data"


def test_stages_started_together_on_a_new_store_all_finish(together):
    done, _, runs, _ = together
    for name, (code, err) in done.items():
        assert code == 0, f"{name} exited {code}:\n{err[-3000:]}"
        assert "database is locked" not in err and "Traceback" not in err, f"{name}:\n{err[-3000:]}"
    assert sorted(r.info.run_name for r in runs) == ["prepare-cpu", "sft-a", "sft-b"]
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_every_metric_of_every_run_is_in_the_store(together):
    _, client, runs, data = together
    prepared = next(r for r in runs if r.data.tags["stage"] == "prepare")
    manifest = json.loads((data / "manifest.json").read_text(encoding="utf-8"))
    assert {f"rows.{n.removesuffix('.jsonl')}": float(o["rows"]) for n, o in manifest["outputs"].items()
            if n.endswith(".jsonl")}.items() <= prepared.data.metrics.items()
    assert len(manifest["sources"]) == 7
    assert all(f"{name}.rows_read" in prepared.data.metrics for name in manifest["sources"])
    assert len(prepared.data.metrics) > 20 and prepared.data.tags["licence.noncommercial"] == "true"
    assert {d.dataset.name for d in prepared.inputs.dataset_inputs} == {"sft", "sft_eval", "pref", "pref_eval"}
    assert "data/DATA_CARD.md" in {a.path for a in client.list_artifacts(prepared.info.run_id, "data")}
    assert str(data.parent) in prepared.info.artifact_uri  # the artifacts stay in the test's folder
    for run in runs:
        if run.data.tags["stage"] == "sft":
            assert_writer_logged_every_step(client, run)


def _locked_error(tmp_path: Path) -> MlflowException:
    """sqlite's own "database is locked", raised the way MLflow's store raises it."""
    db = tmp_path / "locked.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        sqlite3.connect(db, timeout=0).execute("SELECT 1 FROM sqlite_master").fetchall()
    except sqlite3.OperationalError as err:
        try:
            raise MlflowException(f"(sqlite3.OperationalError) {err}", error_code="TEMPORARILY_UNAVAILABLE") from err
        except MlflowException as wrapped:
            return wrapped
    finally:
        holder.close()
    raise AssertionError("the second connection got the lock")


def test_a_locked_store_is_tried_again_until_the_lock_goes(tmp_path, caplog):
    error, calls = _locked_error(tmp_path), []

    @retry.retry_locked(delays=(0.01, 0.01, 0.01))
    def log_step(value: float) -> float:
        calls.append(value)
        if len(calls) < 3:
            raise error
        return value

    assert log_step(1.5) == 1.5 and calls == [1.5, 1.5, 1.5]
    assert "locked by another writer (log_step); try 3 of 4" in caplog.text


def test_a_store_locked_past_every_retry_is_named_with_make_server(tmp_path, mlflow_store):
    error = _locked_error(tmp_path)

    @retry.retry_locked(delays=(0.01,))
    def log_step() -> None:
        raise error

    with pytest.raises(StageError) as caught:
        log_step()
    assert mlflow_store in str(caught.value) and "make server" in str(caught.value)
    assert caught.value.__cause__ is error


def test_other_errors_are_not_retried():
    calls = []

    @retry.retry_locked(delays=(0.01, 0.01))
    def log_step() -> None:
        calls.append(1)
        raise MlflowException("Changing param values is not allowed", error_code="INVALID_PARAMETER_VALUE")

    with pytest.raises(MlflowException):
        log_step()
    assert calls == [1]


def test_only_a_sqlite_file_takes_the_first_use_lock(tmp_path):
    assert retry.sqlite_path(f"sqlite:///{tmp_path}/a.db?mode=rw") == tmp_path / "a.db"
    assert retry.sqlite_path("sqlite:///:memory:") is None
    assert retry.sqlite_path("http://127.0.0.1:5000") is None and retry.sqlite_path("postgresql://u@h/db") is None
