"""Inline checks: every parser runs on a few rows shipped in the package before anything is downloaded.

``pipeline/assets/samples/<source>/`` holds rows in each dataset's hub layout (file names included, so the file
listing and the subset/split rules run too). Each source's declaration says what a careful reader gets from them
(``Source.sample``); the prepare dry run calls :func:`run_inline_checks`, so a parser broken by a code change shows
in ``make prepare`` at once.
"""

from __future__ import annotations

from pipeline.core.errors import StageError
from pipeline.core.paths import ASSETS
from pipeline.data.sources import SOURCES, Tally, records
from pipeline.data.sources.base import SourceConfig
from pipeline.data.sources.files import list_files

SAMPLES = ASSETS / "samples"


def check(name: str) -> str:
    """Parse one source's samples; '' when they give what its declaration says, else what differs."""
    source = SOURCES[name]
    src = SourceConfig(name=name, hub_id="(samples)", revision="(package)")
    tally = Tally()
    try:
        recs = list(records(src, list_files(SAMPLES / name, src, source), tally))
    except Exception as err:  # a crash is exactly what this check is for: report it, do not raise it
        return f"{name}: the parser crashed: {type(err).__name__}: {err}"
    want = source.sample
    got = (sum(r["kind"] == "sft" for r in recs), sum(r["kind"] == "pref" for r in recs))
    first = recs[0]["messages" if recs and recs[0]["kind"] == "sft" else "prompt"][0]["content"] if recs else ""
    if got != (want.sft, want.pref) or tally.skipped or not first.startswith(want.starts):
        return (f"{name}: expected {want.sft} SFT + {want.pref} pairs starting {want.starts!r}; got {got[0]} + "
                f"{got[1]} starting {first[:30]!r}, skipped {dict(tally.skipped) or 'none'}")
    return ""


def run_inline_checks(names: list[str]) -> str:
    """One line for the plan; raises StageError naming every source whose parser fails its samples."""
    failures = [msg for msg in map(check, names) if msg]
    if failures:
        raise StageError("inline parser checks failed (a code defect, not your data):\n  " + "\n  ".join(failures))
    return f"{len(names)}/{len(names)} parsers give the expected rows from the samples shipped in the package"
