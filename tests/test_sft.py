"""The sft stage on the tiny model (CPU, offline): loss falls, assistant-only labels, the sampler's order, metrics
and the registered adapter in MLflow, and the errors that must come before any loading (resume: test_resume.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import pytest

from pipeline import sft
from pipeline.core.strict import parse_overrides
from pipeline.data import prepared
from pipeline.stage.resolve import resolve

FAST = ["hw.micro_batch=4", "hw.grad_accum=1", "train.logging_steps=1"]


def resolved(pool: Path, out: Path, *sets: str):
    return resolve("sft", hw="cpu", overrides=parse_overrides([f"data.path={pool}", f"output_dir={out}", *FAST, *sets]))


def test_the_ordered_dataset_holds_the_zh_share(pool, tmp_path):
    r = resolved(pool, tmp_path)
    p = prepared.load_pool(r.cfg.data, "sft", r)
    rows, report = prepared.order(p, 1.5)
    tokens = sum(p.train[i]["n_tokens"] for i in rows)
    zh = sum(p.train[i]["n_tokens"] for i in rows if p.train[i]["lang"] == "zh")
    assert zh / tokens >= 0.7 and report["zh_share"] == pytest.approx(zh / tokens, abs=1e-3)
    assert tokens == pytest.approx(1.5 * sum(x["n_tokens"] for x in p.train), rel=0.1)  # 1.5 epochs laid out


def test_labels_cover_only_the_assistant_answers_and_their_end_token(pool, tmp_path):
    r = resolved(pool, tmp_path)
    p = prepared.load_pool(r.cfg.data, "sft", r)
    trainer, tok = sft.build_trainer(r, p, list(range(4)), tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    row = p.train[0]
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    learned = tok.decode(ids[labels != -100])
    answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
    assert learned == "".join(f"{a}<|im_end|>" for a in answers) or learned.replace("\n", "") == \
        "".join(f"{a}<|im_end|>" for a in answers).replace("\n", "")
    assert "你是一个乐于助人" in tok.decode(ids)  # the model's Chinese system prompt was added …
    assert "你是一个乐于助人" not in learned  # … and is not learned


def test_loss_falls_clearly_over_twenty_steps_on_a_small_repeated_set(pool, tmp_path):
    r = resolved(pool, tmp_path, "train.max_steps=20", "train.lr=2e-2", "train.warmup_ratio=0.0",
                 "train.eval_steps=100", "train.save_steps=100")
    p = prepared.load_pool(r.cfg.data, "sft", r)
    trainer, _ = sft.build_trainer(r, p, [0, 1, 2, 3] * 20, tmp_path)  # four conversations, one batch, seen 20 times
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 20 and sum(losses[-3:]) / 3 < 0.75 * sum(losses[:3]) / 3, losses


def test_checkpoint_layers_recomputes_only_the_first_layers_and_learns_the_same(pool, tmp_path):
    """hw.checkpoint_layers=1 of the tiny model's 2 layers: layer 0 recomputes, layer 1 keeps its activations, and
    the losses are those of checkpointing both (recomputation changes memory, not the numbers)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    losses = {}
    for k in ("1", "null"):
        r = resolved(pool, tmp_path / k, "train.max_steps=3", "train.save_steps=100", "train.eval_steps=100",
                     "hw.activation_checkpointing=true", f"hw.checkpoint_layers={k}")
        p = prepared.load_pool(r.cfg.data, "sft", r)
        trainer, _ = sft.build_trainer(r, p, list(range(12)), tmp_path / k)
        trainer.train()
        blocks = [m for m in trainer.model.modules() if isinstance(m, GradientCheckpointingLayer)]
        assert [b.gradient_checkpointing for b in blocks] == ([True, False] if k == "1" else [True, True])
        losses[k] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses["1"] == pytest.approx(losses["null"], rel=1e-5)


def test_a_run_logs_its_metrics_and_registers_the_adapter(pool, tmp_path, mlflow_store):
    r = resolved(pool, tmp_path / "out", "train.max_steps=4", "train.eval_steps=2", "train.save_steps=2")
    result = sft.run(r)
    client = mlflow.MlflowClient()
    run = client.search_runs([client.get_experiment_by_name("zh-align-test").experiment_id])[0]
    assert run.info.status == "FINISHED"
    for key in ("loss", "grad_norm", "learning_rate", "tokens_per_second", "epoch", "eval_loss"):
        assert key in run.data.metrics, key
    manifest = json.loads((pool / "manifest.json").read_text(encoding="utf-8"))
    assert run.data.params["data.sha256"] == manifest["outputs"]["sft.jsonl"]["sha256"]
    assert run.data.tags["licence.noncommercial"] == "true"
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "generations.json" in arts
    version = client.get_model_version_by_alias("zh-align-sft", "candidate")
    assert version.run_id == run.info.run_id and version.tags["hw"] == "cpu"
    assert version.tags["data.sha256"] == manifest["outputs"]["sft.jsonl"]["sha256"] and version.tags["final_loss"]
    config = json.loads((Path(result.adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["base_model_name_or_path"]  # the registered copy is checked for absolute paths in test_registry
    log = tmp_path / "out" / "logs" / f"{run.info.run_id}.log"  # the run's full log beside its checkpoints
    text = log.read_text(encoding="utf-8")
    for line in ("INFO transformers.trainer: ***** Running training *****", "pipeline.trainer_logs: step 4/4",
                 '"eval_loss"', '"train_runtime"', "sft trained 4 steps", "sft registered models:/zh-align-sft@"):
        assert line in text, line
    assert mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/logs/sft.log") == text
    model = mlflow.pyfunc.load_model("models:/zh-align-sft@candidate")
    out = model.predict({"prompt": ["你好，请介绍一下你自己。"]})
    assert len(out) == 1 and isinstance(out[0], str)


@pytest.mark.parametrize("sets,message", [
    ([], "profile 4090 needs a CUDA GPU and this machine has none"),
    (["hw.qlora=true"], "turns QLoRA on, which needs a CUDA GPU"),
])
def test_cuda_profiles_are_refused_before_loading_on_a_cpu_machine(pool, tmp_path, sets, message, capsys,
                                                                   mlflow_store):
    args = ["--hw", "4090", "--dry-run", "false", "--set", f"data.path={pool}", "--set", f"output_dir={tmp_path}"]
    assert sft.main(args + [x for s in sets for x in ("--set", s)]) == 1
    assert message in capsys.readouterr().err


def test_a_missing_pool_is_named(tmp_path, capsys, mlflow_store):
    assert sft.main(["--hw", "cpu", "--dry-run", "false", "--set", f"data.path={tmp_path / 'nowhere'}"]) == 1
    err = capsys.readouterr().err
    assert "nowhere" in err and "make prepare" in err


def test_the_dry_run_names_the_data_and_the_registered_model(capsys):
    assert sft.main(["--hw", "4090"]) == 0
    page = capsys.readouterr().out
    assert "outputs/data/default/{sft.jsonl,sft_eval.jsonl,manifest.json}" in page and "zh-align-sft@candidate" in page
    assert "assistant tokens only" in page


def _table(page: str, title: str) -> list[str]:
    """The lines of one titled block of a dry-run page (indented under its title)."""
    lines = page.splitlines()
    start = lines.index(f"  {title}") + 1
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("    "))
    return [line.strip() for line in lines[start:end]]


def test_the_dry_run_shows_the_sampling_plan_and_the_probe_prompts(pool, capsys):
    assert sft.main(["--hw", "cpu", "--set", f"data.path={pool}", "--set", "train.epochs=1"]) == 0
    block = _table(capsys.readouterr().out, "sampling plan")
    report = json.loads((pool / "manifest.json").read_text(encoding="utf-8"))["mix_epoch0"]["sft"]  # as prepare reported it
    assert f"1 epochs: {report['rows']} rows, {report['tokens']} tokens, zh share {report['zh_share']:.3f}" in block[1]
    cells = [line.split() for line in block[3:] if not line.startswith(("total", "zh share", "repeats"))]
    assert len(cells) >= 3 and {c[1] for c in cells} == {"zh", "en"}
    for source, want in report["sources"].items():  # the (source, lang) lines add up to the sampler's per-source sums
        alls = [c[-1].split("·") for c in cells if c[0] == source]
        assert [sum(int(a[0]) for a in alls), sum(int(a[1]) for a in alls)] == [want["rows"], want["tokens"]], source
    total = next(line for line in block if line.startswith("total")).split()[1:]
    assert total == [*(f"{b['rows']}·{b['tokens']}" for b in report["buckets"]), f"{report['rows']}·{report['tokens']}"]
    stages = next(line for line in block if line.startswith("zh share per curriculum stage"))
    assert all(f"until {st['until']:g}: {st['zh_share']:.3f}" in stages for st in report["stages"])
    assert sft.main(["--hw", "cpu", "--set", f"data.path={pool}"]) == 0  # 1.5 epochs: as training orders them
    r = resolved(pool, pool)
    _, whole = prepared.order(prepared.load_pool(r.cfg.data, "sft", r), 1.5)
    page = capsys.readouterr().out
    assert f"1.5 epochs: {whole['rows']} rows, {whole['tokens']} tokens" in page
    probes = _table(page, "generation probes")
    assert "zh: 请用三句话介绍一下长城。" in probes and "en: Give three tips for writing clear code." in probes


def test_without_a_pool_the_dry_run_says_when_the_plan_appears(tmp_path, capsys):
    assert sft.main(["--hw", "cpu", "--set", f"data.path={tmp_path / 'nowhere'}"]) == 0
    assert _table(capsys.readouterr().out, "sampling plan") == [
        "(appears once the prepared pool exists: `make prepare HW=cpu DRY_RUN=0`)"]


def test_ddp_on_two_cpu_processes_logs_one_run_from_rank_0(pool, tmp_path):
    import subprocess
    import sys

    from pipeline.core.paths import ROOT

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "MLFLOW_EXPERIMENT_NAME": "ddp"}
    env.pop("MLFLOW_RUN_ID", None)
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    args = ["--hw", "cpu", "--dry-run", "false", "--accel", "ddp", "--set", f"data.path={pool}",
            "--set", f"output_dir={tmp_path / 'out'}", "--set", "train.max_steps=2", "--set", "register.name=zh-align-ddp",
            *(x for s in FAST for x in ("--set", s))]
    done = subprocess.run([sys.executable, "-m", "pipeline.sft", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["train.world_size"] == "2"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == [1, 2]  # once, from rank 0
    assert str(client.get_model_version_by_alias("zh-align-ddp", "candidate").version) == "1"


def test_a_prepare_run_id_finds_its_pool_and_a_wrong_one_is_named(pool, monkeypatch):
    from pipeline.core.errors import StageError
    from pipeline.tracking.lineage import prepared_folder

    uri = f"sqlite:///{pool.parent / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    prepared = next(r for r in runs if r.data.tags.get("stage") == "prepare")
    assert prepared_folder(prepared.info.run_id).resolve() == pool.resolve()
    with pytest.raises(StageError, match="`data.run_id` '0{32}' is not a run"):
        prepared_folder("0" * 32)
