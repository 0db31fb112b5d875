"""``--accel NAME`` (``ACCEL=NAME``): a training stage under ``accelerate launch`` with configs/accelerate/NAME.yaml.

The names are the files there (ddp, fsdp, zero2, zero3). An unknown name stops the command before anything else
(exit 2, the choices named); each file is read with accelerate's own loader, and the pre-check (``--check``) refuses
what would stop the launch: a YAML accelerate rejects, ZeRO without the deepspeed package, FSDP or ZeRO on a CPU
profile (accelerate 1.x runs neither on CPU). The plan shows the launch line and what each mode shards, with the
planner's computed memory per card. One place builds the launch line, for the plan and for the launch itself.
"""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path
from typing import Any

from pipeline.core.errors import ConfigError
from pipeline.core.paths import CONFIGS, shown
from pipeline.core.resolved import Resolved
from pipeline.hardware import planner
from pipeline.models.loading import LoraConfig
from pipeline.stage.dryrun import Item, Plan

FOLDER = CONFIGS / "accelerate"
DEEPSPEED_INSTALL = 'pip install -e ".[deepspeed]"'
# What each kind of config splits across the processes (the README's "Several GPUs: DDP, FSDP or ZeRO").
SHARDS = {
    "MULTI_GPU": "nothing: every process holds the whole model, adapter and optimizer; gradients are all-reduced",
    "FSDP": "the frozen base weights, the LoRA weights, their gradients and optimizer states (FULL_SHARD); each "
            "decoder layer is gathered whole while it computes",
    "DEEPSPEED:2": "the LoRA's gradients and optimizer states only (ZeRO-2); every card keeps the whole base",
    "DEEPSPEED:3": "the base weights too (ZeRO-3), like FSDP: each card keeps ≈ 1/N and gathers a layer to compute it",
}
CPU_REFUSAL = {
    "FSDP": "accelerate {v} turns FSDP on only for GPUs (CUDA, XPU, NPU, …): on CPU its FSDP plugin stops with "
            "\"There are currently no available devices found, must be one of 'XPU', 'CUDA', 'MLU', 'NPU', 'MUSA', or "
            "'HPU'\" (fsdp_sync_module_states), and without that setting the processes run as plain DDP "
            "(distributed type MULTI_CPU), sharding nothing",
    "DEEPSPEED": "accelerate {v} launches DeepSpeed only on GPUs (`accelerate launch` skips its DeepSpeed launcher on "
                 "CPU) and DeepSpeed's ZeRO training needs a GPU",
}


def choices() -> list[str]:
    return sorted(p.stem for p in FOLDER.glob("*.yaml"))


def config_path(name: str) -> Path:
    """configs/accelerate/<name>.yaml, or a ConfigError naming the choices (the first check of ``--accel``)."""
    path = FOLDER / f"{name}.yaml"
    if "/" in name or not path.is_file():
        raise ConfigError([f"ACCEL / --accel {name!r}: no {shown(path)}; choices: {', '.join(choices())} (empty = one "
                           f"process)"])
    return path


def load(path: Path) -> Any:
    """The config as ``accelerate launch`` reads it (accelerate's loader), its fsdp_config / deepspeed_config keys
    checked against the launcher's own options; a ConfigError naming the file otherwise."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    try:
        cfg = load_config_from_file(str(path))
    except Exception as err:  # a YAML error, an unknown key, a bad distributed_type: accelerate's own words
        raise ConfigError([f"{shown(path)}: accelerate cannot read it: {err}"]) from err
    options = set(vars(launch_command_parser().parse_args(["x"])))
    unknown = sorted(k for section in (cfg.fsdp_config, cfg.deepspeed_config) for k in (section or {})
                     if k not in options)
    if unknown:
        raise ConfigError([f"{shown(path)}: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not an "
                           f"option of `accelerate launch` (see `accelerate launch --help`)"])
    return cfg


def kind(cfg: Any) -> str:
    """MULTI_GPU, FSDP or DEEPSPEED:<stage> (the key of :data:`SHARDS`)."""
    name = str(getattr(cfg.distributed_type, "value", cfg.distributed_type))
    return f"{name}:{(cfg.deepspeed_config or {}).get('zero_stage', 0)}" if name == "DEEPSPEED" else name


def problems(name: str, device: str) -> list[str]:
    """What would stop ``accelerate launch`` with this config on this profile's device, each with its fix."""
    import accelerate

    try:
        cfg = load(config_path(name))
    except ConfigError as err:
        return err.problems
    found, base = [], kind(cfg).split(":")[0]
    if base == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        found.append(f"ACCEL={name} runs DeepSpeed ZeRO, and the deepspeed package is not installed: "
                     f"{DEEPSPEED_INSTALL} (on a CUDA machine), or use ACCEL=fsdp")
    if device == "cpu" and base in CPU_REFUSAL:
        found.append(f"ACCEL={name} on a CPU profile: {CPU_REFUSAL[base].format(v=accelerate.__version__)}; use "
                     f"ACCEL=ddp on CPU (two gloo processes) or a GPU profile")
    return found


def launch_args(config: str, device: str, cfg: Any, gpus: int | None = None) -> list[str]:
    """``accelerate launch``'s own arguments: the config and the process count (two gloo processes for DDP on CPU,
    else one per visible GPU, ``gpus`` when given)."""
    if device == "cpu":
        extra = ["--multi_gpu", "--num_processes", "2"] if kind(cfg) == "MULTI_GPU" else ["--num_processes", "2"]
    else:
        if gpus is None:
            import torch

            gpus = torch.cuda.device_count()
        extra = ["--num_processes", str(max(1, gpus))]
    return ["--config_file", config, *extra]


def stage_args(r: Resolved) -> list[str]:
    """The stage's own arguments for its real run, from the resolved config (what the plan's launch line shows)."""
    from pipeline.stage.resolve import default_config_path
    from pipeline.stage.spec import get

    stage = get(r.stage)
    args = ["--hw", r.hw.name, "--dry-run", "false"]
    if r.config_path != shown(default_config_path(stage, r.hw, r.variant)):
        args += ["--config", r.config_path]
    if r.variant:
        args += [f"--{stage.variant_flag}", r.variant]
    if r.overrides:
        from pipeline.core.strict import yaml_value

        args += ["--overrides", " ".join(f"{k}={yaml_value(v)}" for k, v in r.overrides)]
    return args


def decoder_layer(r: Resolved) -> str:
    """The class FSDP wraps one unit each: the model's own ``_no_split_modules`` (what accelerate's
    TRANSFORMER_BASED_WRAP takes when the config names no class)."""
    arch = r.model.architecture_config().get("architectures") or ["?"]
    try:
        import transformers

        return ", ".join(getattr(transformers, arch[0])._no_split_modules or []) or "(none declared)"
    except (AttributeError, ImportError):
        return f"(the decoder layer of {arch[0]}, found when the model loads)"


def annotate(plan: Plan, name: str) -> Plan:
    """The plan of a stage launched with ``--accel name``: the launch line, what is sharded, computed memory per
    card, and the config as an input whose problems the pre-check refuses."""
    if not name:
        return plan
    r = plan.resolved
    path = config_path(name)
    found = problems(name, r.hw.device)
    try:
        cfg = load(path)
    except ConfigError:
        plan.inputs.append(Item("accelerate config", shown(path), "UNREADABLE", problem="; ".join(found)))
        return plan
    import torch

    gpus = torch.cuda.device_count() if r.hw.device == "cuda" else 0
    launcher = launch_args(shown(path), r.hw.device, cfg, gpus or 1)
    if r.hw.device == "cuda" and not gpus:  # planned on a machine without the GPUs: say what the launch will count
        launcher[launcher.index("--num_processes") + 1] = "N"
    line = ["accelerate", "launch", *launcher, "-m", f"pipeline.{r.stage}", *stage_args(r)]
    mode = kind(cfg)
    lines = [f"launch   {shlex.join(line)}" + ("  (N = the visible GPUs)" if "N" in launcher else ""),
             f"shards   {SHARDS.get(mode, mode)}"]
    if mode == "FSDP":
        lines.append(f"wraps    one FSDP unit per {decoder_layer(r)} (auto wrap by decoder layer); the adapter is "
                     f"saved whole by rank 0 (FULL_STATE_DICT)" + ("; 4-bit weights stored as the compute dtype "
                                                                  "(bnb_4bit_quant_storage)" if r.hw.qlora else ""))
    key = {"MULTI_GPU": "ddp", "FSDP": "fsdp", "DEEPSPEED:2": "zero2", "DEEPSPEED:3": "zero3"}.get(mode)
    if key and r.hw.device == "cuda":
        lora = getattr(r.cfg, "lora", None) or LoraConfig()  # align continues the SFT adapter (sft's default rank)
        lines.append("per card (computed, GB; activations extra): " + "; ".join(
            f"{n} cards {_memory(planner.per_card(r.hw, r.model, lora, key, n))}"
            for n in ([gpus] if gpus > 1 else [2, 4])))
    if found:
        lines += [f"PROBLEM: {p}" for p in found]
    plan.sections.append((f"accelerate ({name})", lines))
    plan.inputs.append(Item("accelerate config", shown(path), "refused: " + found[0] if found else "read by accelerate",
                            problem="; ".join(found) or None))
    return plan


def _memory(m: dict[str, float]) -> str:
    gathered = f" + {m['gathered']:.1f} gathered in a step" if m["gathered"] else ""
    return f"weights {m['weights']:.1f} + LoRA states {m['adapter']:.2f}{gathered}"
