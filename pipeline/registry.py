"""registry: `make promote` and `make pull` — move an alias to a registered version (gate-aware), or download a
registered model as a plain folder (a merged model loads with transformers, an adapter with PEFT).

``python -m pipeline.registry promote --model NAME --version N [--alias champion] [--force]``
``python -m pipeline.registry pull --model NAME@ALIAS|NAME/VERSION --dest DIR [--overwrite] [--verify] [--hw NAME]
[--set model=…]``: an adapter must belong to the model that ``--set model=…`` names, else to the profile's or to a
model definition of this repo (its recorded base); ``--verify``
loads a merged folder with transformers and checks its logits against those logged at export.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.core.errors import ConfigError, StageError
from pipeline.core.strict import parse_overrides
from pipeline.models.loading import base_of
from pipeline.stage.cli import add_common, guarded, setup_logging
from pipeline.stage.resolve import resolve
from pipeline.tracking import model_registry
from pipeline.tracking.preflight import check_store
from pipeline.training.probes import check_probe_logits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.registry", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("promote", help="move an alias to a version (refused on a failed eval gate unless --force)")
    p.add_argument("--model", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--alias", default="champion")
    p.add_argument("--force", action="store_true")
    q = sub.add_parser("pull", help="download a registered model into a folder")
    q.add_argument("--model", required=True, help="NAME@ALIAS or NAME/VERSION")
    q.add_argument("--dest", required=True)
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--verify", action="store_true", help="load a merged model and compare its logits with export's")
    add_common(q)
    args = parser.parse_args(argv)
    setup_logging()
    if args.command == "promote":
        return guarded(lambda: promote(args))
    return guarded(lambda: pull(args))


def promote(args: argparse.Namespace) -> None:
    problems = []
    if not args.model.strip() or "@" in args.model or "/" in args.model:
        problems.append(f"MODEL {args.model!r}: give the registered model's name alone, e.g. `make promote "
                        f"MODEL=zh-align-merged VERSION=3` (the names and versions: `make ui` → Models)")
    if not args.version.strip().isdigit():
        problems.append(f"VERSION {args.version!r}: give the version number to promote, e.g. VERSION=3")
    if not args.alias.strip():
        problems.append("ALIAS is empty; leave it out for champion, or name the alias to move")
    if problems:
        raise ConfigError(problems)
    check_store()
    print(model_registry.promote(args.model.strip(), args.version.strip(), args.alias.strip(), args.force))


def check_dest(text: str, overwrite: bool) -> Path:
    """DEST as `make pull` may write it: given, not a file, empty unless OVERWRITE=1."""
    if not text.strip():
        raise ConfigError(["DEST is empty; name the folder to pull into, e.g. `make pull MODEL=zh-align-merged@"
                           "candidate DEST=outputs/pulled`"])
    dest = Path(text).expanduser()
    if dest.exists() and not dest.is_dir():
        raise ConfigError([f"DEST {text!r} is a file; pull writes a folder: give a new or empty folder's path"])
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise ConfigError([f"DEST {text!r} is not empty; pass OVERWRITE=1 to replace it, or give another folder"])
    return dest


def pull(args: argparse.Namespace) -> None:
    if not args.model.strip():
        raise ConfigError(["MODEL is empty; give `name@alias` or `name/version`, e.g. `make pull "
                           "MODEL=zh-align-merged@candidate DEST=outputs/pulled`"])
    check_dest(args.dest, args.overwrite)
    overrides = parse_overrides(args.set, args.overrides)
    r = resolve("export", hw=args.hw, overrides=overrides)
    check_store()
    base = f"{r.model.hub_id or r.model.name} (model {r.model.name}, HW={r.hw.name})"
    dest = model_registry.pull(args.model, Path(args.dest), args.overwrite, base=base,  # no model named: the adapter's own
                               same_base=lambda recorded: base_of(recorded, r.model, overrides) is not None)
    print(f"pulled {args.model} into {dest}")
    if args.verify:
        if (dest / "adapter_config.json").exists():
            raise StageError(f"{args.model} is an adapter: --verify checks merged models (load it with PEFT instead)")
        print(f"verified: max |logit − logged at export| = {check_probe_logits(dest):.2e}")


if __name__ == "__main__":
    sys.exit(main())
