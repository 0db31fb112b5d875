"""The fixed zh / en probe prompts (``pipeline/assets/probe_prompts.json``), chat-templated with the model's system
prompt: the generations table a training run logs, and the next-token fingerprint of a merged model that export
records and ``make pull … VERIFY=1`` checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.core.errors import StageError
from pipeline.core.paths import ASSETS

PROBES = ASSETS / "probe_prompts.json"
PROBE_FILE = "probe_logits.json"
TOP_K = 20
MAX_NEW_TOKENS = 48  # each probe's greedy answer in the generations table


def probes() -> list[tuple[str, str]]:
    """(lang, prompt) of every probe prompt, zh first."""
    return [(lang, p) for lang, ps in json.loads(PROBES.read_text(encoding="utf-8")).items() for p in ps]


def probe_texts(tokenizer: Any, system: str) -> list[str]:
    """The probe prompts chat-templated with the system prompt, ready for the assistant's reply."""
    return [tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": p}],
                                          tokenize=False, add_generation_prompt=True) for _, p in probes()]


def generations(model: Any, tokenizer: Any, system: str, max_new_tokens: int = MAX_NEW_TOKENS) -> dict[str, list]:
    """Greedy answers to the probe prompts, as table columns (lang, prompt, output)."""
    import torch

    table: dict[str, list] = {"lang": [], "prompt": [], "output": []}
    model.eval()
    for (lang, prompt), text in zip(probes(), probe_texts(tokenizer, system), strict=True):
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        table["lang"].append(lang)
        table["prompt"].append(prompt)
        table["output"].append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return table


def left_padded(tokenizer: Any, texts: list[str]) -> Any:
    """Texts as one batch, padded on the left: the last position is every text's next token."""
    return tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")


def probe_inputs(tokenizer: Any, system: str) -> Any:
    """The probe prompts as one left-padded batch."""
    return left_padded(tokenizer, probe_texts(tokenizer, system))


def next_token_logits(model: Any, tokenizer: Any, texts: list[str]) -> Any:
    """float32 logits of the next token after each templated text, [len(texts), vocab]."""
    import torch

    with torch.no_grad():
        return model(**left_padded(tokenizer, texts)).logits.float()[:, -1, :]


def probe_record(model: Any, tokenizer: Any, system: str) -> dict[str, Any]:
    """A merged model's fingerprint: for each probe prompt (as the exact templated text), the top-k next-token ids
    and logits. Kept in the folder and on the run, so a pulled copy can be checked against what export saw."""
    texts = probe_texts(tokenizer, system)
    last = next_token_logits(model, tokenizer, texts)
    top = last.topk(min(TOP_K, last.shape[-1]), dim=-1)
    return {"dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "texts": texts,
            "top_ids": top.indices.tolist(), "top_logits": top.values.tolist()}


def check_probe_logits(folder: Path, tolerance: float | None = None) -> float:
    """Load a merged folder with transformers alone and return max |logit − logged logit| over the recorded top-k
    of every probe prompt; raise StageError above ``tolerance`` (default: 1e-4 in fp32, 5e-2 in bf16) or when the
    folder has no record."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(folder) / PROBE_FILE
    if not path.is_file():
        raise StageError(f"{folder} has no {PROBE_FILE}; only folders written by `make export` can be checked")
    record = json.loads(path.read_text(encoding="utf-8"))
    tolerance = tolerance if tolerance is not None else (1e-4 if record["dtype"] == "float32" else 5e-2)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, record["dtype"]), use_safetensors=True).eval()
    last = next_token_logits(model, AutoTokenizer.from_pretrained(folder), record["texts"])
    got = last.gather(1, torch.tensor(record["top_ids"]))
    diff = float((got - torch.tensor(record["top_logits"])).abs().max())
    if diff > tolerance:
        raise StageError(f"{folder}: logits differ from those logged at export by {diff:.3g} > {tolerance:g}; "
                         f"the folder is not the exported model (or was loaded in another dtype)")
    return diff
