"""UltraFeedback binarized (HuggingFaceH4/ultrafeedback_binarized): the `*_prefs` splits, ties dropped."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pipeline.data.sources.base import (
    BadRow,
    Message,
    RawFile,
    Record,
    Sample,
    Source,
    SourceConfig,
    pref,
    row_id,
    rowwise,
    turn,
)


@rowwise
def parse_ultrafeedback(f: RawFile, n: int, row: dict[str, Any], src: SourceConfig) -> Iterator[Record]:
    chosen, rejected = _conversation(row, "chosen"), _conversation(row, "rejected")
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise BadRow("chosen/rejected do not end with an assistant turn")
    if chosen[:-1] != rejected[:-1] or not chosen[:-1] or chosen[-2]["role"] != "user":
        raise BadRow("chosen and rejected do not share the user prompt")
    sc, sr = row.get("score_chosen"), row.get("score_rejected")
    if isinstance(sc, (int, float)) and isinstance(sr, (int, float)) and sc == sr:
        raise BadRow("tie (score_chosen == score_rejected)")
    pid = str(row.get("prompt_id") or row_id(f, n))
    yield pref(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"], f"{f.split}:{pid}", group=pid,
               meta={"score_chosen": sc, "score_rejected": sr})


def _conversation(row: dict[str, Any], key: str) -> list[Message]:
    value = row.get(key)
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str) for m in value):
        raise BadRow(f"`{key}` is not a list of role/content messages")
    return [turn(m["role"], m["content"]) for m in value]


SOURCE = Source(
    "ultrafeedback_binarized", ("pref",), ("data/*_prefs-*",), parse_ultrafeedback, "MIT",
    "hub dataset card (HuggingFaceH4/ultrafeedback_binarized)", noncommercial=False,
    sample=Sample(0, 2, "How can I improve my sleep quality when working night shifts?"))
