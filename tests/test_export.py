"""The export stage on the tiny model: the merge is exact, the folder carries the zh system prompt and a model card,
and the registered merged model round-trips (register → alias → pull → load → the same logits)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch

from pipeline import align, export, prepare, sft
from pipeline.core.profiles import load_model
from pipeline.core.strict import parse_overrides
from pipeline.stage.resolve import resolve
from pipeline.training.probes import probe_inputs

FAST = ["hw.micro_batch=4", "hw.grad_accum=1", "train.logging_steps=1", "train.eval_steps=100", "train.save_steps=100"]


@pytest.fixture(scope="module")
def exported(module_store):
    """prepare → sft → orpo → export on the tiny model, in this module's own MLflow store."""
    tmp = module_store
    assert prepare.main(["--hw", "cpu", "--dry-run", "false", "--set", f"output_dir={tmp / 'data'}"]) == 0
    common = [f"data.path={tmp / 'data'}", "train.max_steps=3", "train.lr=1e-2", *FAST]
    sft.run(resolve("sft", hw="cpu", overrides=parse_overrides([*common, f"output_dir={tmp / 'sft'}"])))
    align.run(resolve("align", hw="cpu", variant="orpo", overrides=parse_overrides([*common, f"output_dir={tmp / 'orpo'}"])))
    result = export.run(resolve("export", hw="cpu", overrides=parse_overrides([f"output_dir={tmp / 'merged'}"])))
    return {"tmp": tmp, "out": tmp / "merged", "result": result}


def logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = probe_inputs(tokenizer, load_model("tiny-qwen2").system_prompt)
    with torch.no_grad():
        return model(**batch).logits


def test_the_merge_matches_the_adapter_and_the_folder_is_complete(exported):
    assert exported["result"].max_logit_diff <= 1e-4
    out = exported["out"]
    written = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"} <= written
    template = (out / "chat_template.jinja").read_text(encoding="utf-8")
    assert "你是一个乐于助人" in template and "You are Qwen" not in template  # the zh default system prompt
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "models:/zh-align-orpo/" in card and "licence.noncommercial=true" in card


def test_the_registered_merged_model_pulls_and_loads_with_the_same_logits(exported):
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("zh-align-merged", "candidate")
    assert version.tags["adapter"].startswith("models:/zh-align-orpo/") and version.tags["data.sha256"]
    assert float(version.tags["merge.max_abs_logit_diff"]) <= 1e-4
    pulled = Path(mlflow.artifacts.download_artifacts("models:/zh-align-merged@candidate",
                                                      dst_path=str(exported["tmp"] / "pulled")))
    folder = next(p.parent for p in pulled.rglob("config.json") if (p.parent / "model.safetensors").exists())
    assert torch.allclose(logits(folder), logits(exported["out"]), atol=1e-6)
    out = mlflow.pyfunc.load_model("models:/zh-align-merged@candidate").predict({"prompt": ["你好"]})
    assert len(out) == 1 and isinstance(out[0], str)


def test_an_adapter_of_another_base_exports_on_it_or_is_refused_naming_both(tmp_path, mlflow_store, capsys):
    """No model named: the export takes the adapter's recorded base (the plan shows it); a named model that is not
    the adapter's base is refused before anything loads."""
    import json

    from pipeline.core.errors import ConfigError

    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "Qwen/Qwen2.5-7B-Instruct"}))
    assert export.main(["--hw", "cpu", "--set", f"adapter={tmp_path}"]) == 0
    assert "base model: Qwen/Qwen2.5-7B-Instruct @ " in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"adapter of base 'Qwen/Qwen2.5-7B-Instruct', but this export's model is tiny"):
        export.run(resolve("export", hw="cpu", overrides=parse_overrides([f"adapter={tmp_path}", "model=tiny-qwen2"])))


def test_pull_gives_a_folder_transformers_loads_and_refuses_a_full_dest(exported, capsys):
    from pipeline import registry

    dest = exported["tmp"] / "pulled-merged"
    assert registry.main(["pull", "--model", "zh-align-merged@candidate", "--dest", str(dest)]) == 0
    assert torch.allclose(logits(dest), logits(exported["out"]), atol=1e-6)
    assert registry.main(["pull", "--model", "zh-align-merged@candidate", "--dest", str(dest)]) == 2
    assert "is not empty; pass OVERWRITE=1" in capsys.readouterr().err
    assert registry.main(["pull", "--model", "zh-align-merged@nope", "--dest", str(dest), "--overwrite"]) == 2
    assert "aliases of zh-align-merged: candidate" in capsys.readouterr().err


def test_promote_refuses_a_failed_gate_unless_forced(exported, capsys):
    from pipeline import registry

    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("zh-align-merged", "candidate").version
    client.set_model_version_tag("zh-align-merged", version, "eval.gate", "fail")
    args = ["promote", "--model", "zh-align-merged", "--version", str(version), "--alias", "champion"]
    assert registry.main(args) == 1
    assert "failed its evaluation gate" in capsys.readouterr().err
    assert registry.main([*args, "--force"]) == 0
    assert client.get_model_version_by_alias("zh-align-merged", "champion").version == version
