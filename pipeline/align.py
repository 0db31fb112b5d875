"""align: ORPO or DPO (`loss: orpo | dpo`) from the SFT adapter, with the R-DPO length penalty and the zh share.

Built by the align issue; for now its dry run shows the plan and a real run exits 2.
"""

from __future__ import annotations

import sys

from pipeline import cli
from pipeline.config import Resolved
from pipeline.plan import Item, Plan, base_model_input, data_input, dir_output, model_ref_input, registry_output

STAGE = "align"


def plan(r: Resolved) -> Plan:
    cfg = r.cfg
    t = cfg.train
    if cfg.start_from is None:
        start = Item("start point (SFT adapter)", f"latest FINISHED sft run with base {r.model.name} and profile "
                     f"{r.hw.name}", f"looked up in MLflow at run time; produced by `make sft HW={r.hw.name} DRY_RUN=0`")
    else:
        start = model_ref_input("start point (SFT adapter)", cfg.start_from, "sft", r)
    reference = "none (ORPO)" if cfg.reference == "none" else "the frozen SFT policy"
    return Plan(r, facts=[
        ("loss", f"{cfg.loss}, beta {cfg.beta}, length penalty alpha {cfg.length_penalty}, reference: {reference}"),
        ("schedule", f"{t.epochs} epochs, lr {t.lr}, {t.scheduler}, warmup {t.warmup_ratio}, "
                     f"max_grad_norm {t.max_grad_norm}, seed {t.seed}"),
        ("log backend", f"MLflow + {cfg.log_backend}" if cfg.log_backend != "none" else "MLflow"),
    ], inputs=[start, data_input(cfg.data, ("pref.jsonl", "pref_eval.jsonl"), r), base_model_input(r)],
       outputs=[dir_output(cfg.output_dir, "adapter + checkpoints"), registry_output(cfg.register)])


def run(r: Resolved):
    raise cli.NotImplementedStage(STAGE)


def main(argv: list[str] | None = None) -> int:
    return cli.main(STAGE, plan, run, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
