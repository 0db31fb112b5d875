"""What a dry run prints: a stage's :class:`Plan` (facts, each input and whether it exists, each output and whether it
would be overwritten, the resolved config, the equivalent ``mlflow run`` command), and the items the stages share."""

from __future__ import annotations

import dataclasses
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.core.paths import repo_path, shown
from pipeline.core.profiles import apply_hub_env
from pipeline.core.resolved import Resolved
from pipeline.core.secrets import redact, redact_urls
from pipeline.core.strict import yaml_value
from pipeline.data.prepared import DataRef
from pipeline.hardware.planner import Estimate
from pipeline.models.tiny import tiny_cache_path
from pipeline.stage.resolve import default_config_path
from pipeline.stage.spec import get
from pipeline.tracking.model_registry import RegisterConfig
from pipeline.tracking.runs import experiment_name, tracking_uri


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
    estimate: Estimate = field(default_factory=Estimate)   # the planner's memory / time / disk lines


# ------------------------------------------------------------------------------------------------------------------
# Items the stages share
# ------------------------------------------------------------------------------------------------------------------
def make_command(stage: str, r: Resolved) -> str:
    return f"`make {stage} HW={r.hw.name} DRY_RUN=0`"


def base_model_input(r: Resolved) -> Item:
    m = r.model
    if m.tiny is not None:
        where = tiny_cache_path(m)
        state = "cached" if (where / "model.safetensors").is_file() else "built offline on first use (< 5 s)"
        return Item("base model", f"{m.name} → {shown(where)}", state)
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    snapshot = home / "hub" / f"models--{m.hub_id.replace('/', '--')}" / "snapshots" / m.revision
    endpoint = redact_urls(os.environ.get("HF_ENDPOINT") or "the hub")
    state = "cached" if snapshot.is_dir() else f"downloaded on first use from {endpoint}"
    return Item("base model", f"{m.hub_id} @ {m.revision}", state)


def data_input(ref: DataRef, files: tuple[str, ...], r: Resolved) -> Item:
    if ref.run_id:
        return Item("prepared data", f"prepare run {ref.run_id} ({', '.join(files)})", "looked up in MLflow at run time")
    folder = repo_path(ref.path)
    missing = [f for f in files if not (folder / f).is_file()]
    state = "exists" if not missing else f"missing {', '.join(missing)}; produced by {make_command('prepare', r)}"
    return Item("prepared data", f"{ref.path}/{{{','.join(files)}}}", state)


def model_ref_input(what: str, ref: str | None, made_by: str, r: Resolved) -> Item:
    if ref is None:
        return Item(what, "none", "the base model alone")
    if repo_path(ref).exists():
        return Item(what, ref, "local folder, exists")
    return Item(what, ref, f"looked up in the MLflow registry / runs at run time; produced by {make_command(made_by, r)}")


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
            f"checkpointing {on[h.activation_checkpointing]}"
            f"{f' (checkpoint_layers {h.checkpoint_layers})' if h.activation_checkpointing and h.checkpoint_layers else ''}"
            f", Liger {on[h.liger]}")


def log_backend_fact(backend: str) -> tuple[str, str]:
    return "log backend", f"MLflow + {backend}" if backend != "none" else "MLflow"


# ------------------------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------------------------
def mlflow_command(r: Resolved) -> str:
    stage = get(r.stage)
    parts = ["mlflow run . -e", r.stage, "--env-manager local --experiment-name", experiment_name(),
             "-P", f"hw={r.hw.name}", "-P", "dry_run=false"]
    if r.config_path != shown(default_config_path(stage, r.hw, r.variant)):
        parts += ["-P", shlex.quote(f"config={r.config_path}")]
    if r.variant:
        parts += ["-P", f"{stage.variant_flag}={r.variant}"]
    if r.overrides:
        parts += ["-P", shlex.quote("overrides=" + " ".join(f"{k}={yaml_value(v)}" for k, v in r.overrides))]
    return " ".join(parts)


def render(plan: Plan, hub_env: dict[str, str]) -> str:
    r = plan.resolved
    rows = [("config", r.config_path + (f"  (overrides: {', '.join(f'{k}={v}' for k, v in r.overrides)})"
                                        if r.overrides else "")),
            ("command", mlflow_command(r)),
            ("tracking", f"{redact_urls(tracking_uri())} · experiment {experiment_name()}"),
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
    lines.append("  estimate")
    lines += [f"    {k:<7} {v}" for k, v in plan.estimate.lines] or ["    (nothing to estimate)"]
    lines.append("  resolved config")
    body = yaml.safe_dump(redact(dataclasses.asdict(r.cfg)), allow_unicode=True, sort_keys=False,
                          default_flow_style=None, width=110)
    lines += [f"    {line}" for line in body.splitlines()]
    return "\n".join(lines)


def pages(resolved: list[Resolved]) -> str:
    """The plans of several resolved stages, one after the other, and what they cost together (``make plan``, the
    pipeline's dry run)."""
    hub_env = apply_hub_env(resolved[0].hub)
    plans = [get(r.stage).plan(r) for r in resolved]
    return "\n\n".join([*(render(p, hub_env) for p in plans), total(plans)])


def total(plans: list[Plan]) -> str:
    """One line for the whole chain: time, disk, and whether every stage fits the profile's memory."""
    hw = plans[0].resolved.hw
    estimates = [(p.resolved.stage, p.estimate) for p in plans]
    failing = [stage for stage, e in estimates if e.fits is False]
    timed = [e.seconds for _, e in estimates if e.seconds is not None]
    hours = f"~{sum(timed) / 3600:.1f} h of estimated compute" if timed else "time not estimated"
    fits = (f"every stage fits {hw.memory_gib:g} GiB: PASS" if not failing else
            f"FAIL: {', '.join(failing)} {'does' if len(failing) == 1 else 'do'} not fit {hw.memory_gib:g} GiB "
            f"(see their memory lines)")
    disk = sum(e.disk_gib for _, e in estimates)
    return f"── total ── (HW={hw.name}) {fits}; {hours}; ~{disk:.1f} GiB of disk"
