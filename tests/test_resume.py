"""Kill and resume on the tiny model (CPU, offline): a real `python -m pipeline.sft` killed with SIGKILL after a
checkpoint continues with `train.resume=auto` to the adapter an uninterrupted run makes, bit for bit; a checkpoint a
kill cut short is skipped; a checkpoint written under other settings is refused naming each difference; a stage whose
launcher is killed stops itself, its run KILLED, no process left; a pipeline resumed after a killed child continues it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest

from pipeline import align, prepare, sft
from pipeline import pipeline as chain_stage
from pipeline.core.errors import ConfigError, StageError
from pipeline.core.paths import ROOT
from pipeline.core.process import host, started
from pipeline.core.strict import parse_overrides
from pipeline.stage.resolve import resolve
from pipeline.tracking import lineage
from pipeline.training import checkpoints

SETS = ["hw.micro_batch=4", "hw.grad_accum=1", "train.logging_steps=1", "train.max_steps=8", "train.save_steps=2",
        "train.eval_steps=100", "register.name=zh-align-resume"]


@pytest.fixture(scope="module")
def work(module_store) -> Path:
    mp = pytest.MonkeyPatch()
    mp.chdir(module_store)  # the store's artifacts (./mlruns) land beside it
    yield module_store
    mp.undo()


@pytest.fixture(scope="module")
def pool(work) -> Path:
    assert prepare.main(["--hw", "cpu", "--dry-run", "false", "--set", f"output_dir={work / 'data'}"]) == 0
    return work / "data"


def args(pool: Path, out: Path, *sets: str) -> list[str]:
    return [x for s in [f"data.path={pool}", f"output_dir={out}", *SETS, *sets] for x in ("--set", s)]


def resolved(pool: Path, out: Path, *sets: str):
    return resolve("sft", hw="cpu", overrides=parse_overrides([f"data.path={pool}", f"output_dir={out}", *SETS, *sets]))


@pytest.fixture(scope="module")
def reference(pool, work) -> Path:
    """One uninterrupted run: its output folder (adapter + the last two checkpoints)."""
    sft.run(resolved(pool, work / "whole"))
    return work / "whole"


def stage_process(argv: list[str], cwd: Path, log: Path, launcher: bool = False) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pipeline.sft", "--hw", "cpu", "--dry-run", "false", *argv]
    if launcher:  # a launcher between us and the stage, as `make` / `mlflow run` are (`; exit` keeps bash alive)
        cmd = ["bash", "-c", " ".join(f"'{c}'" for c in cmd) + "; exit $?"]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_for(check, proc: subprocess.Popen, log: Path, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        assert proc.poll() is None, f"the stage ended before it could be killed:\n{log.read_text()[-3000:]}"
        time.sleep(0.02)
    raise AssertionError(f"timed out:\n{log.read_text()[-3000:]}")


def runs_of(pid: int) -> list:
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("zh-align-module")
    return client.search_runs([exp.experiment_id], f"tags.pid = '{pid}'") if exp else []


def tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def test_sigkill_after_a_checkpoint_then_resume_auto_gives_the_uninterrupted_adapter(pool, reference, work):
    out = work / "killed"
    log = work / "killed.log"
    proc = stage_process(args(pool, out), work, log)
    wait_for(lambda: (out / "checkpoint-2" / "trainer_state.json").exists(), proc, log)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter").exists()  # cut short: no final adapter
    (killed,) = runs_of(proc.pid)
    assert killed.info.status == "RUNNING"  # what a kill -9 leaves: the run cannot say it died …

    result = sft.run(resolved(pool, out, "train.resume=auto"))

    client = mlflow.MlflowClient()
    after = client.get_run(killed.info.run_id)  # … until the next start of the stage on this output folder
    assert after.info.status == "KILLED"
    assert f"its process {proc.pid}" in after.data.tags["killed_reason"]
    assert 'SET="train.resume=auto"' in after.data.tags["killed_reason"]
    resumed = client.search_runs([killed.info.experiment_id], "tags.resumed_from_run != ''")
    (resumed,) = [r for r in resumed if r.data.tags["output_dir"] == str(out)]
    assert resumed.data.tags["resumed_from_run"] == killed.info.run_id
    continued = Path(resumed.data.tags["resumed_from_checkpoint"])
    assert continued.parent == out and int(continued.name.split("-")[1]) >= 2
    assert result.steps == 8
    a, b = tensors(reference / "adapter"), tensors(Path(result.adapter))
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and (a[k] == b[k]).all() for k in a), \
        "the resumed adapter differs from the uninterrupted one"
    assert (reference / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (Path(result.adapter) / "adapter_model.safetensors").read_bytes()


def _cut(folder: Path, damage: str) -> None:
    name, how = damage.split(":")
    path = folder / name
    if how == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage,problem", [
    ("trainer_state.json:missing", "no trainer_state.json"),
    ("trainer_state.json:truncated", "trainer_state.json is unreadable"),
    ("adapter_model.safetensors:truncated", "adapter_model.safetensors is truncated"),
    ("adapter_model.safetensors:missing", "no weights (*.safetensors)"),
    ("optimizer.pt:truncated", "optimizer.pt is truncated"),
    ("scheduler.pt:missing", "no scheduler.pt"),
    ("rng_state.pth:truncated", "rng_state.pth is truncated"),
])
def test_a_checkpoint_cut_short_is_skipped_for_the_previous_whole_one(reference, tmp_path, damage, problem, caplog):
    out = tmp_path / "out"
    for ck in ("checkpoint-6", "checkpoint-8"):
        shutil.copytree(reference / ck, out / ck)
    _cut(out / "checkpoint-8", damage)
    assert checkpoints.choose(out, "auto") == out / "checkpoint-6"
    assert f"skipping {out / 'checkpoint-8'}: {problem}" in caplog.text
    with pytest.raises(StageError, match=re.escape(f"is not a whole checkpoint: {problem}") + ".*; use an older one"):
        checkpoints.choose(out, str(out / "checkpoint-8"))


def test_the_dry_run_checks_the_resume_path(pool, tmp_path, capsys):
    bad = tmp_path / "checkpoint-4"
    bad.mkdir()
    assert sft.main([*args(pool, tmp_path, f"train.resume={bad}"), "--check"]) == 2
    assert "is not a whole checkpoint: no trainer_state.json" in capsys.readouterr().err
    assert sft.main([*args(pool, tmp_path, f"train.resume={tmp_path / 'nowhere'}"), "--check"]) == 2
    assert "is not a checkpoint folder" in capsys.readouterr().err


def test_a_checkpoint_written_under_other_settings_is_refused_naming_each_difference(pool, reference, tmp_path,
                                                                                      capsys):
    out = tmp_path / "out"
    shutil.copytree(reference / "checkpoint-8", out / "checkpoint-8")
    argv = ["--hw", "cpu", "--dry-run", "false", *args(pool, out, "train.resume=auto", "train.lr=1e-3", "lora.r=8")]
    assert sft.main(argv) == 1
    err = capsys.readouterr().err
    assert "checkpoint-8 was written under other settings than this run's" in err
    assert "config.train.lr: 0.0002 → 0.001" in err and "config.lora.r: 16 → 8" in err
    assert "train.resume=null" in err
    fp = json.loads((out / "checkpoint-8" / checkpoints.FINGERPRINT).read_text(encoding="utf-8"))
    assert fp["run_id"] and fp["settings"]["data.sha256"]  # the run that wrote it, the pool it read


def test_align_fingerprints_name_the_start_point_and_its_own_keys(pool):
    manifest = pool / "manifest.json"
    a = resolve("align", hw="cpu", overrides=parse_overrides([f"data.path={pool}"]))
    b = resolve("align", hw="cpu", overrides=parse_overrides([f"data.path={pool}", "beta=0.5", "train.resume=auto",
                                                              "register.alias=other"]))
    old = checkpoints.fingerprint(a.as_dict(), pool_sha256="p", manifest=manifest, start="models:/zh-align-sft/1")
    new = checkpoints.fingerprint(b.as_dict(), pool_sha256="p", manifest=manifest, start="models:/zh-align-sft/2")
    assert checkpoints.differences(old, new) == ["config.beta: 0.2 → 0.5",
                                                 'start_from: "models:/zh-align-sft/1" → "models:/zh-align-sft/2"']
    assert align.STAGE.name == "align"


def test_a_stage_whose_launcher_is_killed_stops_its_run_killed_and_leaves_no_process(pool, work):
    out = work / "orphan"
    log = work / "orphan.log"
    launcher = stage_process(args(pool, out, "train.max_steps=500"), work, log, launcher=True)
    stage = wait_for(lambda: next(iter(psutil.Process(launcher.pid).children()), None), launcher, log)
    wait_for(lambda: runs_of(stage.pid), launcher, log)
    tree = [stage, *stage.children(recursive=True)]
    os.kill(launcher.pid, signal.SIGKILL)  # as `make` or `mlflow run` killed with kill -9
    launcher.wait()
    _, alive = psutil.wait_procs(tree, timeout=120)
    assert not alive, f"left running: {alive}\n{log.read_text()[-3000:]}"
    (run,) = runs_of(stage.pid)
    assert run.info.status == "KILLED", log.read_text()[-3000:]
    assert run.data.tags["error"] == f"killed by SIGTERM (its launcher, pid {launcher.pid}, is gone)"
    assert 'SET="train.resume=auto"' in run.data.tags["killed_reason"]
    assert "logs/sft.log" in {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "logs")}


def test_a_pipeline_resumed_after_a_killed_child_continues_it_and_refuses_a_live_one(work):
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("zh-align-module").experiment_id
    dead = subprocess.Popen(["true"])
    dead.wait()
    me = {"pid": str(os.getpid()), "pid.started": f"{started():.3f}", "host": host()}
    params = {"hw": "cpu", "dry_run": "false", "overrides": "data.run_id=p1", "accel": ""}
    for pid_tags, expect in ((dict(me, pid=str(dead.pid)), "KILLED"), (me, None)):
        parent = client.create_run(exp, tags={"stage": "pipeline"})
        child = client.create_run(exp, tags={"stage": "sft", **pid_tags})
        for k, v in params.items():
            client.log_param(child.info.run_id, k, v)
        client.set_tag(parent.info.run_id, "child.sft", child.info.run_id)
        if expect is None:  # a child still training in another process is not raced
            with pytest.raises(StageError, match="its sft child .* is still running"):
                lineage.pipeline_children(parent.info.run_id)
            continue
        found = lineage.pipeline_children(parent.info.run_id)["sft"]
        assert found["status"] == "KILLED"
        assert chain_stage.continuable(found, params, sft.STAGE)
        assert not chain_stage.continuable(found, {**params, "overrides": "data.run_id=p2"}, sft.STAGE)
        assert not chain_stage.continuable(found, params, prepare.STAGE)  # prepare has no checkpoints
        assert chain_stage.reusable(found, params, "sha") is None
    c = chain_stage.chain("cpu", [], {})
    assert c.parameters("sft", {"prepare": "p1"}, chain_stage.RESUME_TRAINING)["overrides"].split() == \
        ["data.run_id=p1", "train.resume=auto"]
    with pytest.raises(ConfigError):
        checkpoints.planned(str(work), str(work / "nowhere"))


def test_align_cut_short_after_a_checkpoint_resumes_to_the_uninterrupted_adapter(pool, reference, work):
    """align shares sft's resume: ORPO from the reference's SFT adapter, continued from its step-2 checkpoint."""
    def run(out: Path, *sets: str):
        return align.run(resolve("align", hw="cpu", variant="orpo", overrides=parse_overrides([
            f"data.path={pool}", f"output_dir={out}", f"start_from={reference / 'adapter'}", "hw.micro_batch=2",
            "hw.grad_accum=1", "train.max_steps=4", "train.save_steps=2", "train.eval_steps=100",
            "register.name=zh-align-resume-orpo", *sets])))

    whole = run(work / "align-whole")
    shutil.copytree(work / "align-whole" / "checkpoint-2", work / "align-cut" / "checkpoint-2")  # as a kill leaves it
    resumed = run(work / "align-cut", "train.resume=auto")
    a, b = tensors(Path(whole.adapter)), tensors(Path(resumed.adapter))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    with pytest.raises(StageError, match=r"start_from: .* → .*"):  # another start point is other settings
        run(work / "align-cut", "train.resume=auto", f"start_from={work / 'align-whole' / 'adapter'}")
