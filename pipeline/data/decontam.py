"""Decontamination: training rows that share a long n-gram with an evaluation item.

A text is normalised like the dedup key (:func:`pipeline.data.text.dedup_key`: NFKC, case-folded, whitespace folded)
and split into units: each Han, kana or hangul character is one unit, each run of other letters and digits (a Latin
word, a number) is one unit; punctuation and spaces are dropped. So the n-grams are of characters in Chinese and of
words in English, in mixed text too. A text shorter than ``n`` units has no n-grams and cannot contaminate.

n-grams are hashed with 8 bytes of BLAKE2b (Python's ``hash`` is salted per process; ``datasets.map`` workers must
agree). The :class:`Index` maps each n-gram of the eval items to the tasks it occurs in; a training row's turns are
looked up turn by turn (an n-gram never spans two turns), user and assistant turns only.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Any

from pipeline.data.text import dedup_key

DEFAULT_N = 13
_CJK = (r"\u1100-\u11ff\u3040-\u30ff\u3130-\u318f\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
        r"\U00020000-\U0003134f")
# One CJK character, or a run of word characters that are neither CJK nor "_" (letters and digits of any script).
_UNIT = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")
_SEP = "\x1f"
ROLES = ("user", "assistant")  # the turns that count; system prompts are not training content of the row


def units(text: str) -> list[str]:
    """The normalised unit sequence of a text (see the module docstring)."""
    return _UNIT.findall(dedup_key(text))


def grams(text: str, n: int = DEFAULT_N) -> set[int]:
    """The n-grams of a text's units as stable 64-bit hashes; empty when it has fewer than ``n`` units."""
    if n < 1:
        raise ValueError(f"decontamination n must be >= 1, got {n}")
    us = units(text)
    if len(us) < n:
        return set()
    joined = _SEP.join(us)
    starts = [0]  # start offset of each unit in `joined`, plus one past the end
    for u in us:
        starts.append(starts[-1] + len(u) + 1)
    blake = hashlib.blake2b
    return {int.from_bytes(blake(joined[starts[i]:starts[i + n] - 1].encode(), digest_size=8).digest(), "little")
            for i in range(len(us) - n + 1)}


class Index:
    """The n-grams of evaluation items, each with the tasks it occurs in (a bit mask over ``tasks``). Picklable."""

    def __init__(self, items: Iterable[tuple[str, str]], n: int = DEFAULT_N) -> None:
        if n < 1:
            raise ValueError(f"decontamination n must be >= 1, got {n}")
        self.n = n
        self.tasks: list[str] = []
        self.masks: dict[int, int] = {}
        bit_of: dict[str, int] = {}
        self.items = 0
        for task, text in items:
            if task not in bit_of:
                bit_of[task] = 1 << len(self.tasks)
                self.tasks.append(task)
            bit = bit_of[task]
            masks = self.masks
            for g in grams(text, n):
                masks[g] = masks.get(g, 0) | bit
            self.items += 1

    def __len__(self) -> int:
        return len(self.masks)

    def __repr__(self) -> str:  # short: datasets logs and fingerprints show it
        return f"Index(n={self.n}, items={self.items}, grams={len(self.masks)}, tasks={self.tasks})"

    def tasks_of_grams(self, gs: set[int]) -> set[str]:
        mask = 0
        for g in self.masks.keys() & gs:
            mask |= self.masks[g]
        return {t for i, t in enumerate(self.tasks) if mask >> i & 1}

    def tasks_of(self, text: str) -> set[str]:
        """The tasks whose items share at least one n-gram with ``text``."""
        return self.tasks_of_grams(grams(text, self.n)) if self.masks else set()


def _texts(turns: Any) -> list[str]:
    """The user and assistant turn texts of a turn list (a bare string counts as one turn)."""
    if turns is None:
        return []
    if isinstance(turns, str):
        return [turns]
    return [m["content"] for m in turns if m.get("role") in ROLES and m.get("content")]


def row_tasks(fields: Iterable[Any], index: Index) -> set[str]:
    """The tasks a row is contaminated by, over its turn lists (each turn looked up on its own)."""
    found: set[str] = set()
    if not index.masks:
        return found
    for turns in fields:
        for text in _texts(turns):
            found |= index.tasks_of(text)
    return found


def batch_hits(batch: dict[str, list], *, index: Index, kind: str) -> dict[str, list]:
    """``datasets.map(batched=True)``: a ``contaminated`` column, the sorted task names joined by ``;`` ("" if none).
    ``kind`` "sft" reads ``messages``; "pref" reads ``prompt``, ``chosen`` and ``rejected``."""
    if kind == "sft":
        rows: Iterable[tuple] = ((m,) for m in batch["messages"])
    elif kind == "pref":
        rows = zip(batch["prompt"], batch["chosen"], batch["rejected"], strict=True)
    else:
        raise ValueError(f"kind must be 'sft' or 'pref', got {kind!r}")
    return {"contaminated": [";".join(sorted(row_tasks(fields, index))) for fields in rows]}
