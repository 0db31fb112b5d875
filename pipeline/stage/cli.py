"""The command line every stage shares, and the exit-code contract.

``python -m pipeline.<stage> [--config FILE] [--hw NAME] [--dry-run true|false] [--set key=value]...
[--overrides "k=v k2=v2"]`` (a stage with variants adds its flag, align ``--loss orpo|dpo``; a training stage
``--accel NAME``). ``--config`` defaults to the file the hardware profile's ``config_dir`` holds for the stage. A dry
run (the default) prints the plan and writes nothing. Exit codes: 0 done, 1 the stage failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.core.errors import ConfigError, StageError
from pipeline.core.process import Interrupted, end_waiting_mlflow_run, supervised
from pipeline.core.profiles import DEFAULT_HW, apply_hub_env
from pipeline.core.runtime import launched, rank
from pipeline.core.secrets import ScrubbingFormatter
from pipeline.core.strict import parse_overrides
from pipeline.stage import accel
from pipeline.stage.dryrun import precheck, render
from pipeline.stage.resolve import resolve
from pipeline.stage.spec import Stage, variant_flags
from pipeline.tracking import runs
from pipeline.tracking.preflight import check_store

log = logging.getLogger("pipeline")


def parse_bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hw", default=DEFAULT_HW, help=f"hardware profile in configs/hw/ (default: {DEFAULT_HW})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable); values are YAML; hw.KEY overrides the profile")
    parser.add_argument("--overrides", default="", metavar='"K=V K2=V2"',
                        help="the same as several --set, as one shell-split string (MLproject passes this)")


def add_variant(parser: argparse.ArgumentParser, stage: Stage) -> None:
    """``--<variant_flag>`` of a stage with variants; empty means "as the config says" (MLproject's default)."""
    def choice(text: str) -> str | None:
        if text in ("", None):
            return None
        if text not in stage.variants:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(stage.variants)}, got {text!r}")
        return text

    parser.add_argument(f"--{stage.variant_flag}", type=choice, default=None, metavar="|".join(stage.variants),
                        help=f"the {stage.name} stage's {stage.variant_flag}: picks configs/{stage.name}/"
                             f"<{stage.variant_flag}>.yaml when --config is not given (default: {stage.variants[0]})")


def add_variants(parser: argparse.ArgumentParser) -> None:
    """The variant flag of every stage that has one, for commands over all stages (plan, pipeline)."""
    for stage in variant_flags().values():
        add_variant(parser, stage)


def variants(args: argparse.Namespace) -> dict[str, str | None]:
    """Stage name → the variant the command line asked for (or None)."""
    return {stage.name: getattr(args, flag.replace("-", "_")) for flag, stage in variant_flags().items()}


def make_parser(stage: Stage) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m pipeline.{stage.name}", description=stage.summary)
    parser.add_argument("--config", default="",
                        help="stage config YAML (default: the profile's config_dir/<stage>.yaml)")
    add_common(parser)
    parser.add_argument("--dry-run", type=parse_bool, default=True, metavar="true|false",
                        help="print the plan and write nothing (default: true)")
    parser.add_argument("--check", action="store_true",
                        help="with --dry-run: also fail (exit 2) on what would stop the real run — a missing or "
                             "corrupt input, a missing resume folder, a machine without the profile's device")
    if stage.variants:
        add_variant(parser, stage)
    if stage.accel:
        parser.add_argument("--accel", default="", metavar="NAME",
                            help="run under `accelerate launch` with configs/accelerate/NAME.yaml (e.g. ddp: one "
                                 "process per GPU); empty = one process")
    return parser


PROGRESS_EVERY_S = "30"  # a progress bar's fewest seconds between redraws when stderr is no terminal


def setup_logging() -> None:
    """stdlib logging, configured once; ranks other than 0 only warn. When stderr is not a terminal (a log file, CI,
    `nohup`), every tqdm bar — the trainer's, datasets', MLflow's downloads, lm-eval's — redraws at most every
    ``PROGRESS_EVERY_S`` seconds instead of ten times a second, so a log keeps a few lines per bar (tqdm reads
    ``TQDM_MININTERVAL`` when it is first imported, after this; a value already set wins)."""
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_MININTERVAL", PROGRESS_EVERY_S)
    logging.basicConfig(level=logging.INFO if rank() == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def main(stage: Stage, argv: list[str] | None = None) -> int:
    """Parse, resolve the config, then print the plan (dry run) or run the stage."""
    args = make_parser(stage).parse_args(argv)
    setup_logging()

    def go() -> None:
        variant = getattr(args, stage.variant_flag, None) if stage.variant_flag else None
        if getattr(args, "accel", ""):
            accel.config_path(args.accel)  # an unknown name: exit 2 before the store or any run is touched
        resolved = resolve(stage, config=args.config or None, hw=args.hw,
                           overrides=parse_overrides(args.set, args.overrides), variant=variant)
        hub_env = apply_hub_env(resolved.hub)
        check_store()  # an unreachable, read-only or corrupt tracking store: one line, before anything loads
        if getattr(args, "accel", "") and not args.dry_run and not launched():
            relaunch(stage, args.accel, list(sys.argv[1:] if argv is None else argv), resolved.hw.device)
        elif args.dry_run:
            plan = accel.annotate(stage.plan(resolved), getattr(args, "accel", ""))
            if args.check:
                precheck([plan])
            print(render(plan, hub_env))
        else:
            log.info("%s finished: %s", stage.name, stage.run(resolved))

    return supervise(stage.name, go, trains=_trains(stage))


def _trains(stage: Stage) -> bool:
    """Whether the stage continues from checkpoints (``train.resume``): the hint a cut-short run gives."""
    from dataclasses import fields

    return any(f.name == "train" for f in fields(stage.config))


def supervise(name: str, fn: Callable[[], Any], *, trains: bool = False) -> int:
    """:func:`guarded` for a stage or the pipeline: signals end it (children first, run KILLED), a dead launcher stops
    it, and an error that came before its run was attached still reaches the run `mlflow run` created (``error`` and
    ``stage`` tags, the log so far under ``logs/``)."""
    folder = Path(tempfile.mkdtemp(prefix=f"zh-align-{name}-early-"))
    handler = logging.FileHandler(folder / f"{name}.log", encoding="utf-8")
    handler.setFormatter(ScrubbingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)

    def failed(err: BaseException) -> None:
        handler.flush()
        runs.record_failure(name, err, folder / f"{name}.log", trains)

    try:
        with supervised():
            code = guarded(fn, on_error=failed)
        if code > 128:  # stopped by a signal: the run is closed KILLED; keep `mlflow run` from marking it FAILED
            end_waiting_mlflow_run()
        return code
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
        shutil.rmtree(folder, ignore_errors=True)


def guarded(fn: Callable[[], Any], on_error: Callable[[BaseException], Any] | None = None) -> int:
    """Run ``fn`` under the exit-code contract: 0 done; a StageError is printed, exit 1; a ConfigError, exit 2; a
    signal, 128 + its number. The one place an error becomes an exit code. ``on_error`` sees every error first."""
    try:
        fn()
    except (ConfigError, StageError, Interrupted) as err:
        if on_error:
            on_error(err)
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code if isinstance(err, Interrupted) else 2 if isinstance(err, ConfigError) else 1
    except Exception as err:  # a bug: its traceback is the report, and the run says what it was
        if on_error:
            on_error(err)
        raise
    return 0


def relaunch(stage: Stage, name: str, argv: list[str], device: str) -> None:
    """Start the stage again under `accelerate launch` with configs/accelerate/<name>.yaml (:mod:`.accel`): one
    process per GPU (two gloo processes for DDP on CPU). The children inherit MLFLOW_RUN_ID; rank 0 logs to that run,
    the others log nothing."""
    config = accel.config_path(name)
    found = accel.problems(name, device)
    if found:
        raise ConfigError(found)
    args = [a for a in argv if not a.startswith("--accel")]
    if "--accel" in argv:  # the value of a separate `--accel NAME`
        i = argv.index("--accel")
        args = argv[:i] + argv[i + 2:]
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           *accel.launch_args(str(config), device, accel.load(config)), "-m", f"pipeline.{stage.name}", *args]
    log.info("launching: %s", " ".join(cmd))
    code = subprocess.call(cmd)
    if code:
        raise StageError(f"{stage.name} under `accelerate launch` ({name}) exited {code}; see the ranks' output above")
