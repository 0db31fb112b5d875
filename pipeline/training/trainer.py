"""The TRL trainer both training stages build: arguments from the hardware profile and the schedule, the dataset
read in the sampler's order, our MLflow metrics callback, resume, the out-of-memory hint, and the closing step —
save, the generations table, register the adapter with its lineage tags."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core import atomic
from pipeline.core.errors import StageError
from pipeline.core.profiles import HardwareProfile
from pipeline.core.resolved import Resolved
from pipeline.core.runtime import sharded, world_size
from pipeline.data.prepared import Pool
from pipeline.hardware import planner
from pipeline.models.loading import base_model_path
from pipeline.tracking import model_registry, runlog, runs
from pipeline.training import checkpoints
from pipeline.training.config import TrainConfig
from pipeline.training.preference import logit_chunk
from pipeline.training.probes import generations

log = logging.getLogger(__name__)
KEY_METRICS = ("loss", "eval_loss", "tokens_per_second", "peak_memory")  # what a pipeline's parent copies of a training


def version_tags(r: Resolved, stage: str, final_loss: float | None) -> dict[str, str]:
    """What a registered adapter says about how it was made, beside its data tags."""
    return {"base_model": r.model.hub_id or r.model.name, "base_revision": r.model.revision or "", "hw": r.hw.name,
            "stage": stage, "git.sha": runs.git_state().get("git.sha", ""),
            "final_loss": "" if final_loss is None else f"{final_loss:.4f}"}


def log_data(pool: Pool, rows: list[int], report: dict[str, Any], **extra: Any) -> None:
    """The data a run trains on, as params (data.*, train.world_size) and the sampler's report as an artifact."""
    runs.log_params({"folder": str(pool.folder), "run_id": pool.run_id or "", "sha256": pool.digest,
                     "pool_rows": len(pool.train), "over_max_length": pool.over_length, "ordered_rows": len(rows),
                     "zh_share": report["zh_share"], **extra}, prefix="data.")
    runs.log_params({"world_size": world_size()}, prefix="train.")
    runs.log_dict(report, "data/sampler_report.json")


@dataclass
class Fitted:
    adapter: Path
    steps: int
    final_loss: float | None
    registered: str | None      # models:/NAME@alias (None on ranks other than 0)


def fit(r: Resolved, stage: str, build: Any, out: Path, tags: dict[str, str], pool: Pool) -> Fitted:
    """Build the trainer, train (continuing the checkpoint ``train.resume`` picks, refused when it was written under
    other settings), save the adapter with its tokenizer, then on rank 0 log the generations table and register the
    adapter with its lineage tags. Out of memory anywhere → the profile hint."""
    fp = checkpoints.fingerprint(r.as_dict(), pool_sha256=pool.digest, manifest=pool.folder / "manifest.json",
                                 start=tags.get("start_from", ""), world_size=world_size(), run_id=runs.current_run_id())
    resume = checkpoints.choose(out, r.cfg.train.resume)
    if resume is not None:
        then = checkpoints.check(resume, fp)
        runs.set_tags({"resumed_from_checkpoint": str(resume), "resumed_from_run": then.get("run_id", "")})
    with oom_guard(r):
        trainer, tokenizer = build()
        trainer.zh_fingerprint = fp  # written into every checkpoint-N it saves (``in_order``)
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        adapter = out / "adapter"
        with atomic.replacing(adapter, marker="adapter_config.json", what="adapter",
                              enabled=trainer.is_world_process_zero()) as staged:  # whole or not at all
            trainer.save_model(str(staged))
            tokenizer.save_pretrained(str(staged))
        final = final_loss(trainer.state.log_history)
        if not trainer.is_world_process_zero():
            return Fitted(adapter, trainer.state.global_step, final, None)
        log.info("%s trained %d steps, final loss %s; adapter saved to %s", stage, trainer.state.global_step, final,
                 adapter)
        if sharded():  # rank 0 holds a shard of each weight: generating alone would wait for the other ranks
            log.info("%s: generation probes skipped under FSDP / ZeRO-3 (sharded weights); `make chat` or evaluate "
                     "answer from the saved adapter", stage)
        else:
            runs.log_table(generations(trainer.model, tokenizer, r.model.system_prompt), "generations.json")
    base, revision = base_model_path(r.model)
    reg = model_registry.log_adapter_model(adapter, registered_name=r.cfg.register.name, alias=r.cfg.register.alias,
                                     base_model=r.model.hub_id or base, revision=revision,
                                     system_prompt=r.model.system_prompt,
                                     tags={**tags, **version_tags(r, stage, final)})
    log.info("%s registered %s", stage, reg["uri"])
    return Fitted(adapter, trainer.state.global_step, final, reg["uri"])


def final_loss(history: list[dict[str, Any]]) -> float | None:
    losses = [h["loss"] for h in history if "loss" in h]
    return float(losses[-1]) if losses else None


# ----------------------------------------------------------------------------------------------------------------
# Trainer arguments and the sequential sampler
# ----------------------------------------------------------------------------------------------------------------
def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def trainer_args(cls: type, hw: HardwareProfile, t: TrainConfig, out: Path, *, has_eval: bool, steps: int,
                 log_backend: str = "none", **extra: Any):
    """A TRL config (SFTConfig, DPOConfig, …) from the profile and the schedule. The epochs are already laid out in
    the sampler order, so the Trainer runs one pass over it (``steps`` optimizer steps)."""
    names = _fields(cls)
    kw: dict[str, Any] = dict(
        output_dir=str(out), num_train_epochs=1, max_steps=t.max_steps or steps,
        per_device_train_batch_size=hw.micro_batch, per_device_eval_batch_size=hw.micro_batch,
        gradient_accumulation_steps=hw.grad_accum, learning_rate=t.lr, lr_scheduler_type=t.scheduler,
        max_grad_norm=t.max_grad_norm, seed=t.seed, data_seed=t.seed, bf16=hw.precision == "bf16",
        fp16=hw.precision == "fp16", use_cpu=hw.device == "cpu", logging_steps=t.logging_steps,
        report_to="none" if log_backend == "none" else [log_backend],  # MLflow is ours (metrics_callback)
        logging_first_step=True, save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        eval_strategy="steps" if has_eval else "no", eval_steps=t.eval_steps, include_num_input_tokens_seen="non_padding",
        max_length=hw.max_length, use_liger_kernel=hw.liger, dataloader_drop_last=False, **extra)
    # names that moved between transformers 5.x releases
    kw["warmup_ratio" if "warmup_ratio" in names else "warmup_steps"] = t.warmup_ratio
    kw["activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"] = \
        hw.activation_checkpointing
    if hw.activation_checkpointing:
        kw["gradient_checkpointing_kwargs" if "gradient_checkpointing_kwargs" in names and
           "activation_checkpointing_kwargs" not in names else "activation_checkpointing_kwargs"] = \
            {"use_reentrant": False}
    if t.early_stopping_patience:
        kw.update(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
                  save_steps=t.eval_steps)
    missing = sorted(k for k in kw if k not in names)
    if missing:  # never drop a setting silently: a renamed option would quietly turn precision or Liger off
        raise StageError(f"{cls.__name__} of the installed TRL/transformers has no {', '.join(missing)}; "
                         f"install the versions in constraints.txt")
    return cls(**kw)


@contextlib.contextmanager
def oom_guard(r: Resolved) -> Iterator[None]:
    """A CUDA out-of-memory anywhere in loading, training or generating becomes the profile hint (run FAILED)."""
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError as err:
        raise StageError(oom_hint(r)) from err


def build_trainer(trainer_cls: type, config_cls: type, r: Resolved, model: Any, tokenizer: Any, data: Any,
                  held: Any, out: Path, **extra: Any) -> Any:
    """A TRL trainer reading `data` in order, with the profile's arguments (one pass = the sampler's epochs),
    our metrics callback and, when configured, early stopping on eval_loss."""
    from transformers import EarlyStoppingCallback

    cfg, hw = r.cfg, r.hw
    steps = max(1, math.ceil(len(data) / (hw.micro_batch * hw.grad_accum * world_size())))
    args = trainer_args(config_cls, hw, cfg.train, out, has_eval=held is not None, steps=steps,
                        log_backend=cfg.log_backend, **extra)
    callbacks = [metrics_callback(cfg.train.epochs)]
    layers = recomputed_layers(r)
    if layers is not None:
        log.info("activation checkpointing on the first %d decoder layers (hw.checkpoint_layers %s)", layers,
                 hw.checkpoint_layers)
        callbacks.append(partial_checkpointing(layers))
    if cfg.train.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience))
    quick_tokenizer_hash(tokenizer)
    return in_order(trainer_cls)(model=model, args=args, train_dataset=data, eval_dataset=held,
                                 processing_class=tokenizer, callbacks=callbacks)


def quick_tokenizer_hash(tokenizer: Any) -> None:
    """TRL's dataset maps take the tokenizer as an argument, so `datasets` fingerprints it by pickling every Python
    object it holds — 2.4 s a map for Qwen2.5's 151k-token vocabulary on one core, twice per stage. Fingerprint this
    tokenizer class instead by the digest of what it does: the backend's serialised pipeline (truncation and padding
    off, as `datasets` does) and the chat template, special tokens and sides. The same tokenizer gives the same
    fingerprint, any change to it another; ~0.2 s."""
    import hashlib

    from datasets.utils._dill import Pickler

    if getattr(tokenizer, "backend_tokenizer", None) is None:
        return  # a slow (Python) tokenizer: `datasets` pickles it as usual

    def digest(pickler: Any, tok: Any) -> None:
        backend = tok.backend_tokenizer
        truncation, padding = backend.truncation, backend.padding
        backend.no_truncation()
        backend.no_padding()
        try:
            text = backend.to_str()
        finally:
            if truncation:
                backend.enable_truncation(**truncation)
            if padding:
                backend.enable_padding(**padding)
        around = json.dumps([type(tok).__name__, tok.chat_template, tok.special_tokens_map, tok.padding_side,
                             tok.truncation_side, tok.model_max_length], sort_keys=True, default=str)
        pickler.save_reduce(str, (hashlib.sha256(text.encode() + around.encode()).hexdigest(),), obj=tok)

    Pickler.dispatch[type(tokenizer)] = digest


def recomputed_layers(r: Resolved) -> int | None:
    """How many decoder layers recompute under the profile, ``auto`` settled for this stage and model (None: every
    layer, or checkpointing off)."""
    if not r.hw.activation_checkpointing:
        return None
    return planner.checkpoint_layers(r.hw, r.model, pair=r.stage == "align",
                                     logit_chunk=logit_chunk(getattr(r.cfg, "loss", "")))


def partial_checkpointing(layers: int):
    """``hw.checkpoint_layers``: once the Trainer has turned checkpointing on for every decoder layer, the layers
    after the first ``layers`` keep their activations instead (faster, more memory). Decoder layers are the modules
    transformers checkpoints (``GradientCheckpointingLayer``), in model order."""
    from transformers import TrainerCallback
    from transformers.modeling_layers import GradientCheckpointingLayer

    class PartialCheckpointing(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
            for i, block in enumerate(blocks):
                block.gradient_checkpointing = block.gradient_checkpointing and i < layers

    return PartialCheckpointing()


def in_order(trainer_cls: type) -> type:
    """The trainer class reading its dataset front to back (the order is the sampler's, already shuffled per epoch),
    writing the run's fingerprint into each checkpoint right after its weights — before its trainer state, so a
    checkpoint with a readable trainer state has its fingerprint, and before older checkpoints are rotated away."""
    from torch.utils.data import SequentialSampler

    class Ordered(trainer_cls):
        zh_fingerprint: dict[str, Any] | None = None

        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

        def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
            super().save_model(output_dir, _internal_call)
            if _internal_call and output_dir and self.zh_fingerprint and self.args.should_save:
                checkpoints.write(Path(output_dir), self.zh_fingerprint)

    Ordered.__name__ = f"Ordered{trainer_cls.__name__}"
    return Ordered


def oom_hint(r: Resolved) -> str:
    hw = r.hw
    return (f"CUDA ran out of memory with profile {hw.name} (micro_batch {hw.micro_batch}, max_length "
            f"{hw.max_length}, activation_checkpointing {hw.activation_checkpointing}, qlora {hw.qlora}). Lower "
            f"SET=\"hw.micro_batch=1\" (grad_accum keeps the effective batch: hw.grad_accum={hw.effective_batch}) or "
            f"hw.max_length, or turn on hw.activation_checkpointing or hw.qlora")


# ----------------------------------------------------------------------------------------------------------------
# Metrics into MLflow
# ----------------------------------------------------------------------------------------------------------------
LOSS_TERMS = ("rewards/", "logps/", "nll_loss", "log_odds", "length_penalty")  # the preference trainers' own terms


def metrics_callback(epochs: float):
    """One callback of ours (the HF MLflow callback renames and ends runs): every logging step on rank 0 logs loss,
    grad_norm, learning_rate, tokens_per_second (non-padding tokens over the interval's wall time), epoch (in the
    sampler's epochs), eval_loss, and on CUDA peak memory allocated/reserved since the last log."""
    import torch
    from transformers import TrainerCallback

    history = logging.getLogger(runlog.TRAINER_LOGS)

    class MlflowMetrics(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.clock, self.tokens = time.perf_counter(), state.num_input_tokens_seen
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

        def on_log(self, args, state, control, logs=None, **kw):
            if state.is_world_process_zero and logs:
                history.info("step %d/%d: %s", state.global_step, state.max_steps, json.dumps(logs, ensure_ascii=False))
            if not state.is_world_process_zero or not logs or not runs.has_run():
                return
            m = {k: float(logs[k]) for k in ("loss", "grad_norm", "learning_rate", "eval_loss") if k in logs}
            m.update({k: float(v) for k, v in logs.items()
                      if k.removeprefix("eval_").startswith(LOSS_TERMS) and isinstance(v, (int, float))})
            if "loss" in logs:
                now, tokens = time.perf_counter(), state.num_input_tokens_seen
                if tokens > self.tokens and now > self.clock:
                    m["tokens_per_second"] = (tokens - self.tokens) / (now - self.clock)
                self.clock, self.tokens = now, tokens
                m["epoch"] = epochs * state.global_step / max(state.max_steps, 1)
                if torch.cuda.is_available():
                    m["peak_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
                    m["peak_memory_reserved_gib"] = torch.cuda.max_memory_reserved() / 2 ** 30
                    torch.cuda.reset_peak_memory_stats()
            if m:
                runs.log_metrics(m, step=state.global_step)
            runs.heartbeat()

    return MlflowMetrics()
