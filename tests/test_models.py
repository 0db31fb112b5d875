"""The tiny offline models: deterministic, cached, real Qwen chat templates, Chinese round trips."""

from __future__ import annotations

import hashlib

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.chat_template_utils import get_training_chat_template

from pipeline.core.profiles import load_model
from pipeline.models import tiny as models

ZH = [{"role": "user", "content": "你好，世界！请用一句话介绍长江。"},
      {"role": "assistant", "content": "长江是中国最长的河流，全长约六千三百公里。"}]


def _digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-qwen3"])
def test_a_build_is_deterministic_for_its_seed(name, tmp_path):
    model = load_model(name)
    a, b = models.build_tiny(model, tmp_path / "a"), models.build_tiny(model, tmp_path / "b")
    assert _digest(a) == _digest(b)
    model.tiny.seed = 1
    c = models.build_tiny(model, tmp_path / "c")
    wa, wc = (AutoModelForCausalLM.from_pretrained(x).model.embed_tokens.weight for x in (a, c))
    assert not torch.equal(wa, wc)  # another seed, other weights


def test_the_cache_builds_once_and_keys_on_what_shapes_the_model():
    model = load_model("tiny-qwen2")
    first = models.tiny_model_dir(model)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert models.tiny_model_dir(model) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    model.tiny.seed = 7
    assert models.tiny_cache_path(model) != first


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-qwen3"])
def test_chat_template_is_the_real_one_and_round_trips_chinese(name):
    model = load_model(name)
    folder = models.tiny_model_dir(model)
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template == models.chat_template(model.chat_template)
    assert get_training_chat_template(tok) is not None  # TRL's assistant-only path recognises it
    text = tok.apply_chat_template([{"role": "system", "content": model.system_prompt}, *ZH], tokenize=False)
    assert text.startswith("<|im_start|>system\n你是") and "<|im_start|>assistant\n长江" in text
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert ids.count(im_end) == 3 and tok.eos_token_id == im_end == 2 and tok.pad_token_id == 0
    assert len(tok("你好")["input_ids"]) < len("你好".encode())  # merges learnt on Chinese, not raw bytes only


def test_qwen25_template_injects_its_english_system_prompt_when_none_is_given():
    tok = AutoTokenizer.from_pretrained(models.tiny_model_dir(load_model("tiny-qwen2")))
    assert "You are Qwen, created by Alibaba Cloud" in tok.apply_chat_template(ZH, tokenize=False)


def test_the_model_runs_and_fits_its_vocabulary():
    model = load_model("tiny-qwen2")
    folder = models.tiny_model_dir(model)
    tok, net = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    assert len(tok) <= net.config.vocab_size == model.architecture_config()["vocab_size"]
    batch = tok.apply_chat_template(ZH, return_tensors="pt", return_dict=True)
    logits = net(**batch).logits
    assert logits.shape[-1] == net.config.vocab_size and torch.isfinite(logits).all()
    assert net.generation_config.eos_token_id == [2, 0]
