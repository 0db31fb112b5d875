"""What a dry run prints: a stage's :class:`Plan` (facts, each input and whether it exists, each output and whether it
would be overwritten, the resolved config, the equivalent ``mlflow run`` command), and the items the stages share."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.core.errors import ConfigError, StageError
from pipeline.core.paths import repo_path, shown
from pipeline.core.profiles import apply_hub_env
from pipeline.core.resolved import Resolved
from pipeline.core.secrets import redact, redact_urls
from pipeline.core.strict import yaml_value
from pipeline.data.prepared import DataRef, pool_folder, sampling_plan, verify_pool
from pipeline.hardware.planner import Estimate
from pipeline.models.loading import check_device
from pipeline.models.tiny import tiny_cache_path
from pipeline.stage.resolve import default_config_path, on_adapter_base
from pipeline.stage.spec import get
from pipeline.tracking import lineage
from pipeline.tracking.model_registry import RegisterConfig
from pipeline.tracking.runs import experiment_name, tracking_uri
from pipeline.training import checkpoints
from pipeline.training.probes import MAX_NEW_TOKENS, probes


@dataclass
class Item:
    """One input or output of a stage: what it is, where, and its state (exists / missing, made by … / new).

    ``problem``: what would stop the real run (an input missing that no stage makes), said with its fix; ``check``: a
    costlier test run only by the pre-check (``--check``: hashes, a lookup in the store), returning such a problem."""
    what: str
    where: str
    state: str
    problem: str | None = None
    check: Callable[[], str | None] | None = None


@dataclass
class Plan:
    resolved: Resolved
    facts: list[tuple[str, str]] = field(default_factory=list)
    inputs: list[Item] = field(default_factory=list)
    outputs: list[Item] = field(default_factory=list)
    estimate: Estimate = field(default_factory=Estimate)   # the planner's memory / time / disk lines
    sections: list[tuple[str, list[str]]] = field(default_factory=list)  # titled blocks: the sampling plan, probes


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


RUN_ID = re.compile(r"[0-9a-f]{32}")  # an MLflow run id (a pipeline's links are placeholders until the child runs)


def data_input(ref: DataRef, files: tuple[str, ...], r: Resolved) -> Item:
    if ref.run_id:
        check = (lambda: _pool_problem(ref, files)) if RUN_ID.fullmatch(ref.run_id) else None
        return Item("prepared data", f"prepare run {ref.run_id} ({', '.join(files)})", "looked up in MLflow at run time",
                    check=check)
    folder = repo_path(ref.path or "")
    missing = [f for f in files if not (folder / f).is_file()]
    if not missing:
        return Item("prepared data", f"{ref.path}/{{{','.join(files)}}}", "exists",
                    check=lambda: _pool_problem(ref, files))
    return Item("prepared data", f"{ref.path}/{{{','.join(files)}}}",
                f"missing {', '.join(missing)}; produced by {make_command('prepare', r)}",
                problem=f"`data.path` {ref.path!r} holds no prepared pool (missing {', '.join(missing)}); run "
                        f"{make_command('prepare', r)} first, or set `data.path` to a prepared folder or `data.run_id` "
                        f"to a prepare run")


def _pool_problem(ref: DataRef, files: tuple[str, ...]) -> str | None:
    """The pool's files against the sha256 values of its manifest (a truncated or edited file), or its run lookup."""
    try:
        folder, _ = pool_folder(ref)
        verify_pool(folder, [f for f in files if f != "manifest.json"])
    except (ConfigError, StageError) as err:
        return str(err)
    return None


def resume_input(output_dir: str, resume: str | None) -> list[Item]:
    """`train.resume`: nothing; auto → the newest whole checkpoint in output_dir (else a fresh start); a path → a whole
    checkpoint, which must exist (a problem the pre-check refuses)."""
    try:
        return [Item(*found) for found in checkpoints.planned(output_dir, resume)]
    except ConfigError as err:
        return [Item("resume from", str(resume), "MISSING", problem=str(err))]


def adapter_base_input(r: Resolved, ref: str | None, key: str = "adapter") -> Item:
    """The base an adapter is loaded on (``r`` after :func:`on_adapter_base` without the registry): for a registered
    adapter, the base it records is looked up by the run (and by the pre-check, which refuses a named model that is
    not that base)."""
    item = base_model_input(r)
    if not ref or ref.startswith("<") or repo_path(ref).is_dir():
        return item

    def problem() -> str | None:
        try:
            on_adapter_base(r, ref, key)
        except ConfigError as err:
            return "; ".join(err.problems)
        return None

    return dataclasses.replace(item, state=f"{item.state}; unless a model is named, the run takes the base "
                                           f"{ref} records", check=problem)


def model_ref_input(what: str, ref: str | None, made_by: str, r: Resolved, key: str = "adapter") -> Item:
    if ref is None:
        return Item(what, "none", "the base model alone")
    if repo_path(ref).exists():
        return Item(what, ref, "local folder, exists")
    linked = ref.startswith("<")  # the pipeline's placeholder for a child not run yet
    return Item(what, ref, f"looked up in the MLflow registry / runs at run time; produced by {make_command(made_by, r)}",
                check=None if linked else lambda: lineage.ref_problem(ref, key))


def blocking(plans: list[Plan]) -> list[str]:
    """What would stop the real runs of these plans, found now (the pre-check ``--check``): each input's problem and
    its costlier check. Empty when they can start."""
    problems = []
    for plan in plans:
        for item in plan.inputs:
            problem = item.problem or (item.check() if item.check else None)
            if problem:
                problems.append(f"{plan.resolved.stage}: {problem}")
    return problems


def precheck(plans: list[Plan]) -> None:
    """The pre-check every Make target runs before `mlflow run` (``--check``): raise ConfigError with whatever would
    stop the real runs — :func:`blocking` inputs and, for a stage that trains on the profile's device (a stage that
    may run under ``accelerate``), a machine without what the profile asks for (CUDA, bf16)."""
    problems = blocking(plans)
    for plan in plans:
        if get(plan.resolved.stage).accel:
            try:
                check_device(plan.resolved.hw)
            except StageError as err:
                problems.append(f"{plan.resolved.stage}: {err}")
                break  # one machine: said once
    if problems:
        raise ConfigError(problems)


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


def sampling_section(ref: DataRef, kind: str, r: Resolved, epochs: float) -> tuple[str, list[str]]:
    """The sampler's plan over the prepared pool (what the run will train on): rows·tokens per source × language ×
    bucket, the zh share per curriculum stage, repeats; one line when no pool exists yet."""
    title = "sampling plan"
    linked = bool(ref.run_id) and not RUN_ID.fullmatch(ref.run_id or "")  # a pipeline's prepare child, not run yet
    plan = None if linked else sampling_plan(ref, kind, r, epochs)
    if plan is None:
        return title, [f"(appears once the prepared pool exists: {make_command('prepare', r)})"]
    head = f"pool {shown(Path(plan['folder']))}, seed {plan['seed']}"
    if plan["over_length"]:
        head += f"; {plan['over_length']} rows over max_length {r.hw.max_length} left out"
    if plan["remeasured"]:
        head += f"; token counts by the tokenizer of {plan['measured_by']} (the run counts again with {r.model.ref})"
    if plan["problem"]:
        return title, [head, f"PROBLEM: {plan['problem']}"]
    rep, edges = plan["report"], plan["edges"]
    lines = [head, f"{rep['epochs']:g} epochs: {rep['rows']} rows, {rep['tokens']} tokens, zh share "
                   f"{rep['zh_share']:.3f} (target {rep['target_zh_share']:g}); rows·tokens per bucket:"]
    labels = [f"≤{e}" for e in edges] or [str(b) for b in range(len(rep["buckets"]))]
    table: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for c in plan["cells"]:
        table.setdefault((c["source"], c["lang"]), [(0, 0)] * len(labels))[c["bucket"]] = (c["rows"], c["tokens"])
    body = [[s, lang, *(f"{n}·{t}" if n else "-" for n, t in cells),
             f"{sum(n for n, _ in cells)}·{sum(t for _, t in cells)}"] for (s, lang), cells in sorted(table.items())]
    body.append(["total", "", *(f"{b['rows']}·{b['tokens']}" for b in rep["buckets"]), f"{rep['rows']}·{rep['tokens']}"])
    header = ["source", "lang", *labels, "all"]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
              for row in [header, *body]]
    stages = " · ".join(f"until {st['until']:g}: {st['zh_share']:.3f} (target {st['target_zh_share']:g}, "
                        f"{st['tokens']} tokens)" for st in rep["stages"])
    lines.append(f"zh share per curriculum stage: {stages}")
    extra = f"repeats: {rep['repeats']['rows']} rows seen more than once per epoch"
    if rep["shortfall"]:
        extra += f"; zh shortfall: {rep['shortfall']['action']} (achievable {rep['shortfall']['achievable']:.3f})"
    if rep["left_out_sources"]:
        extra += f"; sources weighted 0: {', '.join(rep['left_out_sources'])}"
    return title, [*lines, extra]


def probes_section(r: Resolved) -> tuple[str, list[str]]:
    """The fixed probe prompts the run answers at its end (greedy), logged as its generations table."""
    return "generation probes", [f"greedy, up to {MAX_NEW_TOKENS} new tokens, with the model's system prompt; logged "
                                 f"as generations.json", *(f"{lang}: {prompt}" for lang, prompt in probes())]


def log_backend_fact(backend: str, output_dir: str = "") -> tuple[str, str]:
    """Where the extra logger writes: the Trainer's TensorBoard callback under ``<output_dir>/runs/`` (unless
    TENSORBOARD_LOGGING_DIR says otherwise), W&B under WANDB_DIR (offline with WANDB_MODE=offline)."""
    where = {"tensorboard": f" (event files under {output_dir or 'output_dir'}/runs/)",
             "wandb": " (WANDB_PROJECT, WANDB_MODE=offline for no upload, files under WANDB_DIR or ./wandb)"}
    return "log backend", f"MLflow + {backend}{where.get(backend, '')}" if backend != "none" else "MLflow"


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
    for title, body in plan.sections:
        lines.append(f"  {title}")
        lines += [f"    {line}" for line in body]
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


def pages(resolved: list[Resolved], annotate: Callable[[Plan], Plan] = lambda plan: plan) -> str:
    """The plans of several resolved stages, one after the other, and what they cost together (``make plan``, the
    pipeline's dry run; ``annotate`` adds to each plan, e.g. the launch line of ``--accel``)."""
    hub_env = apply_hub_env(resolved[0].hub)
    plans = [annotate(get(r.stage).plan(r)) for r in resolved]
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
