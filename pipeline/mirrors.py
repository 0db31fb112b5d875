"""mirrors: `make mirrors` — the eval sets' published files (CMMLU, C-Eval, hellaswag, winogrande) from the hub at the
revisions `configs/mirrors.yaml` pins, SHA256-checked and unpacked where the evaluate config's `mirrors` point.

``python -m pipeline.mirrors [--hw 4090] [--config FILE] [--overrides "…"] [--tasks cmmlu,ceval-valid] [--if-missing]
[--force]``: the tasks are those of HW's evaluate config that it reads from a mirror `configs/mirrors.yaml` has a source
for; ``--if-missing`` (what `make eval DRY_RUN=0` runs first) fetches only those whose folder is missing; a folder that
is already there and checks out is kept unless ``--force``. configs/hub.yaml's endpoint (HF_ENDPOINT) is honoured.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.core.errors import ConfigError, StageError
from pipeline.core.paths import repo_path, shown
from pipeline.core.profiles import apply_hub_env, load_hub
from pipeline.core.strict import parse_overrides
from pipeline.evaluation import evalsets
from pipeline.evaluation import mirrors as M
from pipeline.stage.cli import add_common, guarded, setup_logging
from pipeline.stage.resolve import resolve, split_overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.mirrors", description=__doc__.split("\n\n")[0])
    add_common(parser)
    parser.add_argument("--config", default="", help="the evaluate config (default: HW's)")
    parser.add_argument("--tasks", default="", help="comma-separated tasks (default: the evaluate config's mirrors)")
    parser.add_argument("--if-missing", action="store_true", help="fetch only mirrors whose folder is missing")
    parser.add_argument("--force", action="store_true", help="download and unpack again even when present")
    parser.add_argument("--sources", default=str(M.CONFIG), help="the sources file (default configs/mirrors.yaml)")
    args = parser.parse_args(argv)
    setup_logging()
    return guarded(lambda: run(args))


def targets(args: argparse.Namespace) -> tuple[M.MirrorsConfig, dict[str, str]]:
    """{task: folder} to fill: the evaluate config's mirrored tasks that have a source (or --tasks)."""
    sources = M.load(args.sources)
    overrides = split_overrides(parse_overrides(args.set, args.overrides)).get("evaluate", [])
    cfg = resolve("evaluate", config=args.config or None, hw=args.hw, overrides=overrides).cfg
    wanted = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in wanted if t not in sources.sources]
    if unknown:
        raise ConfigError([f"--tasks: no source for {', '.join(map(repr, unknown))} in {shown(args.sources)}; "
                           f"sources: {', '.join(sources.sources)}"])
    if wanted:
        return sources, {t: cfg.mirrors.get(t) or str(M.default_folder(sources, t)) for t in wanted}
    return sources, {t: f for t, f in cfg.mirrors.items() if t in cfg.tasks and t in sources.sources}


def run(args: argparse.Namespace) -> None:
    sources, todo = targets(args)
    if not todo:
        if args.if_missing:  # `make eval` / `make pipeline` on a profile without mirrors (HW=cpu): nothing to say
            return
        print(f"make mirrors: nothing to fetch — the evaluate config of HW={args.hw} reads no mirror that "
              f"{shown(args.sources)} has a source for")
        return
    env = apply_hub_env(load_hub())
    print(f"make mirrors: HF_ENDPOINT {env['HF_ENDPOINT']}, HF_HOME {env['HF_HOME']}")
    failed = []
    for task, folder in todo.items():
        dest = repo_path(folder)
        present = evalsets.mirror_problem(task, dest) is None
        if present and not args.force:
            made = M.marker(dest)
            print(f"{task}: present in {shown(dest)}" + (f" (fetched from {M.origin(made)})" if made
                                                         else " (your own copy; kept)"))
            continue
        if args.if_missing and dest.exists() and not present:
            failed.append(f"{task}: {shown(dest)} exists but is not a usable mirror "
                          f"({evalsets.mirror_problem(task, dest)}); run `make mirrors` to replace it with the "
                          f"published files, or fix the folder")
            continue
        src = sources.sources[task]
        print(f"{task}: downloading {', '.join(src.files)} from {src.repo}@{src.revision} ({src.licence}) …", flush=True)
        try:
            print(M.fetch(task, src, dest))
        except (ValueError, RuntimeError, OSError) as err:
            failed.append(str(err))
    unpinned = [(t, n, d) for t in todo for n, d in ((M.marker(repo_path(todo[t])) or {}).get("sha256") or {}).items()
                if sources.sources[t].files.get(n) is None]
    if unpinned:
        print(f"\nNot pinned in {shown(args.sources)} (the values seen now; pin them so a changed file is refused):")
        for task, name, digest in unpinned:
            print(f"  sources.{task}.files: {{{name}: {digest}}}")
    if failed:
        raise StageError("make mirrors: " + "; ".join(failed))
    print(f"\nevaluate reads them from: {', '.join(f'{t} → {shown(repo_path(f))}' for t, f in todo.items())}")


if __name__ == "__main__":
    sys.exit(main())
