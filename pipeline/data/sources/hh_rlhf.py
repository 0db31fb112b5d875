"""HH-RLHF (Anthropic/hh-rlhf): Human/Assistant transcripts → a shared prompt and the chosen / rejected last reply.
Its red-team-attempts folder holds red-team transcripts, not pairs, and is refused."""

from __future__ import annotations

import re
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
    pref,
    row_id,
    rowwise,
    turn,
)

_HH_SPEAKER = re.compile(r"\n\n(Human|Assistant):[ ]?")


def hh_turns(transcript: str) -> list[Message]:
    """``\n\nHuman: …\n\nAssistant: …`` → messages, starting with Human and ending with one Assistant reply. The
    published transcripts sometimes hold two turns of one speaker in a row: in the shared turns they are joined into
    one turn; as the final reply (5 of the 2 312 harmless-base test pairs) the pair is counted and left out."""
    parts = _HH_SPEAKER.split(transcript)
    if parts[0].strip() or len(parts) < 5 or parts[1] != "Human":
        raise BadRow("transcript is not Human/Assistant turns")
    speakers = parts[1::2]
    if speakers[-1] != "Assistant":
        raise BadRow("transcript does not end with an Assistant turn")
    if speakers[-2] != "Human":  # e.g. a reply holding an inline "Human:" and a second "Assistant:" after it
        raise BadRow("last reply spans several Assistant turns")
    messages: list[Message] = []
    for who, text in zip(speakers, parts[2::2], strict=True):
        role = "user" if who == "Human" else "assistant"
        if messages and messages[-1]["role"] == role:
            messages[-1] = turn(role, messages[-1]["content"] + "\n\n" + text)
        else:
            messages.append(turn(role, text))
    return messages


@rowwise
def parse_hh_rlhf(f: RawFile, n: int, row: dict[str, Any], src: SourceConfig) -> Iterator[Record]:
    chosen, rejected = hh_turns(field_text(row, "chosen")), hh_turns(field_text(row, "rejected"))
    if chosen[:-1] != rejected[:-1]:
        raise BadRow("chosen and rejected part before the last reply")
    yield pref(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"], row_id(f, n), meta={"subset": f.subset})


SOURCE = Source(
    "hh_rlhf", ("pref",), ("harmless-base/*", "helpful-*/*"), parse_hh_rlhf, "MIT",
    "hub dataset card (Anthropic/hh-rlhf: MIT); the design cautions research use only, not commercial redistribution",
    noncommercial=True, options=("subsets",),
    refused_subsets={"red-team-attempts": "holds red-team transcripts, not chosen/rejected pairs (pair subsets: "
                                          "harmless-base, helpful-base, helpful-online, helpful-rejection-sampled)"},
    sample=Sample(0, 2, "I want to start a vegetable garden on my balcony."))
