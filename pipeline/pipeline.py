"""pipeline: prepare → sft → align → evaluate → export as child runs of one parent run (MLflow's multistep pattern).

``python -m pipeline.pipeline --hw NAME [--loss orpo|dpo] [--accel NAME] [--resume RUN_ID] [--set key=value]...
[--dry-run true|false]``
Each stage is its own ``mlflow run`` entry point, started as a child of this run, and takes the previous stages'
outputs by run id: sft and align read the pool of the prepare child (``data.run_id``), align starts from the sft
child's adapter (``start_from``), evaluate and export take the align child's adapter (``adapter``); evaluate also
judges the sft child's adapter (``earlier``), so both registered adapters carry their gate. Overrides are
routed as in ``make plan``: ``model=…`` or ``hw.micro_batch=1`` reach every stage that has the key, ``sft.lora.r=8``
only sft. Every stage's config is checked before the first child starts. A dry run (the default) prints the whole
chain's plan. The parent run carries the children's run ids (tags ``child.<stage>``), their key metrics
(``<stage>/…``) and ``summary.json``; the summary is printed at the end. ``--resume RUN_ID`` (an earlier pipeline
run, typically a failed one) reuses each of its FINISHED children that would be launched with exactly the same
parameters (overrides and upstream run ids) from the same git commit, and runs the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.errors import StageError
from pipeline.core.resolved import Resolved
from pipeline.core.strict import parse_overrides, yaml_value
from pipeline.stage import accel, cli
from pipeline.stage.dryrun import Plan, pages, precheck
from pipeline.stage.resolve import resolve_all, split_overrides
from pipeline.stage.spec import get, names, stages, variant_flags
from pipeline.tracking import lineage, runs
from pipeline.tracking.preflight import check_store

log = logging.getLogger("pipeline.pipeline")


@dataclass
class Chain:
    """The resolved chain: every stage's config (as planned) and each stage's own overrides before the links."""
    hw: str
    variants: dict[str, str | None]     # stage → its variant (align's loss), None = as its config says
    accel: str
    resolved: list[Resolved]
    overrides: dict[str, list[tuple[str, Any]]]
    resume: str = ""            # an earlier pipeline run whose FINISHED children are reused where nothing changed
    given: list[str] = field(default_factory=list)  # the overrides as given ("key=value"), logged for `make rerun`

    def linked(self, stage: str, ids: dict[str, str]) -> list[tuple[str, Any]]:
        """The stage's overrides plus its links to the run ids of the stages before it."""
        return [*self.overrides[stage], *((key, ids[source]) for key, source in get(stage).links.items())]

    def parameters(self, stage: str, ids: dict[str, str], extra: tuple[tuple[str, Any], ...] = ()) -> dict[str, str]:
        """The `mlflow run` parameters of one child (``extra``: overrides after its own, e.g. to resume it)."""
        overrides = " ".join(shlex.quote(f"{k}={yaml_value(v)}") for k, v in [*self.linked(stage, ids), *extra])
        return get(stage).parameters(hw=self.hw, overrides=overrides, variant=self.variants.get(stage) or "",
                                     accel=self.accel)

    def annotate(self, plan: Plan) -> Plan:
        """A stage's plan with the launch line and sharding of ``--accel`` where it runs under accelerate."""
        return accel.annotate(plan, self.accel) if get(plan.resolved.stage).accel else plan

    def variant_choices(self) -> dict[str, str]:
        """Each variant flag with the variant in force (``{"loss": "orpo"}``)."""
        return {flag: self.variants.get(stage.name) or stage.variants[0] for flag, stage in variant_flags().items()}

    def launch_choices(self) -> dict[str, Any]:
        """What the parent run logs as ``pipeline.*``: the variants by flag, accel, overrides, resume."""
        return {**self.variant_choices(), "accel": self.accel, "overrides": self.given, "resume": self.resume}


def chain(hw: str, overrides: list[tuple[str, Any]], variants: dict[str, str | None], accel: str = "",
          resume: str = "") -> Chain:
    """Resolve every stage with the links in place (placeholders for the run ids), so a bad key in any stage stops the
    chain before its first child starts."""
    per_stage = split_overrides(overrides)
    linked = [(f"{s.name}.{key}", f"<run id of the {src} child>") for s in stages() for key, src in s.links.items()]
    return Chain(hw, variants, accel, resolve_all(hw, [*overrides, *linked], variants), per_stage, resume.strip(),
                 [f"{k}={yaml_value(v)}" for k, v in overrides])


def page(c: Chain) -> str:
    """The dry run: how the children link, then every stage's plan as it will run."""
    links = "; ".join(f"{s.name} ← " + ", ".join(f"{key}={src}" for key, src in s.links.items())
                      for s in stages() if s.links)
    chosen = ", ".join(f"{flag.upper()}={v}" for flag, v in c.variant_choices().items())
    head = [f"━━ pipeline ━━ (HW={c.hw}{', ' + chosen if chosen else ''}) — {' → '.join(names())}, each a child run "
            f"of one parent run", f"  links  {links}",
            "  after  the parent run holds child.<stage> run ids, the children's key metrics and summary.json"]
    return "\n\n".join(["\n".join(head), pages(c.resolved, c.annotate)])


@dataclass
class PipelineResult:
    run_id: str | None
    children: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"pipeline run {self.run_id}: " + ", ".join(f"{s} {i}" for s, i in self.children.items())


def run(c: Chain) -> PipelineResult:
    """Start the children in chain order under one parent run; a failed child fails the parent, naming it."""
    configs = {"pipeline": c.launch_choices(), **{r.stage: r.as_dict() for r in c.resolved}}
    ids: dict[str, str] = {}
    earlier = lineage.pipeline_children(c.resume) if c.resume else {}
    sha = runs.git_state()["git.sha"]
    reused: list[str] = []
    with runs.start_run("pipeline", configs, hw=c.hw, model=c.resolved[0].model.name,
                        tags={"resumed_from": c.resume} if c.resume else None) as parent:
        runs.log_text(page(c), "plan.txt")
        for stage in stages():
            started = time.monotonic()
            params = c.parameters(stage.name, ids)
            same = reusable(earlier.get(stage.name), params, sha)
            if same:
                log.info("pipeline: %s unchanged since run %s (same parameters, code and inputs): reused", stage.name,
                         same)
                run_id, status = same, "FINISHED"
                reused.append(stage.name)
                runs.set_tags({f"reused.{stage.name}": "true"})
            else:
                if continuable(earlier.get(stage.name), params, stage):
                    log.info("pipeline: %s was cut short in run %s: continuing its newest whole checkpoint",
                             stage.name, earlier[stage.name]["run_id"])
                    params = c.parameters(stage.name, ids, RESUME_TRAINING)
                log.info("pipeline: starting %s", stage.name)
                run_id, status = runs.run_entry_point(stage.name, params, run_name=f"{stage.name}-{c.hw}")
            ids[stage.name] = run_id
            runs.set_tags({f"child.{stage.name}": run_id})
            runs.log_metrics({f"{stage.name}/wall_seconds": time.monotonic() - started})
            child = runs.get_run(run_id)
            if status != "FINISHED":  # FAILED or KILLED
                failed(stage.name, run_id, status, child, ids, parent.info.run_id if parent else "")
            runs.log_metrics({f"{stage.name}/{k}": v for k, v in child.data.metrics.items()
                              if k.startswith(stage.key_metrics)})
        summary = {**lineage.chain_summary(ids), "hw": c.hw, **c.variant_choices(), "reused": reused}
        runs.log_dict(summary, "summary.json")
    result = PipelineResult(parent.info.run_id if parent else None, ids, summary)
    print(describe(result))
    return result


def failed(stage: str, run_id: str, status: str, child: Any, ids: dict[str, str], parent: str = "") -> None:
    """Fail the parent naming the child, its error, the finished children and how to go on."""
    error = child.data.tags.get("error", "see the child's logs/ artifact")
    done = ", ".join(f"{s} {i}" for s, i in ids.items() if s != stage) or "none"
    again = f"`make pipeline … RESUME={parent}` (finished children are reused, a cut-short training continues its " \
            f"checkpoint)" if parent else "the whole pipeline again"
    raise StageError(f"stage {stage} failed (child run {run_id}, {status}): {error}. Finished children: {done}; fix "
                     f"the cause, then run {again}, or `make {stage}` alone with their run ids "
                     f"({', '.join(f'{k}=<{v} id>' for k, v in get(stage).links.items())})")


RESUME_TRAINING = (("train.resume", "auto"),)


def reusable(child: dict[str, Any] | None, params: dict[str, str], sha: str) -> str | None:
    """The id of an earlier child that can stand in for this stage: FINISHED, launched with exactly these parameters
    (so its upstream links are the same runs) from the same git commit ``sha``."""
    if not child or child["status"] != "FINISHED" or not _same(child, params):
        return None
    return child["run_id"] if child["git_sha"] == sha else None


def continuable(child: dict[str, Any] | None, params: dict[str, str], stage: Any) -> bool:
    """Whether an earlier child of a training stage was cut short (FAILED or KILLED) under exactly these parameters,
    so that running it again continues its newest whole checkpoint (``train.resume=auto``; the checkpoint's
    fingerprint still refuses other settings)."""
    trains = "train" in {f.name for f in dataclasses.fields(stage.config)}
    return bool(child) and trains and child["status"] in ("FAILED", "KILLED") and _same(child, params)


def _same(child: dict[str, Any], params: dict[str, str]) -> bool:
    return all(_words(child["params"].get(k, "")) == _words(v) for k, v in params.items())


def _words(value: str) -> list[str]:
    """A parameter as shell words; MLflow logs a project parameter as it quoted it for the command ('' for empty)."""
    words = shlex.split(value)
    return _words(words[0]) if len(words) == 1 and words[0] != value else words


def describe(result: PipelineResult) -> str:
    """What the chain made and where to look, for people."""
    s = result.summary
    lines = [f"pipeline run {result.run_id} ({s.get('experiment', '?')}, {s.get('tracking_uri', '?')})"]
    for stage, child in s.get("children", {}).items():
        gates = child.get("gates", {})
        made = ", ".join(f"{m} (gate {gates.get(m.split('@')[0], '?')})" for m in child["registered"]) or "-"
        again = "  (reused from the resumed run)" if stage in s.get("reused", []) else ""
        lines.append(f"  {stage:<9} {child['run_id']}  {child['status']:<8}  {child['seconds']:>6.1f} s  registered: "
                     f"{made}{again}")
    if s.get("eval"):
        lines.append("  eval (tuned, Δ vs base): " + ", ".join(f"{k} {v['tuned']:.3f} ({v['delta']:+.3f})"
                                                           for k, v in s["eval"].items()))
    earlier = s.get("earlier") or {}
    if earlier.get("eval"):
        lines.append(f"  eval of the earlier adapter {earlier['source']} (Δ vs base): " + ", ".join(
            f"{k} {v['tuned']:.3f} ({v['delta']:+.3f})" for k, v in earlier["eval"].items()))
    if s.get("gate"):
        lines.append(f"  forgetting gate: {s['gate']}" + (f"; earlier adapter {earlier['source']}: "
                                                          f"{earlier.get('gate') or 'n/a'}" if earlier else ""))
    merged = next((m.split("@")[0] for m in s.get("children", {}).get("export", {}).get("registered", [])), None)
    view = f"#/experiments/{s['experiment_id']}/runs?workflowType=machine_learning" if s.get("experiment_id") else ""
    lines += ["next", f"  make ui   then open http://127.0.0.1:5000/{view} : this run expands to its "
                      f"{len(s.get('children', {}))} children; Model registry lists the versions with their aliases "
                      "and lineage tags"]
    if merged:
        name, version = merged.split("/")
        hw = f" HW={s['hw']}" if s.get("hw") else ""
        lines += [f"  make pull MODEL={name}@candidate DEST=outputs/pulled VERIFY=1{hw}   → a folder transformers "
                  f"loads, its logits checked against export's",
                  f"  make promote MODEL={name} VERSION={version}   → moves @champion there (refused if its gate "
                  f"failed or it was never evaluated)",
                  f"  make chat MODEL={name}@candidate   → talk to it in the terminal (PROMPT=\"…\" answers once); "
                  f"make serve MODEL={name}@candidate PORT=5001 serves it over HTTP",
                  "  make compare   → this run beside the last pipeline runs: scores, deltas, loss, tokens/s, wall time"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.pipeline", description=__doc__.split("\n\n")[0])
    cli.add_common(parser)
    cli.add_variants(parser)
    parser.add_argument("--accel", default="", metavar="NAME", help="sft and align under `accelerate launch` "
                                                                   "with configs/accelerate/NAME.yaml")
    parser.add_argument("--resume", default="", metavar="RUN_ID",
                        help="an earlier pipeline run: its FINISHED children whose parameters and git commit match "
                             "are reused, the rest run")
    parser.add_argument("--dry-run", type=cli.parse_bool, default=True, metavar="true|false",
                        help="print the whole chain's plan and run nothing (default: true)")
    parser.add_argument("--check", action="store_true", help="with --dry-run: also fail (exit 2) on what would stop "
                                                             "a stage of the real run (see the stages' --check)")
    args = parser.parse_args(argv)
    cli.setup_logging()

    def go() -> None:
        if args.accel:
            accel.config_path(args.accel)  # an unknown name: exit 2 before anything is resolved or started
        c = chain(args.hw, parse_overrides(args.set, args.overrides), cli.variants(args), args.accel, args.resume)
        check_store()
        if args.check or not args.dry_run:  # every stage's inputs before the first child starts
            precheck([c.annotate(get(r.stage).plan(r)) for r in c.resolved])
        print(page(c)) if args.dry_run else run(c)

    return cli.supervise("pipeline", go)


if __name__ == "__main__":
    sys.exit(main())
