"""What ``make bench`` trains on, offline: a definition's architecture with seeded random weights (bf16, or 4-bit the
stage's own way), a word-level tokenizer over its whole vocabulary with the family's chat template, and rows of random
words in the prepared pool's layout whose templated length is the length asked for (or drawn from a prepared pool).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from pipeline.core.resolved import Resolved
from pipeline.models.loading import load_kwargs

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = ["system", "user", "assistant", "\n"]  # a newline is a token, as in Qwen's BPE: masks map its characters


def word_tokenizer(r: Resolved, work: Path) -> Any:
    """A word-level tokenizer over the model's vocabulary (``w<id>``), the family's chat template and special tokens:
    a row of n random words is n tokens, for any architecture, offline. Spaces separate words; a newline is a token of
    its own, so every character of an assistant turn the template marks (``{% generation %}`` spans start and end on
    one) belongs to a token — transformers 5.17 maps a span's first and last characters to tokens, and a character no
    token covers left TRL's assistant mask empty."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from pipeline.models.tiny import chat_template

    vocab_size = r.model.architecture_config()["vocab_size"]
    vocab = {t: i for i, t in enumerate([*SPECIALS, *WORDS, "<unk>"])}
    vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(" ", behavior="removed"),
                                                 pre_tokenizers.Split("\n", behavior="isolated")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>", chat_template=chat_template(r.model.chat_template))
    fast.add_special_tokens({"additional_special_tokens": SPECIALS})
    return fast


def lengths(r: Resolved, kind: str, n: int, data: Path | None) -> list[int]:
    """``n`` row lengths: drawn (seeded) from the prepared pool's rows, else all the profile's max_length."""
    limit = r.hw.max_length
    if data is None:
        return [limit] * n
    file = data / ("sft.jsonl" if kind == "sft" else "pref.jsonl")
    pool = [min(json.loads(line)["n_tokens"], limit) for line in file.read_text(encoding="utf-8").splitlines() if line]
    rng = random.Random(0)
    return [rng.choice(pool) for _ in range(n)]


def synthetic_rows(r: Resolved, stage: str, n: int, data: Path | None) -> list[dict[str, Any]]:
    """Rows in the prepared pool's layout whose templated length is about each drawn length (a pair: per answer)."""
    rng = random.Random(0)
    vocab = r.model.architecture_config()["vocab_size"]
    first = len(SPECIALS) + len(WORDS) + 1

    def words(k: int) -> str:
        return " ".join(f"w{rng.randrange(first, vocab)}" for _ in range(max(1, k)))

    rows = []
    for length in lengths(r, "sft" if stage == "sft" else "pref", n, data):
        body = max(2, length - 27)  # the template: markers, newlines and Qwen2.5's default system prompt (27 tokens)
        user, answer = words(body * 2 // 5), words(body - body * 2 // 5)
        common = {"lang": "en", "source": "bench", "bucket": 0, "n_tokens": length}
        if stage == "sft":
            rows.append({**common, "messages": [{"role": "user", "content": user},
                                                {"role": "assistant", "content": answer}]})
        else:
            rows.append({**common, "prompt": [{"role": "user", "content": user}],
                         "chosen": [{"role": "assistant", "content": answer}],
                         "rejected": [{"role": "assistant", "content": words(body - body * 2 // 5)}]})
    return rows


def random_model(r: Resolved, work: Path, cuda: bool) -> Any:
    """The architecture with seeded random weights, on the device; a QLoRA profile loads them 4-bit the stage's way."""
    import gc

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = r.model.architecture_config()
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    torch.manual_seed(0)
    if r.hw.qlora:
        folder = work / "random-base"
        if not folder.is_dir():
            with torch.device("cuda"):  # seeded random init on the GPU: seconds, where 7 B on the CPU take a minute
                model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
            model.save_pretrained(folder)
            del model
            gc.collect()
            torch.cuda.empty_cache()  # nothing of the bf16 copy stays reserved beside the 4-bit one
        return AutoModelForCausalLM.from_pretrained(folder, device_map="cuda", use_safetensors=True,
                                                    **load_kwargs(r.hw, r.cfg.qlora))
    kwargs = load_kwargs(r.hw, r.cfg.qlora)
    with torch.device("cuda" if cuda else "cpu"):
        return AutoModelForCausalLM.from_config(config, **kwargs)
