"""What the two training stages (sft, align) share: the prepared pool in sampler order, trainer arguments from the
hardware profile, our MLflow metrics callback, resume, the out-of-memory hint and the closing generations table.

The pool is ordered once, up front, by the same :class:`~pipeline.data.sampler.MixedBucketSampler` and seed that
prepare reported (so epoch 0 is the mix in the data card), for the whole training (1.5 epochs included); the Trainer
then reads that ordered dataset sequentially, which keeps resume and DDP sharding exact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.cli import StageError
from pipeline.config import DataRef, HardwareProfile, ModelDef, Resolved, RowMix, TrainConfig, build
from pipeline.plan import repo_path

log = logging.getLogger("pipeline.train")
PROBES = Path(__file__).parent / "assets" / "probe_prompts.json"


# ----------------------------------------------------------------------------------------------------------------
# The prepared pool
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Pool:
    folder: Path
    run_id: str | None
    manifest: dict[str, Any]
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    over_length: int            # rows dropped because they exceed the profile's max_length

    @property
    def digest(self) -> str:
        return self.manifest["outputs"][f"{self.kind}.jsonl"]["sha256"]

    kind: str = "sft"


def pool_folder(ref: DataRef) -> tuple[Path, str | None]:
    """The folder of a prepared pool: the output folder of the prepare run `data.run_id`, or `data.path`."""
    if ref.run_id:
        from pipeline import tracking

        return tracking.prepared_folder(ref.run_id), ref.run_id
    folder = repo_path(ref.path or "")
    if not ref.path or not (folder / "manifest.json").exists():
        raise StageError(f"`data.path` {ref.path!r} holds no prepared pool (no manifest.json); run `make prepare` "
                         f"(HW=cpu for the offline fixtures) or set `data.run_id` to a prepare run")
    return folder, None


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_pool(ref: DataRef, kind: str, r: Resolved) -> Pool:
    """The pool of one row type, rows over the profile's max_length dropped (and counted). Token counts are
    measured again when the pool was prepared with another model's tokenizer."""
    folder, run_id = pool_folder(ref)
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    train, held = _rows(folder / f"{kind}.jsonl"), _rows(folder / f"{kind}_eval.jsonl")
    if manifest.get("tokenizer") != r.model.ref:
        log.warning("the pool was measured with %s, this run uses %s: measuring token lengths again",
                    manifest.get("tokenizer"), r.model.ref)
        for rows in (train, held):
            _measure(rows, kind, r.model, manifest["buckets"])
    limit = r.hw.max_length
    fits = [row for row in train if row["n_tokens"] <= limit]
    over = len(train) - len(fits)
    if over:
        log.warning("%d of %d %s rows are longer than max_length %d (profile %s) and are left out", over, len(train),
                    kind, limit, r.hw.name)
    if not fits:
        raise StageError(f"no {kind} row fits max_length {limit} of profile {r.hw.name}; raise `hw.max_length`")
    return Pool(folder, run_id, manifest, fits, [row for row in held if row["n_tokens"] <= limit], over, kind)


def _measure(rows: list[dict[str, Any]], kind: str, model: ModelDef, edges: list[int]) -> None:
    from pipeline.data.clean import count_tokens
    from pipeline.models import load_tokenizer

    keys = ("messages",) if kind == "sft" else ("prompt", "chosen", "rejected")
    batch = {k: [row[k] for row in rows] for k in keys}
    out = count_tokens(batch, tokenizer=load_tokenizer(model), system=model.system_prompt, kind=kind, edges=edges,
                       truncate=False)
    for row, n, b in zip(rows, out["n_tokens"], out["bucket"], strict=True):
        row["n_tokens"], row["bucket"] = n, min(b, len(edges) - 1)


def order(pool: Pool, epochs: float) -> tuple[list[int], dict[str, Any]]:
    """The whole training's row order by the prepare stage's sampler and seed; and its report."""
    from pipeline.data.sampler import MixedBucketSampler, ShortfallError

    mix = pool.manifest["mix"]
    row_mix = build(RowMix, mix[pool.kind], f"{pool.folder}/manifest.json")
    cols = ([row[k] for row in pool.train] for k in ("lang", "source", "bucket", "n_tokens"))
    try:
        sampler = MixedBucketSampler(*cols, row_mix, kind=pool.kind, n_buckets=len(pool.manifest["buckets"]),
                                     max_repeats=mix["max_repeats"], on_shortfall=mix["on_shortfall"],
                                     seed=pool.manifest["seed"])
        return sampler.order(epochs), sampler.report(epochs)
    except ShortfallError as err:
        raise StageError(str(err)) from err


def data_tags(pool: Pool) -> dict[str, str]:
    """Lineage and licence tags of a run that trains on `pool` (the run's tags and its registered version's)."""
    licence = pool.manifest.get("licence", {})
    return {"data.run_id": pool.run_id or "", "data.sha256": pool.digest,
            "licence.noncommercial": str(bool(licence.get("noncommercial"))).lower(),
            "licence.noncommercial_sources": ",".join(licence.get("sources", [])) or "none"}


def version_tags(r: Resolved, stage: str, final_loss: float | None) -> dict[str, str]:
    """What a registered adapter says about how it was made, beside its data tags."""
    from pipeline import tracking

    return {"base_model": r.model.hub_id or r.model.name, "base_revision": r.model.revision or "", "hw": r.hw.name,
            "stage": stage, "git.sha": tracking.git_state().get("git.sha", ""),
            "final_loss": "" if final_loss is None else f"{final_loss:.4f}"}


def log_data(pool: Pool, rows: list[int], report: dict[str, Any], **extra: Any) -> None:
    """The data a run trains on, as params (data.*, train.world_size) and the sampler's report as an artifact."""
    from pipeline import tracking

    tracking.log_params({"folder": str(pool.folder), "run_id": pool.run_id or "", "sha256": pool.digest,
                         "pool_rows": len(pool.train), "over_max_length": pool.over_length, "ordered_rows": len(rows),
                         "zh_share": report["zh_share"], **extra}, prefix="data.")
    tracking.log_params({"world_size": int(os.environ.get("WORLD_SIZE", "1"))}, prefix="train.")
    tracking.log_dict(report, "data/sampler_report.json")


@dataclass
class Fitted:
    adapter: Path
    steps: int
    final_loss: float | None
    registered: str | None      # models:/NAME@alias (None on ranks other than 0)


def fit(r: Resolved, stage: str, build: Any, out: Path, tags: dict[str, str]) -> Fitted:
    """Build the trainer, train (resuming if asked), save the adapter with its tokenizer, then on rank 0 log the
    generations table and register the adapter with its lineage tags. Out of memory anywhere → the profile hint."""
    from pipeline import models, tracking

    with oom_guard(r):
        trainer, tokenizer = build()
        trainer.train(resume_from_checkpoint=last_checkpoint(out, r.cfg.train.resume))
        adapter = out / "adapter"
        trainer.save_model(str(adapter))
        tokenizer.save_pretrained(str(adapter))
        final = final_loss(trainer.state.log_history)
        if not trainer.is_world_process_zero():
            return Fitted(adapter, trainer.state.global_step, final, None)
        tracking.log_table(generations(trainer.model, tokenizer, r.model.system_prompt), "generations.json")
    base, revision = models.base_model_path(r.model)
    reg = tracking.log_adapter_model(adapter, registered_name=r.cfg.register.name, alias=r.cfg.register.alias,
                                     base_model=r.model.hub_id or base, revision=revision,
                                     system_prompt=r.model.system_prompt,
                                     tags={**tags, **version_tags(r, stage, final)})
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
    import math

    from transformers import EarlyStoppingCallback

    cfg, hw = r.cfg, r.hw
    world = int(os.environ.get("WORLD_SIZE", "1"))
    steps = max(1, math.ceil(len(data) / (hw.micro_batch * hw.grad_accum * world)))
    args = trainer_args(config_cls, hw, cfg.train, out, has_eval=held is not None, steps=steps,
                        log_backend=cfg.log_backend, **extra)
    callbacks = [metrics_callback(cfg.train.epochs)]
    if cfg.train.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience))
    return in_order(trainer_cls)(model=model, args=args, train_dataset=data, eval_dataset=held,
                                 processing_class=tokenizer, callbacks=callbacks)


def in_order(trainer_cls: type) -> type:
    """The trainer class reading its dataset front to back: the order is the sampler's, already shuffled per epoch."""
    from torch.utils.data import SequentialSampler

    class Ordered(trainer_cls):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    Ordered.__name__ = f"Ordered{trainer_cls.__name__}"
    return Ordered


def last_checkpoint(out: Path, resume: str | None) -> str | None:
    """`train.resume`: auto → the newest checkpoint in the output folder (None: start fresh); a path → that one."""
    if not resume:
        return None
    if resume != "auto":
        if not Path(resume).is_dir():
            raise StageError(f"`train.resume` {resume!r} is not a checkpoint folder; use auto or a checkpoint-N path")
        return resume
    from transformers.trainer_utils import get_last_checkpoint

    found = get_last_checkpoint(str(out)) if out.is_dir() else None
    log.info("resume: %s", found or f"no checkpoint in {out}, starting fresh")
    return found


def oom_hint(r: Resolved) -> str:
    hw = r.hw
    return (f"CUDA ran out of memory with profile {hw.name} (micro_batch {hw.micro_batch}, max_length "
            f"{hw.max_length}, activation_checkpointing {hw.activation_checkpointing}, qlora {hw.qlora}). Lower "
            f"SET=\"hw.micro_batch=1\" (grad_accum keeps the effective batch: hw.grad_accum={hw.effective_batch}) or "
            f"hw.max_length, turn on hw.activation_checkpointing or hw.qlora; `make plan HW={hw.name}` shows the "
            f"predicted memory")


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

    from pipeline import tracking

    class MlflowMetrics(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.clock, self.tokens = time.perf_counter(), state.num_input_tokens_seen
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs or not tracking.has_run():
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
                tracking.log_metrics(m, step=state.global_step)

    return MlflowMetrics()


def generations(model: Any, tokenizer: Any, system: str, max_new_tokens: int = 48) -> dict[str, list]:
    """Greedy answers to the fixed zh and en probe prompts (pipeline/assets/probe_prompts.json), as table columns."""
    import torch

    probes = json.loads(PROBES.read_text(encoding="utf-8"))
    table: dict[str, list] = {"lang": [], "prompt": [], "output": []}
    model.eval()
    for lang, prompts in probes.items():
        for prompt in prompts:
            ids = tokenizer.apply_chat_template([{"role": "system", "content": system},
                                                 {"role": "user", "content": prompt}],
                                                add_generation_prompt=True, return_tensors="pt", return_dict=True)
            ids = {k: v.to(model.device) for k, v in ids.items()}
            with torch.no_grad():
                out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            table["lang"].append(lang)
            table["prompt"].append(prompt)
            table["output"].append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return table
