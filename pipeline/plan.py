"""Plans: what a stage would read, write and track — printed by every dry run, and by ``make plan`` for all five.

``python -m pipeline.plan --hw NAME [--loss orpo|dpo] [--set key=value]...`` prints the plans of all stages on one
page. A key is applied to every stage whose config has it (``model=…``, ``hw.micro_batch=1``); prefix it with a stage
name to aim at one stage (``sft.lora.r=8``). Launched by ``mlflow run . -e plan`` (``MLFLOW_RUN_ID`` set), it also
leaves a FINISHED run carrying the page and each stage's resolved config as artifacts. Imports nothing heavy.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline import cli, tracking
from pipeline.config import (
    ROOT,
    STAGE_CONFIGS,
    STAGES,
    ConfigError,
    DataRef,
    RegisterConfig,
    Resolved,
    apply_hub_env,
    default_config_path,
    parse_overrides,
    resolve,
)

ESTIMATE_PENDING = "not estimated yet (the hardware planner adds predicted peak memory and time here)"


@dataclass
class Item:
    """One input or output of a stage: what it is, where, and its state (exists / missing, made by … / new)."""
    what: str
    where: str
    state: str


@dataclass
class Plan:
    resolved: Resolved
    facts: list[tuple[str, str]] = field(default_factory=list)
    inputs: list[Item] = field(default_factory=list)
    outputs: list[Item] = field(default_factory=list)
    estimate: str = ESTIMATE_PENDING


# ------------------------------------------------------------------------------------------------------------------
# Items the stages share
# ------------------------------------------------------------------------------------------------------------------
def repo_path(p: str) -> Path:
    path = Path(p)
    return path if path.is_absolute() else ROOT / path


def _make(stage: str, r: Resolved) -> str:
    return f"`make {stage} HW={r.hw.name} DRY_RUN=0`"


def base_model_input(r: Resolved) -> Item:
    m = r.model
    if m.tiny is not None:
        from pipeline.models import tiny_cache_path

        where = tiny_cache_path(m)
        state = "cached" if (where / "model.safetensors").is_file() else "built offline on first use (< 5 s)"
        return Item("base model", f"{m.name} → {where.relative_to(ROOT) if where.is_relative_to(ROOT) else where}", state)
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    snapshot = home / "hub" / f"models--{m.hub_id.replace('/', '--')}" / "snapshots" / m.revision
    state = "cached" if snapshot.is_dir() else f"downloaded on first use from {os.environ.get('HF_ENDPOINT') or 'the hub'}"
    return Item("base model", f"{m.hub_id} @ {m.revision}", state)


def data_input(ref: DataRef, files: tuple[str, ...], r: Resolved) -> Item:
    if ref.run_id:
        return Item("prepared data", f"prepare run {ref.run_id} ({', '.join(files)})", "looked up in MLflow at run time")
    folder = repo_path(ref.path)
    missing = [f for f in files if not (folder / f).is_file()]
    state = "exists" if not missing else f"missing {', '.join(missing)}; produced by {_make('prepare', r)}"
    return Item("prepared data", f"{ref.path}/{{{','.join(files)}}}", state)


def model_ref_input(what: str, ref: str | None, made_by: str, r: Resolved) -> Item:
    if ref is None:
        return Item(what, "none", "the base model alone")
    if repo_path(ref).exists():
        return Item(what, ref, "local folder, exists")
    return Item(what, ref, f"looked up in the MLflow registry / runs at run time; produced by {_make(made_by, r)}")


def dir_output(path: str, what: str = "output folder") -> Item:
    folder = repo_path(path)
    exists = folder.is_dir() and any(folder.iterdir())
    return Item(what, path, "exists, would be overwritten" if exists else "new")


def registry_output(reg: RegisterConfig) -> Item:
    return Item("registered model", f"{reg.name}@{reg.alias}", f"a new version of {reg.name}; alias {reg.alias} moves to it")


def hardware_fact(r: Resolved) -> str:
    h = r.hw
    peak = f", {h.peak_tflops:g} TFLOP/s bf16" if h.peak_tflops else ""
    on = {True: "on", False: "off"}
    return (f"{h.name} ({h.description}, {h.device} {h.memory_gib:g} GiB{peak}): {h.precision}, "
            f"micro-batch {h.micro_batch} × accum {h.grad_accum} = {h.effective_batch} per step, "
            f"max_length {h.max_length}, {'QLoRA' if h.qlora else 'LoRA'}, "
            f"checkpointing {on[h.activation_checkpointing]}, Liger {on[h.liger]}")


# ------------------------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------------------------
def mlflow_command(r: Resolved) -> str:
    parts = ["mlflow run . -e", r.stage, "--env-manager local --experiment-name", tracking.experiment_name(),
             "-P", f"hw={r.hw.name}", "-P", "dry_run=false"]
    if r.config_path != _default_rel(r):
        parts += ["-P", shlex.quote(f"config={r.config_path}")]
    if r.loss:
        parts += ["-P", f"loss={r.loss}"]
    if r.overrides:
        parts += ["-P", shlex.quote("overrides=" + " ".join(f"{k}={yaml_value(v)}" for k, v in r.overrides))]
    return " ".join(parts)


def _default_rel(r: Resolved) -> str:
    return str(default_config_path(r.stage, r.hw.name, r.loss).relative_to(ROOT))


def yaml_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def render(plan: Plan, hub_env: dict[str, str]) -> str:
    r = plan.resolved
    rows = [("config", r.config_path + (f"  (overrides: {', '.join(f'{k}={v}' for k, v in r.overrides)})"
                                        if r.overrides else "")),
            ("command", mlflow_command(r)),
            ("tracking", f"{tracking.tracking_uri()} · experiment {tracking.experiment_name()}"),
            ("hub", " · ".join(f"{k}={v}" for k, v in hub_env.items())),
            ("base model", f"{r.model.ref} ({r.model.family}, {r.model.max_positions} positions, "
                           f"licence {r.model.licence})"),
            ("system prompt", r.model.system_prompt[:40] + ("…" if len(r.model.system_prompt) > 40 else "")),
            ("hardware", hardware_fact(r)),
            *plan.facts]
    width = max(len(k) for k, _ in rows)
    lines = [f"━━ {r.stage} ━━ (HW={r.hw.name}, model {r.model.name})"]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    for title, items in (("inputs", plan.inputs), ("outputs", plan.outputs)):
        lines.append(f"  {title}")
        lines += [f"    - {it.what}: {it.where} [{it.state}]" for it in items]
    lines.append(f"  {'estimate':<{width}}  {plan.estimate}")
    lines.append("  resolved config")
    body = yaml.safe_dump(tracking.redact(dataclasses.asdict(r.cfg)), allow_unicode=True, sort_keys=False,
                          default_flow_style=None, width=110)
    lines += [f"    {line}" for line in body.splitlines()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------------
# All stages on one page
# ------------------------------------------------------------------------------------------------------------------
def split_overrides(overrides: list[tuple[str, Any]]) -> dict[str, list[tuple[str, Any]]]:
    """Route each override to the stages it belongs to (a stage prefix, or every stage whose config has the key)."""
    per_stage: dict[str, list[tuple[str, Any]]] = {s: [] for s in STAGES}
    problems = []
    for key, value in overrides:
        head, _, rest = key.partition(".")
        if head in STAGES and rest:
            per_stage[head].append((rest, value))
            continue
        targets = [s for s in STAGES
                   if head == "hw" or head in {f.name for f in dataclasses.fields(STAGE_CONFIGS[s])}]
        if not targets:
            known = sorted({f.name for s in STAGES for f in dataclasses.fields(STAGE_CONFIGS[s])} | {"hw"})
            close = difflib.get_close_matches(head, known, n=1)
            problems.append(f"override `{key}`: no stage has a key `{head}`"
                            + (f"; did you mean `{close[0]}`?" if close else "")
                            + f" (prefix a stage to aim at one: {', '.join(f'{s}.…' for s in STAGES)})")
        for s in targets:
            per_stage[s].append((key, value))
    if problems:
        raise ConfigError(problems)
    return per_stage


def stage_plan(r: Resolved) -> Plan:
    return importlib.import_module(f"pipeline.{r.stage}").plan(r)


def plan_all(hw: str, overrides: list[tuple[str, Any]], loss: str | None = None) -> list[Resolved]:
    per_stage = split_overrides(overrides)
    resolved, problems = [], []
    for stage in STAGES:
        try:
            resolved.append(resolve(stage, hw=hw, overrides=per_stage[stage], loss=loss if stage == "align" else None))
        except ConfigError as err:
            problems += err.problems
    if problems:
        raise ConfigError(problems)
    return resolved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.plan", description=__doc__.split("\n\n")[0])
    cli.add_common(parser)
    parser.add_argument("--loss", type=cli.parse_loss, default=None, metavar="orpo|dpo",
                        help="the align stage's loss (default: configs/orpo.yaml)")
    args = parser.parse_args(argv)
    cli.setup_logging()
    try:
        resolved = plan_all(args.hw, parse_overrides(args.set, args.overrides), args.loss)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    hub_env = apply_hub_env(resolved[0].hub)
    page = "\n\n".join(render(stage_plan(r), hub_env) for r in resolved)
    print(page)
    if os.environ.get("MLFLOW_RUN_ID"):  # launched by `mlflow run . -e plan`: keep the page on that run
        record(resolved, page)
    return 0


def record(resolved: list[Resolved], page: str) -> None:
    configs = {r.stage: r.as_dict() for r in resolved}
    first = resolved[0]
    with tracking.start_run("plan", configs, hw=first.hw.name, model=first.model.name):
        tracking.log_text(page, "plan.txt")
        for r in resolved:
            tracking.log_text(yaml.safe_dump(tracking.redact(r.as_dict()), allow_unicode=True, sort_keys=False),
                              f"resolved/{r.stage}.yaml")


if __name__ == "__main__":
    sys.exit(main())
