"""SHP (stanfordnlp/SHP): Reddit comment pairs by `labels`, optionally only those whose preferred comment scored
`min_score_ratio` times the other; the eval split keeps a post on one side."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pipeline.data.sources.base import (
    BadRow,
    RawFile,
    Record,
    Sample,
    Source,
    SourceConfig,
    field_text,
    pref,
    row_id,
    rowwise,
    turn,
)


@rowwise
def parse_shp(f: RawFile, n: int, row: dict[str, Any], src: SourceConfig) -> Iterator[Record]:
    a, b, history = field_text(row, "human_ref_A"), field_text(row, "human_ref_B"), field_text(row, "history")
    if row.get("labels") not in (0, 1):
        raise BadRow("`labels` missing or not 0/1")
    ratio = row.get("score_ratio")
    if src.min_score_ratio is not None:
        if not isinstance(ratio, (int, float)):
            raise BadRow("`score_ratio` missing or not a number")
        if ratio < src.min_score_ratio:
            raise BadRow(f"score_ratio below min_score_ratio {src.min_score_ratio}")
    chosen, rejected = (a, b) if row["labels"] == 1 else (b, a)
    post = str(row.get("post_id") or row_id(f, n))
    yield pref([turn("user", history)], chosen, rejected,
               f"{post}:{row.get('c_root_id_A')}:{row.get('c_root_id_B')}", group=post,
               meta={"domain": row.get("domain") or f.subset, "score_ratio": ratio})


SOURCE = Source(
    "shp", ("pref",), ("*/*.json", "*/*.jsonl"), parse_shp, "unspecified",
    "hub dataset card (stanfordnlp/SHP) names no licence; Reddit's API terms apply", noncommercial=True,
    options=("subsets", "min_score_ratio"),
    sample=Sample(0, 2, "Why does my homemade bread come out so dense?"))
