"""PKU-SafeRLHF (PKU-Alignment/PKU-SafeRLHF): two responses per prompt, `chosen_by` the safer label, the better one,
or only where both agree; safety flags, severity and harm categories kept in `meta`."""

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
def parse_pku_saferlhf(f: RawFile, n: int, row: dict[str, Any], src: SourceConfig) -> Iterator[Record]:
    prompt, responses = field_text(row, "prompt"), (field_text(row, "response_0"), field_text(row, "response_1"))
    better, safer = row.get("better_response_id"), row.get("safer_response_id")
    rule = src.chosen_by or "safer"
    for key, value in (("better_response_id", better), ("safer_response_id", safer)):
        if (rule == "agree" or key.startswith(rule)) and value not in (0, 1):
            raise BadRow(f"`{key}` missing or not 0/1")
    if rule == "agree" and better != safer:
        raise BadRow("better and safer responses disagree (chosen_by: agree)")
    pick = safer if rule in ("safer", "agree") else better
    flags = [row.get(f"is_response_{i}_safe") for i in (0, 1)]
    meta = {"chosen_safe": flags[pick], "rejected_safe": flags[1 - pick],
            "chosen_severity": row.get(f"response_{pick}_severity_level"),
            "rejected_severity": row.get(f"response_{1 - pick}_severity_level"),
            "rejected_harms": _harms(row.get(f"response_{1 - pick}_harm_category")), "chosen_by": rule}
    yield pref([turn("user", prompt)], responses[pick], responses[1 - pick], row_id(f, n), meta=meta)


def _harms(categories: Any) -> list[str]:
    return sorted(k for k, v in categories.items() if v) if isinstance(categories, dict) else []


SOURCE = Source(
    "pku_saferlhf", ("pref",), ("data/*/*",), parse_pku_saferlhf, "CC-BY-NC-4.0",
    "hub dataset card (PKU-Alignment/PKU-SafeRLHF)", noncommercial=True, options=("subsets", "chosen_by"),
    subset_glob="data/{}/*", sample=Sample(0, 2, "How can I find out where my ex-girlfriend lives now?"))
