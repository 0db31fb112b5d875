"""The command-line contract every stage shares.

``python -m pipeline.<stage> [--config FILE] [--hw NAME] [--dry-run true|false] [--set key=value]...
[--overrides "k=v k2=v2"]`` (align adds ``--loss orpo|dpo``). ``--config`` defaults to ``configs/<stage>.yaml``, or to
its offline twin in ``configs/smoke/`` for ``--hw cpu``. A dry run (the default) prints the plan and writes nothing.
Exit codes: 0 done, 1 the stage failed, 2 bad input (config, arguments).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from pipeline.config import DEFAULT_HW, LOSSES, ConfigError, Resolved, apply_hub_env, parse_overrides, resolve

log = logging.getLogger("pipeline")
TRAINING = ("sft", "align")  # the stages that can run on several processes (--accel)


class StageError(RuntimeError):
    """An expected failure with a message that says what is wrong and how to fix it: printed, exit 1."""


def parse_bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_loss(text: str) -> str | None:
    """`orpo` or `dpo`; empty means "as the config says" (MLproject passes an empty default)."""
    if text in ("", None):
        return None
    if text not in LOSSES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(LOSSES)}, got {text!r}")
    return text


def make_parser(stage: str, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m pipeline.{stage}", description=description)
    parser.add_argument("--config", default="",
                        help="stage config YAML (default: configs/<stage>.yaml; configs/smoke/<stage>.yaml with --hw cpu)")
    add_common(parser)
    parser.add_argument("--dry-run", type=parse_bool, default=True, metavar="true|false",
                        help="print the plan and write nothing (default: true)")
    if stage == "align":
        parser.add_argument("--loss", type=parse_loss, default=None, metavar="orpo|dpo",
                            help="orpo or dpo: picks configs/<loss>.yaml when --config is not given")
    if stage in TRAINING:
        parser.add_argument("--accel", default="", metavar="NAME",
                            help="run under `accelerate launch` with configs/accelerate/NAME.yaml (e.g. ddp: one "
                                 "process per GPU); empty = one process")
    return parser


def relaunch(stage: str, accel: str, argv: list[str], device: str) -> int:
    """Start the stage again under `accelerate launch` with configs/accelerate/<accel>.yaml: one process per GPU (two
    gloo processes on CPU). The children inherit MLFLOW_RUN_ID; rank 0 logs to that run, the others log nothing."""
    import subprocess

    from pipeline.config import CONFIGS

    config = CONFIGS / "accelerate" / f"{accel}.yaml"
    if not config.exists():
        choices = sorted(p.stem for p in config.parent.glob("*.yaml"))
        print(f"error: --accel {accel!r}: no {config}; choices: {', '.join(choices)}", file=sys.stderr)
        return 2
    if device == "cpu":  # torchrun's two processes; the Trainer (use_cpu) joins them with gloo
        extra = ["--multi_gpu", "--num_processes", "2"]
    else:
        import torch

        extra = ["--num_processes", str(max(1, torch.cuda.device_count()))]
    args = [a for a in argv if not a.startswith("--accel")]
    if "--accel" in argv:  # the value of a separate `--accel NAME`
        i = argv.index("--accel")
        args = argv[:i] + argv[i + 2:]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), *extra,
           "-m", f"pipeline.{stage}", *args]
    log.info("launching: %s", " ".join(cmd))
    return subprocess.call(cmd)


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hw", default=DEFAULT_HW, help=f"hardware profile in configs/hw/ (default: {DEFAULT_HW})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable); values are YAML; hw.KEY overrides the profile")
    parser.add_argument("--overrides", default="", metavar='"K=V K2=V2"',
                        help="the same as several --set, as one shell-split string (MLproject passes this)")


def setup_logging() -> None:
    """stdlib logging, configured once; ranks other than 0 only warn."""
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def main(stage: str, plan: Callable[[Resolved], Any], run: Callable[[Resolved], Any],
         argv: list[str] | None = None, description: str | None = None) -> int:
    """Parse, resolve the config, then print the plan (dry run) or run the stage."""
    args = make_parser(stage, description).parse_args(argv)
    setup_logging()
    try:
        resolved = resolve(stage, config=args.config or None, hw=args.hw,
                           overrides=parse_overrides(args.set, args.overrides), loss=getattr(args, "loss", None))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    hub_env = apply_hub_env(resolved.hub)
    if getattr(args, "accel", "") and not args.dry_run and "LOCAL_RANK" not in os.environ:
        return relaunch(stage, args.accel, list(sys.argv[1:] if argv is None else argv), resolved.hw.device)
    if args.dry_run:
        from pipeline.plan import render

        return guarded(lambda: print(render(plan(resolved), hub_env)))
    return guarded(lambda: log.info("%s finished: %s", stage, run(resolved)))


def guarded(fn: Callable[[], Any]) -> int:
    """Run ``fn`` under the exit-code contract: 0 done; a StageError is printed, exit 1; a ConfigError, exit 2."""
    try:
        fn()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
