"""evaluate: lm-evaluation-harness on cmmlu / ceval-valid / hellaswag / winogrande, tuned vs base.

Built by the evaluate issue; for now its dry run shows the plan and a real run exits 2.
"""

from __future__ import annotations

import sys

from pipeline import cli
from pipeline.config import Resolved
from pipeline.plan import Item, Plan, base_model_input, dir_output, model_ref_input, repo_path

STAGE = "evaluate"


def plan(r: Resolved) -> Plan:
    cfg = r.cfg
    mirrors = [Item(f"mirror of {task}", folder, "exists" if repo_path(folder).is_dir() else "MISSING")
               for task, folder in cfg.mirrors.items()]
    return Plan(r, facts=[
        ("tasks", ", ".join(cfg.tasks)),
        ("settings", f"few-shot {'task default' if cfg.num_fewshot is None else cfg.num_fewshot}, "
                     f"limit {cfg.limit or 'none'}, batch size {cfg.batch_size}, chat template "
                     f"{'on' if cfg.apply_chat_template else 'off'}, system prompt "
                     f"{'the model definition' if cfg.system_prompt else 'none'}, dtype {r.hw.precision}"),
        ("compare", "tuned vs base (forgetting report)" if cfg.compare_base else "tuned only"),
    ], inputs=[model_ref_input("adapter under test", cfg.adapter, "sft", r), base_model_input(r), *mirrors],
       outputs=[dir_output(cfg.output_dir, "results.json + results.csv + chart")])


def run(r: Resolved):
    raise cli.NotImplementedStage(STAGE)


def main(argv: list[str] | None = None) -> int:
    return cli.main(STAGE, plan, run, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
