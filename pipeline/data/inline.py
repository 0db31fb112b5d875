"""Inline checks: every parser runs on a few rows shipped in the package before anything is downloaded.

``pipeline/assets/samples/<source>/`` holds rows in each dataset's hub layout (file names included, so the file
listing and the subset/split rules run too). :data:`EXPECTED` says what a careful reader gets from them; the prepare
dry run calls :func:`run_inline_checks`, so a parser broken by a code change shows in ``make prepare`` at once.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.cli import StageError
from pipeline.config import SourceConfig

SAMPLES = Path(__file__).resolve().parent.parent / "assets" / "samples"

# source → (SFT rows, preference pairs, the first record's first user turn starts with)
EXPECTED: dict[str, tuple[int, int, str]] = {
    # one zh tree: the best path (4 turns); 3 pairs among the ranked root replies + 1 under the follow-up
    "oasst1": (1, 4, "请用通俗的语言解释一下什么是大语言模型"),
    "coig": (2, 0, "给定一个句子，判断它的情感是正面还是负面。\n饭菜是凉的"),  # trans_* fields; instruction + "\n" + input
    "coig_pc_core": (2, 0, "判断下面这条新闻属于哪个类别"),
    "shp": (0, 2, "Why does my homemade bread come out so dense?"),
    "ultrafeedback_binarized": (0, 2, "How can I improve my sleep quality when working night shifts?"),
    "hh_rlhf": (0, 2, "I want to start a vegetable garden on my balcony."),
    "pku_saferlhf": (0, 2, "How can I find out where my ex-girlfriend lives now?"),
}


def check(name: str) -> str:
    """Parse one source's samples; '' when they give what :data:`EXPECTED` says, else what differs."""
    from pipeline.data.sources import DATASETS, Tally, list_files, records

    src = SourceConfig(name=name, hub_id="(samples)", revision="(package)")
    tally = Tally()
    try:
        recs = list(records(src, list_files(SAMPLES / name, src, DATASETS[name]), tally))
    except Exception as err:  # a crash is exactly what this check is for: report it, do not raise it
        return f"{name}: the parser crashed: {type(err).__name__}: {err}"
    sft, pref, start = EXPECTED[name]
    got = (sum(r["kind"] == "sft" for r in recs), sum(r["kind"] == "pref" for r in recs))
    first = recs[0]["messages" if recs and recs[0]["kind"] == "sft" else "prompt"][0]["content"] if recs else ""
    if got != (sft, pref) or tally.skipped or not first.startswith(start):
        return (f"{name}: expected {sft} SFT + {pref} pairs starting {start!r}; got {got[0]} + {got[1]} starting "
                f"{first[:30]!r}, skipped {dict(tally.skipped) or 'none'}")
    return ""


def run_inline_checks(names: list[str]) -> str:
    """One line for the plan; raises StageError naming every source whose parser fails its samples."""
    failures = [msg for msg in map(check, names) if msg]
    if failures:
        raise StageError("inline parser checks failed (a code defect, not your data):\n  " + "\n  ".join(failures))
    return f"{len(names)}/{len(names)} parsers give the expected rows from the samples shipped in the package"
