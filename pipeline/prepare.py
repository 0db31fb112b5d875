"""prepare: the seven public datasets → cleaned, deduplicated, length-bucketed SFT and preference pools + data card.

Built by the prepare issue; for now its dry run shows the plan and a real run exits 2.
"""

from __future__ import annotations

import sys

from pipeline import cli
from pipeline.config import Resolved
from pipeline.plan import Item, Plan, base_model_input, dir_output, repo_path

STAGE = "prepare"
OUTPUT_FILES = ("sft.jsonl", "sft_eval.jsonl", "pref.jsonl", "pref_eval.jsonl", "manifest.json", "DATA_CARD.md")


def plan(r: Resolved) -> Plan:
    cfg = r.cfg
    sources = [Item(f"source {s.name}", s.path or f"{s.hub_id} @ {s.revision}",
                    ("exists" if repo_path(s.path).exists() else "MISSING") if s.path else "read from the hub")
               for s in cfg.sources]
    return Plan(r, facts=[
        ("filters", f"min_cn_ratio {cfg.filters.min_cn_ratio}, English fallback "
                    f"{'kept' if cfg.filters.allow_english_fallback else 'dropped'}"),
        ("buckets", " / ".join(f"≤{b}" for b in cfg.buckets) + " tokens"),
        ("mix", f"zh share of tokens: sft {cfg.mix.sft.zh_share}, pref {cfg.mix.pref.zh_share}; "
                f"on shortfall: {cfg.mix.on_shortfall}; seed {cfg.seed}"),
    ], inputs=[*sources, base_model_input(r)],
       outputs=[dir_output(cfg.output_dir, "pools + manifest + data card")]
               + [Item("file", f"{cfg.output_dir}/{f}", "written atomically") for f in OUTPUT_FILES])


def run(r: Resolved):
    raise cli.NotImplementedStage(STAGE)


def main(argv: list[str] | None = None) -> int:
    return cli.main(STAGE, plan, run, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
