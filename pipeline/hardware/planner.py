"""The planner: what a stage will cost on a hardware profile — peak memory with pass / fail, time, disk — before
anything is loaded. Every stage's dry run and ``make plan`` show it (the ``estimate`` lines).

Memory comes from :mod:`.memory`. Time is tokens ÷ tokens per second: the tokens of the prepared pool's manifest (or,
before prepare has run, the ``max_steps`` bound or a stated assumption), the speed scaled from the throughput
measured on an H200 (``../shared/ANCHORS.md``) by the card's peak TFLOP/s and the model's FLOPs per token — labelled an
estimate until ``make bench`` measures the profile's card. Disk counts the base's download, checkpoints, adapters and
merged models with their MLflow copies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.core.profiles import HardwareProfile, ModelDef
from pipeline.hardware import measured
from pipeline.hardware import memory as M
from pipeline.hardware.memory import RESERVE_FACTOR, RESERVE_GIB, GiB, Memory, Shape, Step

CUDA_CONTEXT_GIB = 0.5  # what the CUDA context and the libraries' kernels take before the first tensor
ANCHOR_PEAK = 989.0     # the H200 the anchors ran on
# Model FLOPs utilisation measured on the H200 with the Qwen2.5-7B shape at 2 × 2048 (ANCHORS.md, 2026-11-28).
ANCHOR_MFU = {("ckpt", "liger"): 0.257, ("ckpt", "plain"): 0.229, ("full", "liger"): 0.367, ("full", "plain"): 0.315,
              ("ckpt", "qlora"): 0.217}
TUNING_MARGIN = 0.08       # a suggested checkpoint_layers leaves this share of the card free (the planner's worst
                            # error against ANCHORS.md is 8 %)
DPO_PER_SFT = 6135 / 7369   # TRL DPOTrainer (micro-batch 1, 1024 + 1024) over TRL SFTTrainer defaults, same H200
EVAL_MFU = 0.30             # forward-only scoring, assumed (lm-eval batches its requests)
ASSUMED_TOKENS = 50e6       # before prepare has run and without max_steps: what the time line assumes
# lm-eval requests per task: items × forward passes per item (one for single-letter answers), tokens per pass.
EVAL_TASKS = {"cmmlu": (11_582, 1, 200), "ceval-valid": (1_346, 1, 250), "hellaswag": (10_042, 4, 110),
              "winogrande": (1_267, 2, 40), "zh_smoke": (60, 1, 60)}


@dataclass
class Estimate:
    """The plan's estimate lines, and whether the stage fits the profile's memory (None: not a GPU stage)."""
    lines: list[tuple[str, str]] = field(default_factory=list)
    fits: bool | None = None
    peak_gib: float | None = None
    seconds: float | None = None
    disk_gib: float = 0.0


def shape(model: ModelDef) -> Shape:
    return Shape.of(model.architecture_config())


def usable_gib(hw: HardwareProfile) -> float:
    return hw.memory_gib - (CUDA_CONTEXT_GIB if hw.device == "cuda" else 0.0)


def step_of(hw: HardwareProfile, s: Shape, *, sequences: int = 1, lora: Any = None, logit_chunk: int = 0) -> Step:
    """The micro-step a profile runs on a model of shape ``s`` (a preference pair: ``sequences=2``), with
    ``checkpoint_layers: auto`` settled: the fewest recomputing layers that fit (all of them when none fit)."""
    kw = {"lora_r": lora.r, "lora_targets": tuple(lora.target_modules), "lora_dropout": lora.dropout > 0} if lora else {}
    auto = hw.checkpoint_layers == "auto"
    step = Step(hw.micro_batch, hw.max_length, sequences, precision=hw.precision, qlora=hw.qlora,
                checkpointing=hw.activation_checkpointing, checkpoint_layers=None if auto else hw.checkpoint_layers,
                liger=hw.liger, logit_chunk=logit_chunk, **kw)
    if not auto:
        return step
    k = fewest_checkpointed(s, step, hw)
    return step if k is None else replace(step, checkpointing=k > 0, checkpoint_layers=k or None)


def checkpoint_layers(hw: HardwareProfile, model: ModelDef, *, pair: bool, logit_chunk: int = 0) -> int | None:
    """How many decoder layers the trainer lets recompute: the profile's count, or ``auto`` settled for the stage's
    step (None: every layer, or checkpointing off)."""
    if hw.checkpoint_layers != "auto":
        return hw.checkpoint_layers
    s = shape(model)
    step = step_of(hw, s, sequences=2 if pair else 1, logit_chunk=logit_chunk)
    return step.checkpointed(s.layers) if step.checkpointed(s.layers) < s.layers else None


def tokens_per_second(hw: HardwareProfile, model: ModelDef, step: Step, *, preference: bool = False) -> float | None:
    """Scaled from the H200 anchors: the same MFU on this card's peak, at this model's FLOPs per token."""
    if not hw.peak_tflops:
        return None
    s = shape(model)
    tps = mfu(step, s.layers) * hw.peak_tflops * 1e12 / s.flops_per_token(step.seq_len)
    return tps * DPO_PER_SFT if preference else tps


def mfu(step: Step, layers: int) -> float:
    """The anchors' MFU for the step's kernels, between the checkpointed and the plain figure by the share of layers
    that recompute (QLoRA was measured checkpointed only: its plain figure scales by Liger's ratio)."""
    kind = "qlora" if step.qlora else "liger" if step.liger else "plain"
    ckpt = ANCHOR_MFU[("ckpt", kind)]
    full = ANCHOR_MFU.get(("full", kind), ckpt * ANCHOR_MFU[("full", "liger")] / ANCHOR_MFU[("ckpt", "liger")])
    return full + (ckpt - full) * step.checkpointed(layers) / layers


def fewest_checkpointed(s: Shape, step: Step, hw: HardwareProfile) -> int | None:
    """The fewest decoder layers that must recompute for the step to fit the card with :data:`TUNING_MARGIN` to
    spare (0: none need to; None: not even all of them)."""
    room = usable_gib(hw) * (1 - TUNING_MARGIN)
    return next((k for k in range(s.layers + 1) if M.training(s, replace(
        step, checkpointing=k > 0, checkpoint_layers=k or None)).reserved <= room), None)


def _gib(x: float) -> str:
    return f"{x:.1f} GiB"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def memory_line(mem: Memory, hw: HardwareProfile, step: Step) -> tuple[str, bool]:
    """The memory line with its parts, pass / fail against the profile's card, and what fits when it does not."""
    room = usable_gib(hw)
    fits = mem.reserved <= room
    where = "GPU" if hw.device == "cuda" else "RAM"
    parts = ", ".join(f"{k} {v:.1f}" for k, v in mem.parts.items())
    text = (f"{where} peak {_gib(mem.peak)} allocated, ~{_gib(mem.reserved)} reserved ({parts}) of "
            f"{hw.memory_gib:g} GiB: {'PASS' if fits else 'FAIL'}")
    if not fits:
        text += "; " + advice(mem, hw, step)
    return text, fits


def advice(mem: Memory, hw: HardwareProfile, step: Step) -> str:
    """What fits: the largest micro-batch at this max_length, the largest max_length at this micro-batch, and the
    switches that save the most."""
    budget = (usable_gib(hw) - RESERVE_GIB) / RESERVE_FACTOR - mem.fixed
    tokens = max(0.0, budget / mem.per_token) if budget > 0 else 0.0
    per_row = step.seq_len * step.sequences
    batch, length = int(tokens // per_row), int(tokens // (step.micro_batch * step.sequences))
    tips = []
    if batch:
        tips.append(f"micro_batch {batch} at max_length {step.seq_len} (SET=\"hw.micro_batch={batch} "
                    f"hw.grad_accum={max(1, hw.effective_batch // batch)}\" keeps the effective batch)")
    if length:
        tips.append(f"max_length {length} at micro_batch {step.micro_batch}")
    switches = [s for on, s in ((not step.checkpointing, "hw.activation_checkpointing=true"),
                                (not step.liger and hw.device == "cuda", "hw.liger=true"),
                                (not step.qlora and hw.device == "cuda", "hw.qlora=true")) if on]
    return "to fit: " + " or ".join([*tips, *switches] or ["a card with more memory"])


def pool_tokens(data_path: Path | None, kind: str) -> int | None:
    """The training tokens of a prepared pool, from its manifest (None when there is no pool yet)."""
    manifest = data_path / "manifest.json" if data_path else None
    if not manifest or not manifest.is_file():
        return None
    return int(json.loads(manifest.read_text(encoding="utf-8"))["pool"][kind]["tokens"])


def training(hw: HardwareProfile, model: ModelDef, *, kind: str, lora: Any = None, lora_source: Any = None,
             epochs: float, max_steps: int | None, data_path: Path | None, save_total_limit: int,
             logit_chunk: int = 0, loss: str | None = None) -> Estimate:
    """sft (``kind="sft"``) or align (``kind="pref"``, its ``loss``): memory, time and disk."""
    s = shape(model)
    pair = kind == "pref"
    step = step_of(hw, s, sequences=2 if pair else 1, lora=lora or lora_source, logit_chunk=logit_chunk)
    mem = M.training(s, step)
    mem_text, fits = memory_line(mem, hw, step)
    if hw.checkpoint_layers == "auto":
        mem_text += f"; checkpoint_layers auto: {step.checkpointed(s.layers)} of {s.layers} layers recompute"
    elif fits and hw.device == "cuda" and (k := fewest_checkpointed(s, step, hw)) is not None \
            and k < step.checkpointed(s.layers):
        faster = mfu(replace(step, checkpointing=k > 0, checkpoint_layers=k or None), s.layers) / mfu(step, s.layers)
        setting = f"hw.checkpoint_layers={k}" if k else "hw.activation_checkpointing=false"
        mem_text += (f"; {setting} also fits with {TUNING_MARGIN:.0%} to spare ({k} of {s.layers} layers recompute, "
                     f"~{faster - 1:.0%} faster)")
    est = Estimate([("memory", mem_text)], fits, mem.peak)
    est.lines.append(("time", _time_line(est, hw, model, step, kind, epochs, max_steps, data_path, loss)))
    lora_bytes = s.lora_params(step.lora_r, list(step.lora_targets)) * 4
    checkpoints = save_total_limit * lora_bytes * 3          # adapter + AdamW's two moments
    base = s.params * 2
    est.disk_gib = (base + checkpoints + 2 * lora_bytes) / GiB
    est.lines.append(("disk", f"{_gib(est.disk_gib)}: base download {_gib(base / GiB)} (once, in HF_HOME), "
                              f"{save_total_limit} checkpoints {_gib(checkpoints / GiB)}, adapter + its MLflow copy "
                              f"{_gib(2 * lora_bytes / GiB)}"))
    return est


def _time_line(est: Estimate, hw: HardwareProfile, model: ModelDef, step: Step, kind: str, epochs: float,
               max_steps: int | None, data_path: Path | None, loss: str | None) -> str:
    pool = pool_tokens(data_path, kind)
    per_row = 2 if kind == "pref" else 1   # a pair trains on chosen and rejected
    if max_steps:
        tokens, source = max_steps * hw.effective_batch * hw.max_length * per_row, f"max_steps {max_steps}, an upper bound"
    elif pool is not None:
        tokens, source = pool * per_row * epochs, f"the pool's manifest: {pool / 1e6:.2f} M × {epochs:g} epoch(s)"
    else:
        tokens, source = ASSUMED_TOKENS * epochs, (f"no pool yet: assuming {ASSUMED_TOKENS / 1e6:.0f} M × {epochs:g} "
                                                   f"epoch(s); make prepare gives the real count")
    tps, how = _speed(hw, model, step, kind if kind == "sft" else loss)
    if tps is None:
        return f"{tokens / 1e6:.2f} M tokens ({source}); speed not estimated for {hw.name} (no peak TFLOP/s)"
    est.seconds = tokens / tps
    return f"{_hours(est.seconds)} for {tokens / 1e6:.1f} M tokens ({source}) at ~{tps:,.0f} tok/s ({how})"


def _speed(hw: HardwareProfile, model: ModelDef, step: Step, stage: str | None) -> tuple[float | None, str]:
    """Tokens/s and where it comes from: a ``make bench`` measurement of these settings on the profile's card; else
    one on another card, its MFU scaled to this card's peak; else the H200 anchors' MFU scaled the same way."""
    s = shape(model)
    found = measured.find(stage, hw, model.name, step.checkpointed(s.layers)) if stage else None
    if found and found.same_card(hw.description):
        return found.tokens_per_s, f"measured: {measured.describe(found)}"
    if not hw.peak_tflops:
        return None, ""
    if found and found.mfu:
        tps = found.mfu * hw.peak_tflops * 1e12 / s.flops_per_token(step.seq_len)
        return tps, (f"estimate: this profile's {found.mfu:.1%} MFU, {measured.describe(found)}, scaled to "
                     f"{hw.peak_tflops:g} TFLOP/s")
    tps = tokens_per_second(hw, model, step, preference=step.sequences == 2)
    return tps, f"estimate: the H200 anchors' MFU scaled to {hw.peak_tflops:g} TFLOP/s"


def evaluation(hw: HardwareProfile, model: ModelDef, tasks: list[str], *, limit: int | None,
               compare_base: bool, earlier: bool = False) -> Estimate:
    """lm-eval: the weights in bf16 (a QLoRA adapter is judged on the bf16 base) and one batch; hours per model (the
    adapter, the base with ``compare_base``, an earlier adapter with ``earlier``)."""
    s = shape(model)
    precision = "bf16" if hw.qlora else hw.precision
    mem = M.inference(s, precision, hw.max_length)
    room = usable_gib(hw)
    fits = mem.reserved <= room
    est = Estimate([("memory", f"{'GPU' if hw.device == 'cuda' else 'RAM'} {_gib(mem.peak)} for the weights and one "
                               f"{hw.max_length}-token request of {hw.memory_gib:g} GiB: {'PASS' if fits else 'FAIL'}"
                               f" (batch_size auto fills the rest)")], fits, mem.peak)
    known = [t for t in tasks if t in EVAL_TASKS]
    passes = sum(min(EVAL_TASKS[t][0], limit or EVAL_TASKS[t][0]) * EVAL_TASKS[t][1] * EVAL_TASKS[t][2] for t in known)
    models = 1 + compare_base + earlier
    if hw.peak_tflops and known:
        est.seconds = models * passes * 2 * s.matmul_params / (EVAL_MFU * hw.peak_tflops * 1e12)
        est.lines.append(("time", f"{_hours(est.seconds)} for {models} model(s) × {passes / 1e6:.1f} M scored tokens "
                                  f"({', '.join(known)}; estimate at {EVAL_MFU:.0%} MFU; the base's scores are cached "
                                  f"after the first run)"))
    else:
        est.lines.append(("time", "not estimated" + ("" if known else f" for {', '.join(tasks)}")
                          + ("" if hw.peak_tflops else f" for {hw.name} (no peak TFLOP/s)")))
    return est


def export(hw: HardwareProfile, model: ModelDef) -> Estimate:
    """The merge runs on the CPU: RAM for the base and the merged copy; disk for the folder and its MLflow copy."""
    s = shape(model)
    width = 4 if hw.precision == "fp32" else 2
    merged = s.params * width / GiB
    est = Estimate([("memory", f"RAM ~{_gib(2 * merged)} on the CPU (the {'fp32' if width == 4 else 'bf16'} base "
                               f"and the merged weights); no GPU")], None, 2 * merged)
    est.disk_gib = 2 * merged
    est.lines.append(("disk", f"{_gib(2 * merged)}: the merged folder {_gib(merged)} + its MLflow copy"))
    return est


SHARDS_WEIGHTS = {"fsdp": True, "zero3": True}  # the multi-GPU modes that split the base's weights across the cards


def per_card(hw: HardwareProfile, model: ModelDef, lora: Any, mode: str, cards: int) -> dict[str, float]:
    """Computed (not measured) GB per card under ``accelerate launch`` with configs/accelerate/<mode>.yaml on ``cards``
    GPUs: the base's weights, the LoRA's parameter + gradient + AdamW states, and what a sharded step gathers on top
    (FSDP's root unit — embedding and head — plus two decoder layers with prefetch; ZeRO-3 gathers about as much).
    Activations are each card's own in every mode (the memory line of the profile)."""
    s = shape(model)
    weights = M.weight_bytes(s, hw.precision, hw.qlora)
    states = s.lora_params(lora.r, list(lora.target_modules)) * M.ADAPTER_BYTES
    if SHARDS_WEIGHTS.get(mode):
        layer = (weights - s.embedding_params * 2) / s.layers
        gathered = (s.embedding_params * 2 + 2 * layer) * (1 - 1 / cards)
        return {"weights": weights / cards / 1e9, "adapter": states / cards / 1e9, "gathered": gathered / 1e9}
    if mode == "zero2":  # gradients and optimizer states sharded; the fp32 adapter parameters on every card
        kept = states * 4 / M.ADAPTER_BYTES
        return {"weights": weights / 1e9, "adapter": (kept + (states - kept) / cards) / 1e9, "gathered": 0.0}
    return {"weights": weights / 1e9, "adapter": states / 1e9, "gathered": 0.0}
