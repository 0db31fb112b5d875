"""Cleaning of parsed records, batch by batch (:mod:`pipeline.data.batches`, so it runs on every core).

For each row: normalise every turn (:mod:`pipeline.data.text`), cut or drop empty and too-short turns, read the
language with the dataset's own tag first, apply the Han-share filter, and compute the row ``id`` — the SHA256 of the
row's dedup key — and the ``group`` that keeps a conversation tree or a prompt on one side of the eval split. A row
that is dropped keeps its place with a ``drop`` reason, so every step can be counted per source before filtering.
Token lengths and buckets come after dedup (:func:`count_tokens`), since tokenising is the costly part.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import os
import pickle
import unicodedata
import weakref
from typing import Any

from pipeline.data.decontam import ROLES as DECONTAM_ROLES
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


def _turn_keys(messages: list[dict[str, str]], dedup: list[str]) -> list[str]:
    """Each turn's role and dedup key (``dedup``: the turns' :func:`~pipeline.data.text.dedup_key`)."""
    return [f"{m['role']}\x1f{k}" for m, k in zip(messages, dedup, strict=True)]


def _key(messages: list[dict[str, str]], dedup: list[str]) -> str:
    return "\x1e".join(_turn_keys(messages, dedup))


def _decontam_keys(turns: list[dict[str, str]], dedup: list[str]) -> list[str]:
    """The dedup keys of the turns decontamination reads (:data:`pipeline.data.decontam.ROLES`, non-empty)."""
    return [k for m, k in zip(turns, dedup, strict=True) if m["role"] in DECONTAM_ROLES and m["content"]]


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


def clean_sft(batch: dict[str, list], *, min_chars: int, index: Any = None, **filters: Any) -> dict[str, list]:
    """Batched cleaning of SFT rows (``messages``); adds id, group, lang, han_share, eval, drop and ``contaminated``
    (the eval tasks the row shares an n-gram with, by ``index``, a :class:`~pipeline.data.decontam.Index`; "" for
    none or without one), from the dedup keys the id is made of. ``filters``: min_cn_ratio, allow_english,
    eval_fraction."""
    out: dict[str, list] = {k: [] for k in ("messages", *ADDED)}
    grams = []
    for messages, hint, group in zip(batch["messages"], batch["lang_hint"], batch["group"], strict=True):
        turns, _ = _turns(messages, min_chars)
        while turns and turns[-1]["role"] != "assistant":
            turns.pop()
        dedup = [dedup_key(m["content"]) for m in turns]
        keys = _turn_keys(turns, dedup)  # the prompt's keys are the first ones
        out["messages"].append(turns)
        grams.append(_decontam_keys(turns, dedup))
        _add(out, "\n".join(m["content"] for m in turns), hint, sha256("\x1e".join(keys)),
             group or sha256("\x1e".join(keys[:len(_prompt_of(turns))])),
             "" if any(m["role"] == "user" for m in turns) else EMPTY_TURN, filters)
    out["contaminated"] = index.hits(grams) if index is not None else [""] * len(grams)
    return out


def clean_pref(batch: dict[str, list], *, min_chars: int, index: Any = None, **filters: Any) -> dict[str, list]:
    """Batched cleaning of preference rows (``prompt``, ``chosen``, ``rejected``); the same added columns."""
    out: dict[str, list] = {k: [] for k in ("prompt", "chosen", "rejected", *ADDED)}
    grams = []
    rows = zip(batch["prompt"], batch["chosen"], batch["rejected"], batch["lang_hint"], batch["group"], strict=True)
    for prompt, chosen, rejected, hint, group in rows:
        parts = [_turns(x, min_chars) for x in (prompt, chosen, rejected)]
        (p, _), (c, _), (r, _) = parts
        for k, v in (("prompt", p), ("chosen", c), ("rejected", r)):
            out[k].append(v)
        dedup = [[dedup_key(m["content"]) for m in x] for x in (p, c, r)]
        grams.append([k for x, d in zip((p, c, r), dedup, strict=True) for k in _decontam_keys(x, d)])
        prompt_key = _key(p, dedup[0])
        _add(out, "\n".join(m["content"] for m in (*p, *c, *r)), hint,
             sha256(f"{prompt_key}\x1d{_key(c, dedup[1])}\x1d{_key(r, dedup[2])}"), group or sha256(prompt_key),
             EMPTY_TURN if any(cut for _, cut in parts) or not p else SAME_ANSWER if c == r else "", filters)
    out["contaminated"] = index.hits(grams) if index is not None else [""] * len(grams)
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


# Chat templates whose output for plain turns (system / user / assistant, text content, no tools) is known: each turn
# is ``<|im_start|>{role}\n{content}<|im_end|>\n``, after this opening when the first turn is not a system turn.
PLAIN_TEMPLATES = {"qwen2_5": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                              "assistant.<|im_end|>\n",
                   "qwen3_instruct_2507": ""}
ROLES = ("system", "user", "assistant")


@functools.cache
def _plain_opening(template: str) -> str | None:
    """The opening of a known template (compared byte for byte with TRL's copies), or None: render with jinja."""
    from pipeline.models.tiny import chat_template

    for name, opening in PLAIN_TEMPLATES.items():
        try:
            if template == chat_template(name):
                return opening
        except (ModuleNotFoundError, OSError):
            return None
    return None


class Lengths:
    """Token lengths of conversations as training renders them (:func:`with_system`, the chat template, no added
    special tokens): exactly ``len(apply_chat_template(conv, tokenize=True)["input_ids"])`` (tests/test_prepare.py
    compares them), with one tokenizer call per batch.

    A known template on plain turns is rendered by string joins, in pieces whose counts add up: the opening and each
    ``<|im_start|>role\ncontent<|im_end|>\n`` turn (the tokenizer splits its text at added tokens and encodes what lies
    between them on its own). A batch encodes each distinct piece once — the system prompt once, not once per row; a
    pair's prompt once, not for chosen and for rejected. A fast tokenizer's Rust backend counts; then only the backend,
    the template and the special tokens are kept (~160 MB for Qwen2.5 rather than ~400). A map worker forked from the
    process that made it uses that very object (pickled, it is a key and its state as bytes, unpickled only where the
    key is unknown): no copy of the tokenizer per worker.

    A backend whose normalizer is NFC alone (Qwen's) gets the texts already in NFC — nearly all — with the normalizer
    switched off for that call (NFC would leave them as they are, and took ~8 % of the encode time); the others with it
    on. The backend is left as it was."""

    def __init__(self, tokenizer: Any, system: str | None) -> None:
        self.system, self.template = system, tokenizer.chat_template
        self.opening = _plain_opening(self.template) if isinstance(self.template, str) else None
        self.special = dict(tokenizer.special_tokens_map)  # what apply_chat_template hands the template
        backend = getattr(tokenizer, "backend_tokenizer", None)
        direct = backend is not None and backend.truncation is None and backend.padding is None and \
            not backend.encode_special_tokens and not getattr(tokenizer, "split_special_tokens", False)
        self.backend, self.tokenizer = (backend, None) if direct and self.opening is not None else (None, tokenizer)
        self.nfc = self.backend is not None and _is_nfc(self.backend.normalizer)
        self.split = self.backend is not None and _splits_at(self.backend) and self._adds_up()
        self.key = f"{os.getpid()}:{id(self)}"
        _MADE[self.key] = self

    def __reduce__(self):
        return _lengths, (self.key, pickle.dumps(self.__dict__))

    def pieces(self, conv: list[dict[str, Any]]) -> list[str]:
        """The conversation's text in pieces whose token counts add up (one piece where that is not known)."""
        pieces = self._turns(with_system(conv, self.system))
        return pieces if self.split else ["".join(pieces)]

    def _turns(self, conv: list[dict[str, Any]]) -> list[str]:
        """The opening and each turn of a known template on plain turns; else the whole text."""
        if self.opening is None or not conv or not all(m.keys() == {"role", "content"} and m["role"] in ROLES
                                                       and isinstance(m["content"], str) for m in conv):
            return [self._template(conv)]
        turns = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in conv]
        return turns if conv[0]["role"] == "system" or not self.opening else [self.opening, *turns]

    def render(self, conv: list[dict[str, Any]]) -> str:
        return "".join(self.pieces(conv))

    def __call__(self, convs: list[list[dict[str, Any]]]) -> list[int]:
        pieces = [self.pieces(c) for c in convs]
        unique = list(dict.fromkeys(p for ps in pieces for p in ps))
        counts = dict(zip(unique, self._encode(unique), strict=True))
        return [sum(counts[p] for p in ps) for ps in pieces]

    def _encode(self, texts: list[str]) -> list[int]:
        if self.backend is None:
            return [len(x) for x in self.tokenizer(texts, add_special_tokens=False,
                                                   return_attention_mask=False)["input_ids"]]
        if not self.nfc:
            return self._count(texts)
        normal = [unicodedata.is_normalized("NFC", t) for t in texts]
        off = iter(self._count_as_is([t for t, ok in zip(texts, normal, strict=True) if ok]))
        on = iter(self._count([t for t, ok in zip(texts, normal, strict=True) if not ok]))
        return [next(off) if ok else next(on) for ok in normal]

    def _count(self, texts: list[str]) -> list[int]:  # (encode_batch_fast, without offsets, measured slower here)
        return [len(e) for e in self.backend.encode_batch(texts, add_special_tokens=False)] if texts else []

    def _count_as_is(self, texts: list[str]) -> list[int]:
        """Texts already in NFC, counted with the backend's NFC normalizer off for the call (it would leave them as
        they are), then on again."""
        normalizer, self.backend.normalizer = self.backend.normalizer, None
        try:
            return self._count(texts)
        finally:
            self.backend.normalizer = normalizer

    def _template(self, conv: list[dict[str, Any]]) -> str:
        if self.tokenizer is not None:
            return self.tokenizer.apply_chat_template(conv, tokenize=False)
        from transformers.utils.chat_template_utils import render_jinja_template  # what apply_chat_template calls

        given = [{k: v for k, v in m.items() if v is not None} for m in conv]
        return render_jinja_template(conversations=[given], chat_template=self.template, **self.special)[0][0]

    def _adds_up(self) -> bool:
        """A check on a mixed probe: the pieces' counts add up to the whole text's."""
        probe = [{"role": "system", "content": "中文 "}, {"role": "user", "content": " 你好，世界！\n\n"},
                 {"role": "assistant", "content": "Hello  \n```x```\t"}]
        pieces = self._turns(probe)
        return sum(self._encode(pieces)) == self._encode(["".join(pieces)])[0]


_MADE: weakref.WeakValueDictionary[str, Lengths] = weakref.WeakValueDictionary()  # a forked worker inherits it


def _lengths(key: str, state: bytes) -> Lengths:
    """A pickled :class:`Lengths`: the object itself in a process forked from its maker's, else rebuilt."""
    made = _MADE.get(key)
    if made is None:
        made = Lengths.__new__(Lengths)
        made.__dict__.update(pickle.loads(state))
    return made


def _is_nfc(normalizer: Any) -> bool:
    from tokenizers.normalizers import NFC

    return isinstance(normalizer, NFC)


def _splits_at(backend: Any) -> bool:
    """Whether the tokenizer splits at ``<|im_start|>`` and ``<|im_end|>`` without eating the text around them."""
    added = {t.content: t for t in backend.get_added_tokens_decoder().values()}
    return all(t in added and not (added[t].lstrip or added[t].rstrip or added[t].single_word)
               for t in ("<|im_start|>", "<|im_end|>"))


def count_tokens(batch: dict[str, list], *, tokenizer: Any, system: str | None, kind: str, edges: list[int],
                 truncate: bool) -> dict[str, list]:
    """Batched token lengths through the chat template (pref: the longer of prompt+chosen and prompt+rejected, both
    in one tokenizer call), the bucket, and — with ``truncate`` — rows over the largest edge cut by whole turns (see
    :func:`_fit`; only then are the conversations returned, so a map rewrites them only when it may change them).
    ``tokenizer``: a transformers tokenizer, or the :class:`Lengths` made of one and ``system`` (quick to pickle)."""
    lengths = tokenizer if isinstance(tokenizer, Lengths) else Lengths(tokenizer, system)
    if kind == "sft":
        n = lengths(batch["messages"])
    else:
        prompts = batch["prompt"]
        both = lengths([p + c for p, c in zip(prompts, batch["chosen"], strict=True)]
                       + [p + r for p, r in zip(prompts, batch["rejected"], strict=True)])
        n = [max(a, b) for a, b in zip(both[:len(prompts)], both[len(prompts):], strict=True)]
    out: dict[str, list] = {"n_tokens": n, "bucket": [bucket_of(x, edges) for x in n], "truncated": [False] * len(n)}
    if truncate:
        out.update({k: list(batch[k]) for k in (("messages",) if kind == "sft" else ("prompt",))})
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
