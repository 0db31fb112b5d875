"""plan: ``make plan`` — the plans of every stage on one page.

``python -m pipeline.plan --hw NAME [--loss orpo|dpo] [--set key=value]...``. A key is applied to every stage whose
config has it (``model=…``, ``hw.micro_batch=1``); prefix it with a stage name to aim at one stage
(``sft.lora.r=8``). Launched by ``mlflow run . -e plan`` (``MLFLOW_RUN_ID`` set), it also leaves a FINISHED run
carrying the page and each stage's resolved config as artifacts. Imports nothing heavy.
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml

from pipeline.core.resolved import Resolved
from pipeline.core.secrets import redact
from pipeline.core.strict import parse_overrides
from pipeline.stage import cli
from pipeline.stage.dryrun import pages
from pipeline.stage.resolve import resolve_all
from pipeline.tracking import runs
from pipeline.tracking.preflight import check_store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.plan", description=__doc__.split("\n\n")[0])
    cli.add_common(parser)
    cli.add_variants(parser)
    args = parser.parse_args(argv)
    cli.setup_logging()

    def go() -> None:
        resolved = resolve_all(args.hw, parse_overrides(args.set, args.overrides), cli.variants(args))
        check_store()  # `make plan` keeps its page on a run: the store must take it
        text = pages(resolved)
        print(text)
        if os.environ.get("MLFLOW_RUN_ID"):  # launched by `mlflow run . -e plan`: keep the page on that run
            record(resolved, text)

    return cli.guarded(go)


def record(resolved: list[Resolved], text: str) -> None:
    configs = {r.stage: r.as_dict() for r in resolved}
    first = resolved[0]
    with runs.start_run("plan", configs, hw=first.hw.name, model=first.model.name):
        runs.log_text(text, "plan.txt")
        for r in resolved:
            runs.log_text(yaml.safe_dump(redact(r.as_dict()), allow_unicode=True, sort_keys=False),
                          f"resolved/{r.stage}.yaml")


if __name__ == "__main__":
    sys.exit(main())
