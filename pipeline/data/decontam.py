"""Decontamination: training rows that share a long n-gram with an evaluation item.

A text is normalised like the dedup key (:func:`pipeline.data.text.dedup_key`: NFKC, case-folded, whitespace folded)
and split into units: each Han, kana or hangul character is one unit, each run of other letters and digits (a Latin
word, a number) is one unit; punctuation and spaces are dropped. So the n-grams are of characters in Chinese and of
words in English, in mixed text too. A text shorter than ``n`` units has no n-grams and cannot contaminate.

Hashing runs on numpy arrays of code points, a batch of texts at once (a hash call per n-gram was most of prepare's
time at a million rows): a unit's hash is a polynomial over its code points, mixed (splitmix64); an n-gram's is a
polynomial over its units' hashes, all modulo 2**64. The hashes depend on the text alone — the same in every process
(the map workers must agree) — and two different n-grams share one with a chance of about 2**-64. The
:class:`Index` holds the n-grams of the eval items, each with the tasks it occurs in; a training row's turns are looked
up turn by turn (an n-gram never spans two turns), user and assistant turns only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import cache
from typing import Any

import numpy as np

from pipeline.data.text import dedup_key

DEFAULT_N = 13
_CJK_RANGES = ((0x1100, 0x11FF), (0x3040, 0x30FF), (0x3130, 0x318F), (0x31F0, 0x31FF), (0x3400, 0x4DBF),
               (0x4E00, 0x9FFF), (0xAC00, 0xD7AF), (0xF900, 0xFAFF), (0x20000, 0x3134F))
_CJK = "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in _CJK_RANGES)
# One CJK character, or a run of word characters that are neither CJK nor "_" (letters and digits of any script).
_UNIT = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")
ROLES = ("user", "assistant")  # the turns that count; system prompts are not training content of the row
_M64 = (1 << 64) - 1
_CHAR_BASE = np.uint64(0x9E3779B97F4A7C15)   # odd: invertible modulo 2**64
_GRAM_BASE = np.uint64(0xC2B2AE3D27D4EB4F)


def units(text: str) -> list[str]:
    """The normalised unit sequence of a text (see the module docstring)."""
    return _UNIT.findall(dedup_key(text))


@cache
def _kinds() -> np.ndarray:
    """Per code point: 1 = a CJK unit of its own, 2 = part of a word unit, 0 = neither (``_UNIT``'s classes)."""
    word = re.compile(r"[^\W_]")
    everything = "".join(map(chr, range(0x110000)))  # lone surrogates included: they are in no class
    kinds = np.zeros(0x110000, dtype=np.uint8)
    kinds[[m.start() for m in word.finditer(everything)]] = 2
    for lo, hi in _CJK_RANGES:
        kinds[lo:hi + 1] = 1
    return kinds


_POWERS: dict[int, np.ndarray] = {}


def _powers(base: np.uint64, n: int) -> np.ndarray:
    """base**0 .. base**(n-1) modulo 2**64 (kept, grown by doubling)."""
    have = _POWERS.get(int(base))
    if have is None or len(have) < n:
        out = np.full(max(n, 2 * len(have) if have is not None else 1 << 16), base, dtype=np.uint64)
        out[0] = 1
        have = _POWERS[int(base)] = np.cumprod(out, dtype=np.uint64)
    return have[:n]


@cache
def _inverse(base: int) -> np.uint64:
    return np.uint64(pow(base, -1, 1 << 64))


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every bit of a unit's hash depends on every code point."""
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def _unit_hashes(keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(hash of each unit, index of the text it is in) for normalised texts, units in text order."""
    if not keys:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    cps = np.frombuffer("\0".join(keys).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    text_of = np.repeat(np.arange(len(keys)), [len(k) + 1 for k in keys])[:len(cps)]
    kind = _kinds()[cps]
    at = np.flatnonzero(kind)  # the code points that belong to a unit
    if not len(at):
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    kind_at = kind[at]
    # a unit starts at a CJK character, or at a word character that does not continue a word run
    starts = (kind_at == 1) | np.concatenate(([True], (at[1:] != at[:-1] + 1) | (kind_at[:-1] != 2)))
    first = np.flatnonzero(starts)
    last = np.append(first[1:], len(at)) - 1
    # polynomial over each unit's code points: sum c_k * B**(last-k) = B**last * sum c_k * B**-k (mod 2**64)
    with np.errstate(over="ignore"):
        weighted = cps[at].astype(np.uint64) * _powers(_inverse(int(_CHAR_BASE)), len(at))
        sums = np.add.reduceat(weighted, first, dtype=np.uint64)
        hashes = _mix(sums * _powers(_CHAR_BASE, len(at))[last])
    return hashes, text_of[at[first]]


def _gram_hashes(keys: Sequence[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(hash of each n-gram, index of the text it is in) for normalised texts; no n-gram spans two texts."""
    if n < 1:
        raise ValueError(f"decontamination n must be >= 1, got {n}")
    hashes, text_of = _unit_hashes(keys)
    m = len(hashes) - n + 1
    if m <= 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    grams = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            grams = grams * _GRAM_BASE + hashes[j:j + m]
    whole = text_of[:m] == text_of[n - 1:]
    return grams[whole], text_of[:m][whole]


def grams(text: str, n: int = DEFAULT_N) -> set[int]:
    """The n-grams of a text's units as stable 64-bit hashes; empty when it has fewer than ``n`` units."""
    return set(_gram_hashes([dedup_key(text)], n)[0].tolist())


class Index:
    """The n-grams of evaluation items, each with the tasks it occurs in (a bit mask over ``tasks``), as two sorted
    numpy arrays (quick to pickle to a worker, looked up by binary search). Picklable."""

    def __init__(self, items: Iterable[tuple[str, str]], n: int = DEFAULT_N) -> None:
        if n < 1:
            raise ValueError(f"decontamination n must be >= 1, got {n}")
        self.n = n
        self.tasks: list[str] = []
        bit_of: dict[str, int] = {}
        found, bits = [np.zeros(0, np.uint64)], [np.zeros(0, np.uint64)]
        self.items = 0
        for task, text in items:
            if task not in bit_of:
                bit_of[task] = 1 << len(self.tasks)
                self.tasks.append(task)
            gs = np.unique(_gram_hashes([dedup_key(text)], n)[0])
            found.append(gs)
            bits.append(np.full(len(gs), bit_of[task], dtype=np.uint64))
            self.items += 1
        keys, bit = np.concatenate(found), np.concatenate(bits)
        order = np.argsort(keys, kind="stable")
        keys, bit = keys[order], bit[order]
        self.keys, first = np.unique(keys, return_index=True)
        self.bits = np.bitwise_or.reduceat(bit, first) if len(keys) else bit
        # a bitmap of the keys' low bits (8 to 16 bits per key): most n-grams of a row are ruled out by one lookup
        self.width = max(1 << 20, 1 << (8 * len(self.keys)).bit_length())
        self.seen = np.zeros(self.width, dtype=bool)
        self.seen[self.keys & np.uint64(self.width - 1)] = True

    @property
    def masks(self) -> dict[int, int]:
        """n-gram → bit mask of the tasks it occurs in."""
        return dict(zip(self.keys.tolist(), self.bits.tolist(), strict=True))

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:  # short: datasets logs and fingerprints show it
        return f"Index(n={self.n}, items={self.items}, grams={len(self)}, tasks={self.tasks})"

    def _task_names(self, mask: int) -> set[str]:
        return {t for i, t in enumerate(self.tasks) if mask >> i & 1}

    def _lookup(self, gs: np.ndarray) -> np.ndarray:
        """The task mask of each n-gram hash (0 where no eval item has it)."""
        out = np.zeros(len(gs), np.uint64)
        if not len(self.keys) or not len(gs):
            return out
        maybe = np.flatnonzero(self.seen[gs & np.uint64(self.width - 1)])
        at = np.minimum(np.searchsorted(self.keys, gs[maybe]), len(self.keys) - 1)
        out[maybe] = np.where(self.keys[at] == gs[maybe], self.bits[at], np.uint64(0))
        return out

    def tasks_of_grams(self, gs: set[int]) -> set[str]:
        masks = self._lookup(np.fromiter(gs, dtype=np.uint64, count=len(gs)))
        return self._task_names(int(np.bitwise_or.reduce(masks))) if len(masks) else set()

    def tasks_of(self, text: str) -> set[str]:
        """The tasks whose items share at least one n-gram with ``text``."""
        return self.tasks_of_grams(grams(text, self.n)) if len(self) else set()

    def hits(self, rows: Sequence[Sequence[str]]) -> list[str]:
        """For rows given as their turns' dedup keys (:func:`~pipeline.data.text.dedup_key`), the tasks each row
        shares an n-gram with: sorted task names joined by ``;``, "" if none. One pass over the whole batch."""
        out = [""] * len(rows)
        if not len(self) or not rows:
            return out
        keys = [k for turns in rows for k in turns]
        row_of = np.repeat(np.arange(len(rows)), [len(turns) for turns in rows])
        gs, text_of = _gram_hashes(keys, self.n)
        masks = self._lookup(gs)
        hit = np.flatnonzero(masks)
        for row in np.unique(row_of[text_of[hit]]).tolist():
            mask = int(np.bitwise_or.reduce(masks[hit][row_of[text_of[hit]] == row]))
            out[row] = ";".join(sorted(self._task_names(mask)))
        return out


def _texts(turns: Any) -> list[str]:
    """The user and assistant turn texts of a turn list (a bare string counts as one turn)."""
    if turns is None:
        return []
    if isinstance(turns, str):
        return [turns]
    return [m["content"] for m in turns if m.get("role") in ROLES and m.get("content")]


def row_tasks(fields: Iterable[Any], index: Index) -> set[str]:
    """The tasks a row is contaminated by, over its turn lists (each turn looked up on its own)."""
    hit = index.hits([[dedup_key(t) for turns in fields for t in _texts(turns)]])[0]
    return set(hit.split(";")) if hit else set()


def batch_hits(batch: dict[str, list], *, index: Index, kind: str) -> dict[str, list]:
    """``datasets.map(batched=True)``: a ``contaminated`` column, the sorted task names joined by ``;`` ("" if none).
    ``kind`` "sft" reads ``messages``; "pref" reads ``prompt``, ``chosen`` and ``rejected``."""
    if kind == "sft":
        rows: Iterable[tuple] = ((m,) for m in batch["messages"])
    elif kind == "pref":
        rows = zip(batch["prompt"], batch["chosen"], batch["rejected"], strict=True)
    else:
        raise ValueError(f"kind must be 'sft' or 'pref', got {kind!r}")
    return {"contaminated": index.hits([[dedup_key(t) for turns in fields for t in _texts(turns)] for fields in rows])}
