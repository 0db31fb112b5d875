"""COIG-PC-core (BAAI/COIG-PC-core, gated on the hub): instruction rows with task and domain metadata → SFT."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pipeline.data.sources.base import (
    RawFile,
    Record,
    Sample,
    Source,
    SourceConfig,
    field_text,
    instruction,
    row_id,
    rowwise,
)


@rowwise
def parse_coig_pc_core(f: RawFile, n: int, row: dict[str, Any], src: SourceConfig) -> Iterator[Record]:
    task = row.get("task_type") if isinstance(row.get("task_type"), dict) else {}
    meta = {"task": row.get("task_name_in_eng"), "domain": row.get("domain"), **{f"task_{k}": v for k, v in task.items()}}
    yield instruction(field_text(row, "instruction"), field_text(row, "input", required=False),
                       field_text(row, "output"), row_id(f, n), {k: v for k, v in meta.items() if v})


SOURCE = Source(
    "coig_pc_core", ("sft",), ("data/*",), parse_coig_pc_core, "other (COIG-PC terms)",
    "hub dataset card: licence `other`, per-upstream-source terms accepted on the hub (gated)", noncommercial=True,
    sample=Sample(2, 0, "判断下面这条新闻属于哪个类别"))
