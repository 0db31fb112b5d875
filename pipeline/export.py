"""export: merge the LoRA adapter into the bf16 base, check logits, write a model card, register the merged model.

Built by the export issue; for now its dry run shows the plan and a real run exits 2.
"""

from __future__ import annotations

import sys

from pipeline import cli
from pipeline.config import Resolved
from pipeline.plan import Plan, base_model_input, dir_output, model_ref_input, registry_output

STAGE = "export"


def plan(r: Resolved) -> Plan:
    cfg = r.cfg
    return Plan(r, facts=[
        ("merge", f"into the bf16 base (never a 4-bit one); max |merged − adapter| logit ≤ {cfg.logits_tolerance}"),
    ], inputs=[model_ref_input("adapter", cfg.adapter, "align", r), base_model_input(r)],
       outputs=[dir_output(cfg.output_dir, "merged model + model card"), registry_output(cfg.register)])


def run(r: Resolved):
    raise cli.NotImplementedStage(STAGE)


def main(argv: list[str] | None = None) -> int:
    return cli.main(STAGE, plan, run, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
