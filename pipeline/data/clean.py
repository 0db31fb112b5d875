"""Cleaning of parsed records, batch by batch (``datasets.map(batched=True)``, so it runs on every core).

For each row: normalise every turn (:mod:`pipeline.data.text`), cut or drop empty and too-short turns, read the
language with the dataset's own tag first, apply the Han-share filter, and compute the row ``id`` — the SHA256 of the
row's dedup key — and the ``group`` that keeps a conversation tree or a prompt on one side of the eval split. A row
that is dropped keeps its place with a ``drop`` reason, so every step can be counted per source before filtering.
Token lengths and buckets come after dedup (:func:`count_tokens`), since tokenising is the costly part.
"""

from __future__ import annotations

import bisect
import hashlib
from typing import Any

from pipeline.data.text import classify, dedup_key, normalise, script

# The drop reasons, in the order of the steps that give them (the manifest reports them in this order).
EMPTY_TURN = "empty or too-short turn"
SAME_ANSWER = "chosen equals rejected"
OTHER_LANG = "other language (neither zh nor en)"
LOW_HAN = "Han share below filters.min_cn_ratio"
NO_FALLBACK = "English while filters.allow_english_fallback is false"
DUPLICATE = "duplicate (same dedup key as an earlier row)"
CONTAMINATED = "shares a long n-gram with an eval item (decontam)"
OVER_LENGTH = "longer than the largest bucket edge"
REASONS = (EMPTY_TURN, SAME_ANSWER, OTHER_LANG, LOW_HAN, NO_FALLBACK, DUPLICATE, CONTAMINATED, OVER_LENGTH)
EVAL_SALT = "zh-align-eval"  # the eval split depends on the group only: the same held-out set for every seed


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _turns(messages: list[dict[str, str]], min_chars: int) -> tuple[list[dict[str, str]], bool]:
    """Normalised turns, cut before the first empty or too-short one; True if anything was cut."""
    out = []
    for m in messages:
        text = normalise(m["content"])
        if len(text) < min_chars:
            return out, True
        out.append({"role": m["role"], "content": text})
    return out, False


def _turn_keys(messages: list[dict[str, str]]) -> list[str]:
    return [f"{m['role']}\x1f{dedup_key(m['content'])}" for m in messages]


def _key(messages: list[dict[str, str]]) -> str:
    return "\x1e".join(_turn_keys(messages))


def _prompt_of(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    return messages[:first]


def is_eval(group: str, fraction: float) -> bool:
    """Whether a group (tree, post or prompt) is held out; depends on the group alone."""
    return int(sha256(f"{EVAL_SALT}:{group}")[:15], 16) < fraction * 16 ** 15


def _language(text: str, hint: str | None, min_cn_ratio: float, allow_english: bool) -> tuple[str, float, str]:
    s = script(text)
    lang, share = classify(text, hint) if hint else s.lang, s.han_share
    if lang == "other":
        return lang, share, OTHER_LANG
    if share >= min_cn_ratio:
        return lang, share, ""
    if lang == "en":
        return lang, share, "" if allow_english else NO_FALLBACK
    return lang, share, LOW_HAN


ADDED = ("id", "group", "lang", "han_share", "eval", "drop")  # the columns both cleaners add


def _add(out: dict[str, list], text: str, hint: str | None, row_id: str, group: str, drop: str,
         filters: dict[str, Any]) -> None:
    """The columns every row type gets: id, group, language, Han share, eval side and drop reason."""
    lang, share, reason = _language(text, hint, filters["min_cn_ratio"], filters["allow_english"])
    for key, value in zip(ADDED, (row_id, group, lang, round(share, 4), is_eval(group, filters["eval_fraction"]),
                                  drop or reason), strict=True):
        out[key].append(value)


def clean_sft(batch: dict[str, list], *, min_chars: int, **filters: Any) -> dict[str, list]:
    """Batched cleaning of SFT rows (``messages``); adds id, group, lang, han_share, eval, drop. ``filters``:
    min_cn_ratio, allow_english, eval_fraction."""
    out: dict[str, list] = {k: [] for k in ("messages", *ADDED)}
    for messages, hint, group in zip(batch["messages"], batch["lang_hint"], batch["group"], strict=True):
        turns, _ = _turns(messages, min_chars)
        while turns and turns[-1]["role"] != "assistant":
            turns.pop()
        keys = _turn_keys(turns)  # the prompt's keys are the first ones
        out["messages"].append(turns)
        _add(out, "\n".join(m["content"] for m in turns), hint, sha256("\x1e".join(keys)),
             group or sha256("\x1e".join(keys[:len(_prompt_of(turns))])),
             "" if any(m["role"] == "user" for m in turns) else EMPTY_TURN, filters)
    return out


def clean_pref(batch: dict[str, list], *, min_chars: int, **filters: Any) -> dict[str, list]:
    """Batched cleaning of preference rows (``prompt``, ``chosen``, ``rejected``); the same added columns."""
    out: dict[str, list] = {k: [] for k in ("prompt", "chosen", "rejected", *ADDED)}
    rows = zip(batch["prompt"], batch["chosen"], batch["rejected"], batch["lang_hint"], batch["group"], strict=True)
    for prompt, chosen, rejected, hint, group in rows:
        parts = [_turns(x, min_chars) for x in (prompt, chosen, rejected)]
        (p, _), (c, _), (r, _) = parts
        for k, v in (("prompt", p), ("chosen", c), ("rejected", r)):
            out[k].append(v)
        prompt_key = _key(p)
        _add(out, "\n".join(m["content"] for m in (*p, *c, *r)), hint,
             sha256(f"{prompt_key}\x1d{_key(c)}\x1d{_key(r)}"), group or sha256(prompt_key),
             EMPTY_TURN if any(cut for _, cut in parts) or not p else SAME_ANSWER if c == r else "", filters)
    return out


def first_seen(ids: list[str]) -> list[bool]:
    """True for the first row of each id, in pool order (sources in their configured priority)."""
    seen: set[str] = set()
    keep = []
    for i in ids:
        keep.append(i not in seen)
        seen.add(i)
    return keep


def bucket_of(n_tokens: int, edges: list[int]) -> int:
    """Index of the first bucket whose upper edge holds ``n_tokens``; ``len(edges)`` when over the largest."""
    return bisect.bisect_left(edges, n_tokens)


def with_system(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    """The conversation as training renders it: the model's system prompt first unless the row has its own."""
    if not system or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system}, *messages]


def count_tokens(batch: dict[str, list], *, tokenizer: Any, system: str | None, kind: str, edges: list[int],
                 truncate: bool) -> dict[str, list]:
    """Batched token lengths through the chat template (pref: the longer of prompt+chosen and prompt+rejected),
    the bucket, and — with ``truncate`` — rows over the largest edge cut by whole turns (see :func:`_fit`)."""
    def lengths(convs: list[list[dict[str, str]]]) -> list[int]:
        texts = tokenizer.apply_chat_template([with_system(c, system) for c in convs], tokenize=False)
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    if kind == "sft":
        n = lengths(batch["messages"])
    else:
        n = [max(a, b) for a, b in zip(lengths([p + c for p, c in zip(batch["prompt"], batch["chosen"], strict=True)]),
                                       lengths([p + r for p, r in zip(batch["prompt"], batch["rejected"],
                                                                      strict=True)]), strict=True)]
    out = {k: list(batch[k]) for k in (("messages",) if kind == "sft" else ("prompt",))}
    out["n_tokens"], out["bucket"], out["truncated"] = n, [bucket_of(x, edges) for x in n], [False] * len(n)
    if truncate:
        for i, x in enumerate(n):
            if x > edges[-1]:
                _fit(out, i, batch, lengths, kind, edges)
    return out


def _fit(out: dict[str, list], i: int, batch: dict[str, list], lengths: Any, kind: str, edges: list[int]) -> None:
    """Cut one over-long row by whole turns: SFT keeps its longest opening that ends with an answer and fits; a
    preference row drops its earliest exchanges while the last user turn stays. A row nothing fits stays over."""
    limit = edges[-1]
    if kind == "sft":
        msgs = out["messages"][i]
        ends = [j + 1 for j, m in enumerate(msgs) if m["role"] == "assistant"][:-1]
        candidates = [msgs[:e] for e in reversed(ends)]
    else:
        prompt = out["prompt"][i]
        starts = [j for j, m in enumerate(prompt) if m["role"] == "user" and j > 0]
        system = [m for m in prompt[:1] if m["role"] == "system"]
        candidates = [system + prompt[s:] for s in starts]
    for cand in candidates:
        if kind == "sft":
            n = lengths([cand])[0]
        else:
            n = max(lengths([cand + batch["chosen"][i]])[0], lengths([cand + batch["rejected"][i]])[0])
        if n <= limit:
            out["messages" if kind == "sft" else "prompt"][i] = cand
            out["n_tokens"][i], out["bucket"][i], out["truncated"][i] = n, bucket_of(n, edges), True
            return
