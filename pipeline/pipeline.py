"""pipeline: prepare → sft → align → evaluate → export as child runs of one parent run (MLflow's multistep pattern).

``python -m pipeline.pipeline --hw NAME [--loss orpo|dpo] [--accel NAME] [--resume RUN_ID] [--set key=value]...
[--dry-run true|false]``
Each stage is its own ``mlflow run`` entry point, started as a child of this run, and takes the previous stages'
outputs by run id: sft and align read the pool of the prepare child (``data.run_id``), align starts from the sft
child's adapter (``start_from``), evaluate and export take the align child's adapter (``adapter``). Overrides are
routed as in ``make plan``: ``model=…`` or ``hw.micro_batch=1`` reach every stage that has the key, ``sft.lora.r=8``
only sft. Every stage's config is checked before the first child starts. A dry run (the default) prints the whole
chain's plan. The parent run carries the children's run ids (tags ``child.<stage>``), their key metrics
(``<stage>/…``) and ``summary.json``; the summary is printed at the end. ``--resume RUN_ID`` (an earlier pipeline
run, typically a failed one) reuses each of its FINISHED children that would be launched with exactly the same
parameters (overrides and upstream run ids) from the same git commit, and runs the rest.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline import cli
from pipeline.config import STAGES, Resolved, apply_hub_env, parse_overrides
from pipeline.plan import plan_all, render, split_overrides, stage_plan, yaml_value

STAGE = "pipeline"
# How a stage takes the outputs of the stages before it: config key → the stage whose child run id it gets.
LINKS: dict[str, dict[str, str]] = {
    "prepare": {},
    "sft": {"data.run_id": "prepare"},
    "align": {"data.run_id": "prepare", "start_from": "sft"},
    "evaluate": {"adapter": "align"},
    "export": {"adapter": "align"},
}
# What the parent run copies from each child so that pipeline runs compare side by side in `mlflow ui`.
TRAINING_METRICS = ("loss", "eval_loss", "tokens_per_second", "peak_memory")
KEY_METRICS = {"prepare": ("rows.",), "sft": TRAINING_METRICS, "align": TRAINING_METRICS,
               "evaluate": ("eval/", "delta/"), "export": ("merge.",)}


@dataclass
class Chain:
    """The resolved chain: every stage's config (as planned) and each stage's own overrides before the links."""
    hw: str
    loss: str | None
    accel: str
    resolved: list[Resolved]
    overrides: dict[str, list[tuple[str, Any]]]
    resume: str = ""            # an earlier pipeline run whose FINISHED children are reused where nothing changed
    given: list[str] = field(default_factory=list)  # the overrides as given ("key=value"), logged for `make rerun`

    def linked(self, stage: str, ids: dict[str, str]) -> list[tuple[str, Any]]:
        """The stage's overrides plus its links to the run ids of the stages before it."""
        return [*self.overrides[stage], *((key, ids[source]) for key, source in LINKS[stage].items())]

    def parameters(self, stage: str, ids: dict[str, str]) -> dict[str, str]:
        """The `mlflow run` parameters of one child."""
        params = {"hw": self.hw, "dry_run": "false",
                  "overrides": " ".join(shlex.quote(f"{k}={yaml_value(v)}") for k, v in self.linked(stage, ids))}
        if stage == "align":
            params["loss"] = self.loss or ""
        if stage in cli.TRAINING:
            params["accel"] = self.accel
        return params


def chain(hw: str, overrides: list[tuple[str, Any]], loss: str | None, accel: str = "", resume: str = "") -> Chain:
    """Resolve every stage with the links in place (placeholders for the run ids), so a bad key in any stage stops the
    chain before its first child starts."""
    per_stage = split_overrides(overrides)
    linked = [(f"{s}.{key}", f"<run id of the {src} child>") for s in STAGES for key, src in LINKS[s].items()]
    return Chain(hw, loss, accel, plan_all(hw, [*overrides, *linked], loss), per_stage, resume.strip(),
                 [f"{k}={yaml_value(v)}" for k, v in overrides])


def page(c: Chain) -> str:
    """The dry run: how the children link, then every stage's plan as it will run."""
    links = "; ".join(f"{s} ← " + ", ".join(f"{key}={src}" for key, src in LINKS[s].items())
                      for s in STAGES if LINKS[s])
    head = [f"━━ pipeline ━━ (HW={c.hw}, LOSS={c.loss or 'orpo'}) — {' → '.join(STAGES)}, each a child run of one "
            f"parent run", f"  links  {links}",
            "  after  the parent run holds child.<stage> run ids, the children's key metrics and summary.json"]
    hub_env = apply_hub_env(c.resolved[0].hub)
    return "\n\n".join(["\n".join(head), *(render(stage_plan(r), hub_env) for r in c.resolved)])


@dataclass
class PipelineResult:
    run_id: str | None
    children: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"pipeline run {self.run_id}: " + ", ".join(f"{s} {i}" for s, i in self.children.items())


def run(c: Chain) -> PipelineResult:
    """Start the five children in order under one parent run; a failed child fails the parent, naming it."""
    from pipeline import tracking

    first = c.resolved[0]
    configs = {"pipeline": {"loss": c.loss or "orpo", "accel": c.accel, "overrides": c.given, "resume": c.resume},
               **{r.stage: r.as_dict() for r in c.resolved}}
    ids: dict[str, str] = {}
    earlier = tracking.pipeline_children(c.resume) if c.resume else {}
    sha = tracking.git_state()["git.sha"]
    reused: list[str] = []
    with tracking.start_run(STAGE, configs, hw=c.hw, model=first.model.name,
                            tags={"resumed_from": c.resume} if c.resume else None) as parent:
        tracking.log_text(page(c), "plan.txt")
        for stage in STAGES:
            started = time.monotonic()
            params = c.parameters(stage, ids)
            same = reusable(earlier.get(stage), params, sha)
            if same:
                cli.log.info("pipeline: %s unchanged since run %s (same parameters, code and inputs): reused", stage,
                             same)
                run_id, status = same, "FINISHED"
                reused.append(stage)
                tracking.set_tags({f"reused.{stage}": "true"})
            else:
                cli.log.info("pipeline: starting %s", stage)
                run_id, status = tracking.run_entry_point(stage, params, run_name=f"{stage}-{c.hw}")
            ids[stage] = run_id
            tracking.set_tags({f"child.{stage}": run_id})
            tracking.log_metrics({f"{stage}/wall_seconds": time.monotonic() - started})
            child = tracking.get_run(run_id)
            if status != "FINISHED":
                error = child.data.tags.get("error", "see the child's logs/ artifact")
                done = ", ".join(f"{s} {i}" for s, i in ids.items() if s != stage) or "none"
                raise cli.StageError(f"stage {stage} failed (child run {run_id}, {status}): {error}. Finished "
                                     f"children: {done}; fix the cause, then run `make {stage}` alone with their "
                                     f"run ids ({', '.join(f'{k}=<{v} id>' for k, v in LINKS[stage].items())}) or "
                                     f"the whole pipeline again")
            tracking.log_metrics({f"{stage}/{k}": v for k, v in child.data.metrics.items()
                                  if k.startswith(KEY_METRICS[stage])})
        summary = {**tracking.chain_summary(ids), "hw": c.hw, "loss": c.loss or "orpo", "reused": reused}
        tracking.log_dict(summary, "summary.json")
    result = PipelineResult(parent.info.run_id if parent else None, ids, summary)
    print(describe(result))
    return result


def reusable(child: dict[str, Any] | None, params: dict[str, str], sha: str) -> str | None:
    """The id of an earlier child that can stand in for this stage: FINISHED, launched with exactly these parameters
    (so its upstream links are the same runs) from the same git commit ``sha``."""
    if not child or child["status"] != "FINISHED":
        return None
    if any(_words(child["params"].get(k, "")) != _words(v) for k, v in params.items()):
        return None
    return child["run_id"] if child["git_sha"] == sha else None


def _words(value: str) -> list[str]:
    """A parameter as shell words; MLflow logs a project parameter as it quoted it for the command ('' for empty)."""
    words = shlex.split(value)
    return _words(words[0]) if len(words) == 1 and words[0] != value else words


def describe(result: PipelineResult) -> str:
    """What the chain made and where to look, for people."""
    s = result.summary
    lines = [f"pipeline run {result.run_id} ({s.get('experiment', '?')}, {s.get('tracking_uri', '?')})"]
    for stage, child in s.get("children", {}).items():
        made = ", ".join(child["registered"]) or "-"
        again = "  (reused from the resumed run)" if stage in s.get("reused", []) else ""
        lines.append(f"  {stage:<9} {child['run_id']}  {child['status']:<8}  {child['seconds']:>6.1f} s  registered: "
                     f"{made}{again}")
    if s.get("eval"):
        lines.append("  eval (tuned, Δ vs base): " + ", ".join(f"{k} {v['tuned']:.3f} ({v['delta']:+.3f})"
                                                           for k, v in s["eval"].items()))
    if s.get("gate"):
        lines.append(f"  forgetting gate: {s['gate']}")
    merged = next((m.split("@")[0] for m in s.get("children", {}).get("export", {}).get("registered", [])), None)
    runs = f"#/experiments/{s['experiment_id']}/runs?workflowType=machine_learning" if s.get("experiment_id") else ""
    lines += ["next", f"  make ui   then open http://127.0.0.1:5000/{runs} : this run expands to its five children; "
                      "Model registry lists the versions with their aliases and lineage tags"]
    if merged:
        name, version = merged.split("/")
        hw = f" HW={s['hw']}" if s.get("hw") else ""
        lines += [f"  make pull MODEL={name}@candidate DEST=outputs/pulled VERIFY=1{hw}   → a folder transformers "
                  f"loads, its logits checked against export's",
                  f"  make promote MODEL={name} VERSION={version}   → moves @champion there (refused if the gate "
                  f"failed)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.pipeline", description=__doc__.split("\n\n")[0])
    cli.add_common(parser)
    parser.add_argument("--loss", type=cli.parse_loss, default=None, metavar="orpo|dpo",
                        help="the align stage's loss (default: configs/orpo.yaml)")
    parser.add_argument("--accel", default="", metavar="NAME", help="sft and align under `accelerate launch` "
                                                                   "with configs/accelerate/NAME.yaml")
    parser.add_argument("--resume", default="", metavar="RUN_ID",
                        help="an earlier pipeline run: its FINISHED children whose parameters and git commit match "
                             "are reused, the rest run")
    parser.add_argument("--dry-run", type=cli.parse_bool, default=True, metavar="true|false",
                        help="print the whole chain's plan and run nothing (default: true)")
    args = parser.parse_args(argv)
    cli.setup_logging()

    def go() -> None:
        c = chain(args.hw, parse_overrides(args.set, args.overrides), args.loss, args.accel, args.resume)
        print(page(c)) if args.dry_run else run(c)

    return cli.guarded(go)

if __name__ == "__main__":
    sys.exit(main())
