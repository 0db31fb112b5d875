"""registry: `make promote` and `make pull` — move an alias to a registered version (gate-aware), or download a
registered model as a plain folder (a merged model loads with transformers, an adapter with PEFT).

``python -m pipeline.registry promote --model NAME --version N [--alias champion] [--force]``
``python -m pipeline.registry pull --model NAME@ALIAS|NAME/VERSION --dest DIR [--overwrite]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.cli import StageError, setup_logging


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
    args = parser.parse_args(argv)
    setup_logging()
    from pipeline import tracking

    try:
        if args.command == "promote":
            print(tracking.promote(args.model, args.version, args.alias, args.force))
        else:
            print(f"pulled {args.model} into {tracking.pull(args.model, Path(args.dest), args.overwrite)}")
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
