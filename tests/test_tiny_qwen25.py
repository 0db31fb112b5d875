"""tiny-qwen2.5: tiny layers on Qwen2.5's real tokenizer and padded vocabulary, through prepare and sft on the CPU;
the sft run carries MLflow's system metrics (CPU, memory) beside its loss."""

from __future__ import annotations

import json

import mlflow
import pytest

from pipeline import prepare, sft
from pipeline.core.profiles import load_model
from pipeline.core.strict import parse_overrides
from pipeline.models.loading import load_tokenizer
from pipeline.stage.resolve import resolve

ZH = "你好，世界！"


@pytest.fixture(scope="module")
def trained(module_store):
    """prepare and 3 sft steps on tiny-qwen2.5 (micro-batch 1 × 512 tokens keeps the 152k-vocabulary logits small)."""
    tmp = module_store
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # MLflow's default (10 s) outlasts this short run
    common = ["model=tiny-qwen2.5", "hw.max_length=512"]
    args = ["--hw", "cpu", "--dry-run", "false", *(x for s in [*common, f"output_dir={tmp / 'data'}"]
                                                   for x in ("--set", s))]
    assert prepare.main(args) == 0
    r = resolve("sft", hw="cpu", overrides=parse_overrides([
        *common, f"data.path={tmp / 'data'}", f"output_dir={tmp / 'sft'}", "train.max_steps=3", "hw.micro_batch=1",
        "hw.grad_accum=1", "train.logging_steps=1", "train.eval_steps=100", "train.save_steps=100",
        "register.name=zh-align-sft-q25"]))
    result = sft.run(r)
    mp.undo()
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("zh-align-module").experiment_id])
    return {"tmp": tmp, "result": result, "runs": {x.data.tags["stage"]: x for x in runs}, "client": client}


def test_the_model_has_qwen25s_tokenizer_and_padded_vocabulary():
    from transformers import AutoConfig

    from pipeline.models.loading import base_model_path

    model = load_model("tiny-qwen2.5")
    tok = load_tokenizer(model)
    config = AutoConfig.from_pretrained(base_model_path(model)[0])
    assert (len(tok), config.vocab_size, config.num_hidden_layers) == (151665, 151936, 2)
    assert tok(ZH, add_special_tokens=False)["input_ids"] == [108386, 3837, 99489, 6313]
    assert (tok.eos_token_id, tok.pad_token_id) == (151645, 151643)


def test_prepare_counts_qwen25_tokens(trained):
    tok = load_tokenizer(load_model("tiny-qwen2.5"))
    manifest = json.loads((trained["tmp"] / "data" / "manifest.json").read_text(encoding="utf-8"))
    assert "tiny-qwen2.5" in json.dumps(manifest, ensure_ascii=False)
    row = json.loads((trained["tmp"] / "data" / "sft.jsonl").read_text(encoding="utf-8").splitlines()[0])
    rendered = tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
    assert abs(row["n_tokens"] - len(rendered)) <= 40, (row["n_tokens"], len(rendered))  # a system prompt at most
    assert trained["runs"]["prepare"].info.status == "FINISHED"


def test_sft_trains_and_registers_on_the_real_vocabulary(trained):
    run = trained["runs"]["sft"]
    assert run.info.status == "FINISHED" and trained["result"].steps == 3
    history = trained["client"].get_metric_history(run.info.run_id, "loss")
    assert len(history) == 3 and all(10.0 < m.value < 13.0 for m in history)  # ≈ ln(151 936) = 11.9 at random init
    version = trained["client"].get_model_version_by_alias("zh-align-sft-q25", "candidate")
    assert version.run_id == run.info.run_id and version.tags["base_model"].startswith("tiny-qwen2.5")


def test_the_training_run_logs_system_metrics(trained):
    metrics = trained["runs"]["sft"].data.metrics
    system = {k for k in metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, sorted(system)
    assert metrics["system/system_memory_usage_megabytes"] > 0
    assert not any(k.startswith("system/") for k in trained["runs"]["prepare"].data.metrics)  # training and eval only


def test_datasets_fingerprints_the_tokenizer_by_digest():
    """The trainers' dataset maps fingerprint Qwen2.5's tokenizer by a digest of what it does (not a 2 s pickle):
    the same for an equal tokenizer, different when the chat template changes, untouched by runtime truncation."""
    from datasets.fingerprint import Hasher

    from pipeline.training.trainer import quick_tokenizer_hash

    model = load_model("tiny-qwen2.5")
    tok, same, other = load_tokenizer(model), load_tokenizer(model), load_tokenizer(model)
    other.chat_template += "\n"
    quick_tokenizer_hash(tok)
    first = Hasher.hash(tok)
    assert Hasher.hash(same) == first and Hasher.hash(other) != first
    tok.backend_tokenizer.enable_truncation(max_length=7)
    assert Hasher.hash(tok) == first and tok.backend_tokenizer.truncation["max_length"] == 7
