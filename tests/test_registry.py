"""A LoRA adapter registered as a pyfunc model: versions, tags, alias, load by alias, generation with the adapter."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from pipeline.core.profiles import load_model
from pipeline.models.loading import load_tokenizer
from pipeline.models.tiny import tiny_model_dir
from pipeline.tracking import model_registry, runs

NAME, ALIAS = "zh-align-sft-test", "candidate"
PROMPT = "你好，请介绍一下你自己。"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A tiny Qwen2 with a LoRA whose B weights are perturbed (seeded), saved with the tokenizer; and the PeftModel."""
    model = load_model("tiny-qwen2")
    base_dir = tiny_model_dir(model)
    net = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pname, param in peft.named_parameters():
            if "lora_B" in pname:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    out = tmp_path_factory.mktemp("adapter") / "sft-adapter"
    peft.save_pretrained(out)
    load_tokenizer(model).save_pretrained(out)
    return model, base_dir, out, peft.eval()


def _greedy(peft, tokenizer, system_prompt: str, max_new_tokens: int = 64) -> str:
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": PROMPT}]
    batch = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        ids = peft.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(ids[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _register(adapter_dir: Path, base_dir: Path, model, **tags) -> dict:
    with runs.start_run("sft", {"model": model.name}, hw="cpu", model=model.name) as run:
        info = model_registry.log_adapter_model(adapter_dir, registered_name=NAME, alias=ALIAS, base_model=str(base_dir),
                                          revision=None, system_prompt=model.system_prompt,
                                          tags={"run_id": run.info.run_id, **tags})
    return info


def test_the_adapter_is_registered_aliased_and_generates(mlflow_store, adapter):
    model, base_dir, adapter_dir, peft = adapter
    original = (adapter_dir / "adapter_config.json").read_text(encoding="utf-8")
    assert str(base_dir) in original  # PEFT recorded the absolute local path: the case to rewrite

    info = _register(adapter_dir, base_dir, model, stage="sft")
    client = MlflowClient()
    assert (info["name"], info["version"], info["uri"]) == (NAME, 1, f"models:/{NAME}@{ALIAS}")
    v1 = client.get_model_version(NAME, "1")
    assert v1.tags["stage"] == "sft" and v1.tags["base_model"] == base_dir.name and v1.tags["revision"] == "none"
    assert v1.tags["run_id"] == v1.run_id
    assert int(client.get_model_version_by_alias(NAME, ALIAS).version) == 1
    assert (adapter_dir / "adapter_config.json").read_text(encoding="utf-8") == original  # caller's folder untouched

    local = Path(mlflow.artifacts.download_artifacts(info["uri"]))
    (logged,) = local.rglob("adapter_config.json")
    assert json.loads(logged.read_text(encoding="utf-8"))["base_model_name_or_path"] == base_dir.name
    texts = [p.read_text(encoding="utf-8") for p in logged.parent.iterdir() if p.suffix in (".json", ".md", ".jinja")]
    assert len(texts) >= 4 and not any(str(base_dir) in text for text in texts)  # config, model card, tokenizer
    assert not list(local.rglob("checkpoint-*"))

    loaded = mlflow.pyfunc.load_model(info["uri"])
    impl = loaded.unwrap_python_model()
    assert impl.system_prompt == model.system_prompt  # the zh prompt survives the MLmodel round trip
    (text,) = loaded.predict({"prompt": [PROMPT]})
    assert text and text == _greedy(peft, impl.tokenizer, model.system_prompt)
    with peft.disable_adapter():
        base_text = _greedy(peft, impl.tokenizer, model.system_prompt)
    assert text != base_text  # the registered adapter, not a re-initialised one, drives generation

    batch = impl.tokenizer(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        with_adapter = impl.model(**batch).logits
        with impl.model.disable_adapter():
            without = impl.model(**batch).logits
    assert not torch.allclose(with_adapter, without, atol=1e-4)

    same = loaded.predict({"messages": [{"role": "user", "content": PROMPT}]})  # a conversation without a system turn
    assert same == [text]
    assert loaded.predict({"prompt": [PROMPT, PROMPT]}) == [text, text]  # batched (left-padded) = one at a time


def test_a_second_registration_moves_the_alias_and_load_time_config_overrides(mlflow_store, adapter):
    model, base_dir, adapter_dir, peft = adapter
    _register(adapter_dir, base_dir, model)
    info = _register(adapter_dir, base_dir, model, note="second")
    client = MlflowClient()
    assert info["version"] == 2
    assert int(client.get_model_version_by_alias(NAME, ALIAS).version) == 2
    assert "note" not in client.get_model_version(NAME, "1").tags
    assert client.get_model_version(NAME, "2").tags["note"] == "second"

    short = mlflow.pyfunc.load_model(info["uri"], model_config={"max_new_tokens": 3})
    impl = short.unwrap_python_model()
    assert impl.max_new_tokens == 3
    (text,) = short.predict({"prompt": [PROMPT]})
    assert text == _greedy(peft, impl.tokenizer, model.system_prompt, max_new_tokens=3)
    assert len(text) < len(_greedy(peft, impl.tokenizer, model.system_prompt))  # cut short, by the override


def test_logging_outside_a_run_or_without_an_adapter_is_refused(mlflow_store, adapter, tmp_path):
    model, base_dir, adapter_dir, _ = adapter
    with pytest.raises(RuntimeError, match="active run"):
        model_registry.log_adapter_model(adapter_dir, registered_name=NAME, alias=ALIAS, base_model=str(base_dir),
                                   revision=None, system_prompt=model.system_prompt)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        model_registry.log_adapter_model(tmp_path, registered_name=NAME, alias=ALIAS, base_model=str(base_dir),
                                   revision=None, system_prompt=model.system_prompt)


def test_the_recorded_base_is_a_hub_id_or_a_folder_name():
    assert model_registry.portable_base_name("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    assert model_registry.portable_base_name("/data/models/tiny-qwen2-abc") == "tiny-qwen2-abc"
    assert all("+" not in req and "==" in req for req in model_registry.adapter_requirements())


def test_promote_refuses_a_version_never_evaluated_unless_forced(mlflow_store, adapter, capsys):
    """No eval.gate tag: refused (exit 1) naming how to evaluate it and FORCE=1; forced, it moves and is tagged; a
    merged version is pointed at the adapter it was merged from; a passed gate needs no force."""
    from pipeline import registry

    model, base_dir, adapter_dir, _ = adapter
    version = str(_register(adapter_dir, base_dir, model, hw="cpu")["version"])
    args = ["promote", "--model", NAME, "--version", version, "--alias", "champion"]
    client = MlflowClient()
    assert registry.main(args) == 1
    err = capsys.readouterr().err
    assert f"{NAME}/{version} was not evaluated (it has no eval.gate tag)" in err
    # evaluate takes the adapter's recorded base (tiny-qwen2-<hash>) itself: the hint needs no model
    assert f'make eval HW=cpu DRY_RUN=0 SET="adapter={NAME}/{version}"' in err and "FORCE=1" in err
    assert "champion" not in client.get_registered_model(NAME).aliases
    client.set_model_version_tag(NAME, version, "adapter", "models:/zh-align-sft/7")  # as export tags a merged model
    assert registry.main(args) == 1
    err = capsys.readouterr().err
    assert "merged from zh-align-sft/7" in err
    assert 'make export HW=cpu DRY_RUN=0 SET="adapter=zh-align-sft/7"' in err
    assert registry.main([*args, "--force"]) == 0
    assert "not evaluated, forced" in capsys.readouterr().out
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == version
    assert client.get_model_version(NAME, version).tags["promoted.champion.forced"] == "true"
    client.set_model_version_tag(NAME, version, "eval.gate", "pass")
    assert registry.main([*args[:-1], "release"]) == 0
    assert "promoted.release.forced" not in client.get_model_version(NAME, version).tags


def test_pull_of_an_adapter_takes_its_recorded_base_unless_a_model_is_named(mlflow_store, adapter, tmp_path, capsys):
    """An adapter of tiny-qwen2 pulled under HW=4090 (whose model is Qwen2.5-7B) with no model named: its recorded
    base is a model definition of this repo, so it pulls; naming another model (`SET="model=…"`) is refused."""
    from pipeline import registry

    model, base_dir, adapter_dir, _ = adapter
    version = _register(adapter_dir, base_dir, model, hw="cpu")["version"]
    ref = f"{NAME}/{version}"
    assert registry.main(["pull", "--model", ref, "--dest", str(tmp_path / "a"), "--hw", "4090"]) == 0
    assert (tmp_path / "a" / "adapter_config.json").is_file()
    assert registry.main(["pull", "--model", ref, "--dest", str(tmp_path / "b"), "--hw", "cpu",
                          "--set", "model=tiny-qwen3"]) == 1
    assert "is an adapter of base 'tiny-qwen2-" in capsys.readouterr().err and not (tmp_path / "b").exists()
