"""COIG (BAAI/COIG): its six raw files, read directly (the hub's loading script does not run on datasets >= 4),
including the counterfactual-correction chats in their tar; every row becomes an SFT conversation."""

from __future__ import annotations

import json
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
    field_text,
    instruction,
    row_id,
    rowwise,
    sft,
    turn,
)


@rowwise
def parse_coig(f: RawFile, n: int, row: dict[str, Any], src: SourceConfig) -> Iterator[Record]:
    """COIG's raw files, read directly (the hub's loading script does not run on datasets >= 4). Exam and
    human-value part 2 rows: instruction = ``textbox_q_instruction``, input = context + question, answer = answer +
    analysis. The counterfactual-correction chats become multi-turn conversations."""
    rid = row_id(f, n)
    subset = f.subset or ""
    if subset.startswith("translated"):
        yield instruction(field_text(row, "trans_instruction"), field_text(row, "trans_input", required=False),
                           field_text(row, "trans_output"), rid, {"subset": subset})
    elif subset.startswith("counterfactual") or subset.startswith("counterfactural"):
        yield sft(_coig_chat(row), rid, meta={"subset": subset})
    elif "textbox_q_instruction" in row or subset.startswith("exam") or subset.endswith("part2"):
        inp = "\n".join(p for p in (field_text(row, "textbox_q_context", required=False).strip(),
                                    field_text(row, "textbox_question", required=False).strip()) if p)
        answer = "\n".join(p for p in (field_text(row, "textbox_answer").strip(),
                                       field_text(row, "textbox_answer_analysis", required=False).strip()) if p)
        yield instruction(field_text(row, "textbox_q_instruction"), inp, answer, rid, {"subset": subset})
    else:
        yield instruction(field_text(row, "instruction"), field_text(row, "input", required=False),
                           field_text(row, "output"), rid, {"subset": subset})


def _coig_chat(row: dict[str, Any]) -> list[Message]:
    """One counterfactual-correction dialogue: ``round_0`` … ``round_N``, each ``{"response": "<JSON text with Q
    and A>"}`` (the layout COIG's own loading script reads)."""
    rounds = sorted((int(k.removeprefix("round_")), v) for k, v in row.items()
                    if k.startswith("round_") and k.removeprefix("round_").isdigit())
    if not rounds:
        raise BadRow("chat without round_N entries")
    messages = []
    for _, r in rounds:
        try:
            qa = json.loads(field_text(r if isinstance(r, dict) else {}, "response"))
        except json.JSONDecodeError as err:
            raise BadRow("chat round response is not JSON") from err
        if not isinstance(qa, dict):
            raise BadRow("chat round response is not a Q/A object")
        messages += [turn("user", field_text(qa, "Q")), turn("assistant", field_text(qa, "A"))]
    return messages


SOURCE = Source(
    "coig", ("sft",), ("*.json", "*.jsonl", "*.tar.gz"), parse_coig, "Apache-2.0", "hub dataset card (BAAI/COIG)",
    noncommercial=False, options=("subsets",), subset_glob="{}.*", subset_is_file=True,
    # the translated rows' trans_* fields; the user turn is instruction + "\n" + input
    sample=Sample(2, 0, "给定一个句子，判断它的情感是正面还是负面。\n饭菜是凉的"))
