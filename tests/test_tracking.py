"""tracking/runs.py on a temporary sqlite store: start/attach, FAILED on error, limits, secrets, `mlflow run -e plan`;
signals end a run KILLED, runs left RUNNING by dead processes are closed, early failures reach the launched run."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import mlflow
import psutil
import pytest
from mlflow import MlflowClient
from transformers.utils import logging as hf_logging

from pipeline.core import process
from pipeline.core.paths import ROOT
from pipeline.core.secrets import REDACTED
from pipeline.stage.resolve import resolve
from pipeline.tracking import liveness
from pipeline.tracking import runs as tracking

SECRET = "hf_THIS_MUST_NOT_LEAK_42"


def _run_stage(**kwargs):
    out = tempfile.mkdtemp(prefix="zh-align-tracking-")  # the run's log file lies there, not in the repo's outputs/
    r = resolve("sft", hw="cpu", overrides=[("output_dir", out)])
    return r, tracking.start_run("sft", r.as_dict(), hw=r.hw.name, model=r.model.name, **kwargs)


def _artifact_texts(client: MlflowClient, run_id: str) -> dict[str, str]:
    root = Path(client.download_artifacts(run_id, ""))
    return {str(p.relative_to(root)): p.read_text(encoding="utf-8") for p in root.rglob("*") if p.is_file()}


def test_a_standalone_run_carries_config_tags_environment_and_its_log(mlflow_store, caplog):
    caplog.set_level(logging.INFO)
    r, ctx = _run_stage()
    shown = warnings.showwarning
    with ctx as active:
        logging.getLogger("pipeline.sft").info("训练开始 step 1")
        warnings.warn("注意：一个 Python 警告", UserWarning, stacklevel=1)
        hf_logging.get_logger("transformers.trainer").info("***** Running training *****")
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
    log = texts["logs/sft.log"]
    assert "训练开始 step 1" in log and "注意：一个 Python 警告" in log and "transformers.trainer: ***** Running" in log
    assert (Path(r.cfg.output_dir) / "logs" / f"{active.info.run_id}.log").read_text(encoding="utf-8") == log
    assert warnings.showwarning is shown  # Python warnings are captured only while the run is open
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


# ----------------------------------------------------------------------------------------------------------------
# Runs that tell the truth: signals, dead processes, early failures
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def store(module_store, monkeypatch):
    """One sqlite store for the tests below (a fresh one costs seconds of migrations each), an experiment per test."""
    monkeypatch.chdir(module_store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"truth-{time.monotonic_ns()}")
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    yield
    while mlflow.active_run():
        mlflow.end_run()
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_the_run_killed_naming_it_and_stops_the_processes_under_it(store, signum):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # a worker / rank / child stage
    worker = psutil.Process(child.pid)
    with pytest.raises(process.Interrupted) as caught, process.supervised():
        _, ctx = _run_stage()
        with ctx as active:
            os.kill(os.getpid(), signum)
            time.sleep(30)  # the handler raises in this thread long before
    assert caught.value.exit_code == 128 + signum
    run = MlflowClient().get_run(active.info.run_id)
    name = signal.Signals(signum).name
    assert run.info.status == "KILLED" and run.data.tags["error"] == f"killed by {name}"
    assert 'SET="train.resume=auto"' in run.data.tags["killed_reason"]
    assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
    child.wait(timeout=10)


def test_every_run_carries_its_pid_host_heartbeat_and_output_folder(store, tmp_path):
    config = {"config": {"output_dir": str(tmp_path / "out"), "train": {"resume": None}}}
    before = time.time()
    with tracking.start_run("sft", config, hw="cpu", model="tiny-qwen2") as active:
        tracking.heartbeat()
    tags = MlflowClient().get_run(active.info.run_id).data.tags
    assert tags["pid"] == str(os.getpid()) and tags["host"] == process.host()
    assert float(tags["pid.started"]) == pytest.approx(process.started(), abs=1e-3)
    assert before - 1 <= float(tags["heartbeat"]) <= time.time() + 1
    assert tags["output_dir"] == str(tmp_path / "out")


def test_a_stage_closes_runs_of_its_output_folder_left_running_by_dead_processes_only(store, tmp_path):
    client = MlflowClient()
    exp = client.create_experiment(os.environ["MLFLOW_EXPERIMENT_NAME"])
    out = str(tmp_path / "out")
    dead = subprocess.Popen(["true"])
    dead.wait()
    here = {"stage": "sft", "output_dir": out, "host": process.host(), "heartbeat": f"{time.time():.0f}"}
    me = {"pid": str(os.getpid()), "pid.started": f"{process.started():.3f}"}
    stale = f"{time.time() - 2 * liveness.STALE_AFTER_S:.0f}"
    cases = {
        "dead pid": ({**here, "pid": str(dead.pid), "pid.started": "1.0"}, "KILLED"),
        "pid reused by another process": ({**here, **me, "pid.started": "12345.0"}, "KILLED"),
        "live process": ({**here, **me}, "RUNNING"),
        "other host, stale heartbeat": ({**here, "pid": "1", "host": "gpu-box-7", "heartbeat": stale}, "KILLED"),
        "other host, fresh heartbeat": ({**here, "pid": "1", "host": "gpu-box-7"}, "RUNNING"),
        "other output folder": ({**here, "pid": str(dead.pid), "output_dir": str(tmp_path / "elsewhere")}, "RUNNING"),
        "other stage": ({**here, "pid": str(dead.pid), "stage": "align"}, "RUNNING"),
        "no pid (not ours to judge)": ({"stage": "sft", "output_dir": out}, "RUNNING"),
    }
    ids = {name: client.create_run(exp, tags=tags).info.run_id for name, (tags, _) in cases.items()}
    config = {"config": {"output_dir": out, "train": {"resume": None}}}
    with tracking.start_run("sft", config, hw="cpu", model="tiny-qwen2") as active:
        pass
    for name, (_, expected) in cases.items():
        run = client.get_run(ids[name])
        assert run.info.status == expected, name
        if expected == "KILLED":
            reason = run.data.tags["killed_reason"]
            assert f"found by the sft run {active.info.run_id}" in reason and 'SET="train.resume=auto"' in reason
    assert "is gone" in client.get_run(ids["dead pid"]).data.tags["killed_reason"]
    assert "no heartbeat from gpu-box-7 for 30 min" in client.get_run(ids["other host, stale heartbeat"]).data.tags[
        "killed_reason"]


def test_an_early_failure_leaves_error_stage_and_log_on_the_mlflow_run_run(store, monkeypatch, tmp_path,
                                                                              capsys):
    from pipeline import sft

    client = MlflowClient()
    launched = client.create_run(client.create_experiment(os.environ["MLFLOW_EXPERIMENT_NAME"]))  # as `mlflow run`
    monkeypatch.setenv("MLFLOW_RUN_ID", launched.info.run_id)
    assert sft.main(["--hw", "cpu", "--dry-run", "false", "--set", f"data.path={tmp_path / 'no-pool'}"]) == 1
    assert "holds no prepared pool" in capsys.readouterr().err
    run = client.get_run(launched.info.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["stage"] == "sft" and "holds no prepared pool" in run.data.tags["error"]
    assert run.data.tags["pid"] == str(os.getpid())
    log = _artifact_texts(client, launched.info.run_id)["logs/sft.log"]
    assert "error: StageError: `data.path`" in log


def test_a_signal_ignored_at_the_start_stays_ignored_and_the_handlers_come_back():
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        term = signal.getsignal(signal.SIGTERM)
        with process.supervised():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN  # closing the terminal does not stop the stage
            assert signal.getsignal(signal.SIGTERM) is not term
        assert signal.getsignal(signal.SIGTERM) is term
    finally:
        signal.signal(signal.SIGHUP, before)


@pytest.mark.parametrize("given", [None, "0"])
def test_a_progress_bar_into_a_log_file_redraws_a_few_times_not_ten_a_second(given):
    """Every entry point's setup_logging, stderr not a terminal: tqdm redraws at most every 30 s (a 1.5 s loop: its
    first and last frames); a TQDM_MININTERVAL the user set is kept (0: every step)."""
    probe = ("import time; from pipeline.stage import cli; cli.setup_logging(); from tqdm import tqdm\n"
             "for _ in tqdm(range(30), desc='demo'): time.sleep(0.05)")
    env = {k: v for k, v in os.environ.items() if k != "TQDM_MININTERVAL"} | ({"TQDM_MININTERVAL": given} if given else {})
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, timeout=60)
    frames = [f for f in done.stderr.decode("utf-8").split("\r") if f.startswith("demo")]  # bytes: keep the \r
    assert done.returncode == 0 and frames[-1].startswith("demo: 100%")
    assert len(frames) <= 3 if given is None else len(frames) >= 20
