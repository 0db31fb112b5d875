"""What every source shares: its declaration (:class:`Source`), its config (:class:`SourceConfig`), and the
record a parser yields.

A record is a plain dict, before any cleaning: ``kind`` (``sft`` | ``pref``), ``messages`` (SFT) or ``prompt`` /
``chosen`` / ``rejected`` (pref) as lists of ``{"role", "content"}``, ``source_id``, ``lang_hint`` (the dataset's own
language tag, or None), ``group`` (what the eval split keeps together: an OASST1 tree, an SHP post; None = the
prompt) and ``meta`` (JSON text). A row that cannot be parsed becomes a :class:`BadRow`, which the reader counts by
reason before going on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.core.errors import StageError

Message = dict[str, str]
Record = dict[str, Any]
RowStream = Iterator[tuple["RawFile", int, dict[str, Any]]]
OPTIONS = ("subsets", "min_score_ratio", "chosen_by")  # options only some sources read (`Source.options`)


@dataclass
class SourceConfig:
    """One dataset in a prepare config: where it lives on the hub (pinned), or a local copy in the hub's layout."""
    name: str                            # one of the declared sources (pipeline/data/sources/<name>.py)
    hub_id: str
    revision: str
    path: str | None = None
    splits: list[str] | None = None      # splits to read (file names as on the hub); null = every split found
    subsets: list[str] | None = None     # sub-folders/files as on the hub (hh_rlhf data dirs, coig files, shp domains)
    max_rows: int | None = None          # stop after this many parsed rows (a quick look); null = all
    min_score_ratio: float | None = None                            # shp: keep pairs with score_ratio >= this
    chosen_by: Literal["safer", "better", "agree"] | None = None    # pku_saferlhf: which label picks `chosen`


@dataclass(frozen=True)
class Sample:
    """What the source's rows shipped in ``pipeline/assets/samples/<name>/`` parse into (the inline check)."""
    sft: int                             # SFT conversations
    pref: int                            # preference pairs
    starts: str                          # the first record's first user turn starts with this


@dataclass(frozen=True)
class Source:
    """A dataset, declared once: its files, parser, options, licence and the inline check of its parser."""
    name: str
    kinds: tuple[str, ...]               # sft and/or pref
    patterns: tuple[str, ...]            # files of the repository that hold rows (fnmatch on the relative path)
    parse: Callable[[RowStream, SourceConfig], Iterator[Record | BadRow]]
    licence: str
    licence_source: str                  # where the licence claim comes from
    noncommercial: bool                  # non-commercial or unclear terms: tags the run `licence.noncommercial`
    sample: Sample
    options: tuple[str, ...] = ()        # which of OPTIONS it reads; setting another is a config error
    subset_glob: str = "{}/*"            # the files of one subset in the repository (what `subsets:` downloads)
    subset_is_file: bool = False         # subsets are file stems (COIG), not folders
    refused_subsets: dict[str, str] = field(default_factory=dict)  # subset → why it cannot be read


class BadRow(ValueError):
    """A row the parser cannot use; the message is the reason it is counted under."""


class SourceError(StageError):
    """A source that cannot be read at all (missing path, gated, offline); the message says how to fix it."""


@dataclass(frozen=True)
class RawFile:
    path: Path
    rel: str            # path inside the repository layout, with forward slashes
    subset: str | None
    split: str | None


# ----------------------------------------------------------------------------------------------------------------
# Building records
# ----------------------------------------------------------------------------------------------------------------
def field_text(row: dict[str, Any], key: str, *, required: bool = True) -> str:
    """A string field; a missing or non-string required field is a bad row named after the field."""
    value = row.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise BadRow(f"`{key}` missing or not text")
    return value


def user_turn(instruction: str, inp: str) -> str:
    """The one rule for instruction-style sources, so the same item from two sources dedups."""
    inp = inp.strip()
    return instruction.strip() + ("\n" + inp if inp else "")


def turn(role: str, content: str) -> Message:
    return {"role": role, "content": content}


def sft(messages: list[Message], source_id: str, *, lang: str | None = None, group: str | None = None,
        meta: dict[str, Any] | None = None) -> Record:
    return {"kind": "sft", "messages": messages, "prompt": None, "chosen": None, "rejected": None,
            "source_id": source_id, "lang_hint": lang, "group": group, "meta": _meta(meta)}


def pref(prompt: list[Message], chosen: str, rejected: str, source_id: str, *, lang: str | None = None,
         group: str | None = None, meta: dict[str, Any] | None = None) -> Record:
    return {"kind": "pref", "messages": None, "prompt": prompt, "chosen": [turn("assistant", chosen)],
            "rejected": [turn("assistant", rejected)], "source_id": source_id, "lang_hint": lang, "group": group,
            "meta": _meta(meta)}


def _meta(meta: dict[str, Any] | None) -> str:
    return json.dumps(meta, ensure_ascii=False, sort_keys=True) if meta else ""


def rowwise(fn: Callable[[RawFile, int, dict[str, Any], SourceConfig], Iterable[Record]]):
    """Turn a one-row parser into a stream parser that yields a row's BadRow (for counting) and goes on."""
    def parse(rows: RowStream, src: SourceConfig) -> Iterator[Record | BadRow]:
        for f, n, row in rows:
            try:
                yield from list(fn(f, n, row, src))
            except BadRow as err:
                yield err
    return parse


def row_id(f: RawFile, n: int) -> str:
    return f"{f.rel}:{n}"


def instruction(instruction: str, inp: str, output: str, source_id: str, meta: dict | None = None) -> Record:
    """An instruction-style row (COIG, COIG-PC-core) as one user turn and one answer."""
    return sft([turn("user", user_turn(instruction, inp)), turn("assistant", output)], source_id, meta=meta)
