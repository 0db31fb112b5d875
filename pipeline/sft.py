"""sft: LoRA / QLoRA supervised fine-tuning on the prepared pool, tracked in MLflow, the adapter registered.

TRL's SFTTrainer on the pool in the prepare stage's sampler order (zh token share, curriculum, 1.5 epochs laid out up
front), assistant-only loss through the model's chat template, the model's Chinese system prompt where a conversation
has none; precision, batch, max_length, checkpointing, QLoRA and Liger from the hardware profile.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core import atomic
from pipeline.core.paths import repo_path
from pipeline.core.resolved import Resolved
from pipeline.data import prepared
from pipeline.data.clean import with_system
from pipeline.hardware import planner
from pipeline.models.loading import LoraConfig, check_device, load_for_training
from pipeline.stage import cli
from pipeline.stage.dryrun import (
    Item,
    Plan,
    base_model_input,
    data_input,
    dir_output,
    log_backend_fact,
    probes_section,
    registry_output,
    resume_input,
    sampling_section,
)
from pipeline.stage.spec import Stage
from pipeline.tracking import fingerprints, runs
from pipeline.training import trainer as T
from pipeline.training.config import TrainConfig, TrainingStageConfig


@dataclass
class SftTrainConfig(TrainConfig):
    packing: bool = False


@dataclass(kw_only=True)
class SftConfig(TrainingStageConfig):
    output_dir: str = "outputs/sft/default"
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: SftTrainConfig = field(default_factory=SftTrainConfig)


@dataclass
class SftResult:
    output_dir: str
    adapter: str
    steps: int
    final_loss: float | None
    registered: str | None      # models:/NAME@alias

    def __str__(self) -> str:
        return f"{self.steps} steps, final loss {self.final_loss}, adapter {self.adapter} → {self.registered}"


def plan(r: Resolved) -> Plan:
    cfg = r.cfg
    lora = cfg.lora
    method = (f"QLoRA ({cfg.qlora.quant_type}, double quant {cfg.qlora.double_quant}, compute "
              f"{cfg.qlora.compute_dtype})" if r.hw.qlora else f"LoRA on the {r.hw.precision} base")
    t = cfg.train
    return Plan(r, facts=[
        ("method", f"{method}; r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout} on {', '.join(lora.target_modules)}"),
        ("schedule", f"{t.epochs} epochs in the sampler's order (see the sampling plan), lr {t.lr}, {t.scheduler}, "
                     f"warmup {t.warmup_ratio}, max_grad_norm {t.max_grad_norm}, packing {'on' if t.packing else 'off'}, "
                     f"seed {t.seed}" + (f", max_steps {t.max_steps}" if t.max_steps else "")),
        ("loss", "assistant tokens only (+ end token), model's system prompt where a conversation has none"),
        ("checkpoints", f"every {t.save_steps} steps (keep {t.save_total_limit}); eval every {t.eval_steps}; resume "
                        f"{t.resume or 'off'}; early stopping "
                        f"{f'after {t.early_stopping_patience} evals' if t.early_stopping_patience else 'off'}"),
        log_backend_fact(cfg.log_backend, cfg.output_dir),
    ], sections=[sampling_section(cfg.data, "sft", r, t.epochs), probes_section(r)],
       inputs=[data_input(cfg.data, ("sft.jsonl", "sft_eval.jsonl", "manifest.json"), r), base_model_input(r),
               *resume_input(cfg.output_dir, t.resume)],
       outputs=[dir_output(cfg.output_dir, "adapter + checkpoints"),
                Item("adapter", f"{cfg.output_dir}/adapter", "safetensors + tokenizer + chat template"),
                registry_output(cfg.register)],
       estimate=planner.training(r.hw, r.model, kind="sft", lora=lora, epochs=t.epochs, max_steps=t.max_steps,
                                 data_path=_pool_path(cfg.data), save_total_limit=t.save_total_limit))


def _pool_path(ref: prepared.DataRef) -> Path | None:
    """The prepared folder the plan can read the token count from (a run id is looked up only at run time)."""
    return None if ref.run_id or not ref.path else repo_path(ref.path)


def run(r: Resolved) -> SftResult:
    cfg = r.cfg
    check_device(r.hw)
    pool = prepared.load_pool(cfg.data, "sft", r)
    out = repo_path(cfg.output_dir)
    atomic.check_replaceable(out / "adapter", "adapter_config.json", "adapter")  # before any training
    tags = prepared.data_tags(pool)
    with runs.start_run(STAGE.name, r.as_dict(), hw=r.hw.name, model=r.model.name, tags=tags,
                        system_metrics=True):
        rows, report = prepared.order(pool, cfg.train.epochs)
        T.log_data(pool, rows, report)
        done = T.fit(r, STAGE.name, lambda: build_trainer(r, pool, rows, out), out, tags, pool)
    return SftResult(cfg.output_dir, str(done.adapter), done.steps, done.final_loss, done.registered)


def build_trainer(r: Resolved, pool: prepared.Pool, rows: list[int], out: Path,
                  loaded: tuple[Any, Any] | None = None) -> tuple[Any, Any]:
    """(trainer, tokenizer) over ``rows`` of the pool; ``loaded`` = (PEFT model, tokenizer) already built (the
    benchmark's random model), else the profile's base with a new LoRA."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    cfg, hw = r.cfg, r.hw
    system = r.model.system_prompt
    data = Dataset.from_list([{"messages": with_system(pool.train[i]["messages"], system)} for i in rows])
    held = Dataset.from_list([{"messages": with_system(x["messages"], system)} for x in pool.eval]) if pool.eval else None
    set_seed(cfg.train.seed)  # the LoRA init draws from the RNG: the same seed gives the same starting adapter
    model, tokenizer = loaded or load_for_training(r.model, hw, cfg.lora, cfg.qlora)
    trainer = T.build_trainer(SFTTrainer, SFTConfig, r, model, tokenizer, data, held, out,
                              assistant_only_loss=True, packing=cfg.train.packing)
    return trainer, tokenizer


STAGE = Stage("sft", SftConfig, plan, run, __doc__.split("\n\n")[0], links={"data.run_id": "prepare"},
              key_metrics=T.KEY_METRICS, pool="sft", accel=True,
              checks={"data_pool": fingerprints.pool_digest, "weights": fingerprints.weights,
                      "final_loss": fingerprints.final_loss})


def main(argv: list[str] | None = None) -> int:
    return cli.main(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
