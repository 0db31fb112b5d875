"""sft: LoRA / QLoRA supervised fine-tuning on the prepared pool, tracked in MLflow, the adapter registered.

Built by the sft issue; for now its dry run shows the plan and a real run exits 2.
"""

from __future__ import annotations

import sys

from pipeline import cli
from pipeline.config import Resolved
from pipeline.plan import Plan, base_model_input, data_input, dir_output, registry_output

STAGE = "sft"


def plan(r: Resolved) -> Plan:
    cfg = r.cfg
    lora = cfg.lora
    method = (f"QLoRA ({cfg.qlora.quant_type}, double quant {cfg.qlora.double_quant}, compute "
              f"{cfg.qlora.compute_dtype})" if r.hw.qlora else f"LoRA on the {r.hw.precision} base")
    t = cfg.train
    return Plan(r, facts=[
        ("method", f"{method}; r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout} on {', '.join(lora.target_modules)}"),
        ("schedule", f"{t.epochs} epochs, lr {t.lr}, {t.scheduler}, warmup {t.warmup_ratio}, "
                     f"max_grad_norm {t.max_grad_norm}, packing {'on' if t.packing else 'off'}, seed {t.seed}"),
        ("log backend", f"MLflow + {cfg.log_backend}" if cfg.log_backend != "none" else "MLflow"),
    ], inputs=[data_input(cfg.data, ("sft.jsonl", "sft_eval.jsonl"), r), base_model_input(r)],
       outputs=[dir_output(cfg.output_dir, "adapter + checkpoints"), registry_output(cfg.register)])


def run(r: Resolved):
    raise cli.NotImplementedStage(STAGE)


def main(argv: list[str] | None = None) -> int:
    return cli.main(STAGE, plan, run, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
