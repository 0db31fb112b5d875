"""sft: LoRA / QLoRA supervised fine-tuning on the prepared pool, tracked in MLflow, the adapter registered.

TRL's SFTTrainer on the pool in the prepare stage's sampler order (zh token share, curriculum, 1.5 epochs laid out up
front), assistant-only loss through the model's chat template, the model's Chinese system prompt where a conversation
has none; precision, batch, max_length, checkpointing, QLoRA and Liger from the hardware profile.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Any

from pipeline import cli
from pipeline.config import Resolved
from pipeline.plan import Item, Plan, base_model_input, data_input, dir_output, registry_output, repo_path

STAGE = "sft"


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
        ("schedule", f"{t.epochs} epochs in the sampler's order (zh share, curriculum), lr {t.lr}, {t.scheduler}, "
                     f"warmup {t.warmup_ratio}, max_grad_norm {t.max_grad_norm}, packing {'on' if t.packing else 'off'}, "
                     f"seed {t.seed}" + (f", max_steps {t.max_steps}" if t.max_steps else "")),
        ("loss", "assistant tokens only (+ end token), model's system prompt where a conversation has none"),
        ("checkpoints", f"every {t.save_steps} steps (keep {t.save_total_limit}); eval every {t.eval_steps}; resume "
                        f"{t.resume or 'off'}; early stopping "
                        f"{f'after {t.early_stopping_patience} evals' if t.early_stopping_patience else 'off'}"),
        ("log backend", f"MLflow + {cfg.log_backend}" if cfg.log_backend != "none" else "MLflow"),
    ], inputs=[data_input(cfg.data, ("sft.jsonl", "sft_eval.jsonl", "manifest.json"), r), base_model_input(r)],
       outputs=[dir_output(cfg.output_dir, "adapter + checkpoints"),
                Item("adapter", f"{cfg.output_dir}/adapter", "safetensors + tokenizer + chat template"),
                registry_output(cfg.register)])


def run(r: Resolved) -> SftResult:
    from pipeline import models, tracking, train

    cfg = r.cfg
    models.check_device(r.hw)
    pool = train.load_pool(cfg.data, "sft", r)
    out = repo_path(cfg.output_dir)
    licence = pool.manifest.get("licence", {})
    tags = {"data.run_id": pool.run_id or "", "data.sha256": pool.digest,
            "licence.noncommercial": str(bool(licence.get("noncommercial"))).lower(),
            "licence.noncommercial_sources": ",".join(licence.get("sources", [])) or "none"}
    with tracking.start_run(STAGE, r.as_dict(), hw=r.hw.name, model=r.model.name, tags=tags):
        rows, report = train.order(pool, cfg.train.epochs)
        tracking.log_params({"folder": str(pool.folder), "run_id": pool.run_id or "", "sha256": pool.digest,
                             "pool_rows": len(pool.train), "over_max_length": pool.over_length,
                             "ordered_rows": len(rows), "zh_share": report["zh_share"]}, prefix="data.")
        tracking.log_params({"world_size": int(os.environ.get("WORLD_SIZE", "1"))}, prefix="train.")
        tracking.log_dict(report, "data/sampler_report.json")
        with train.oom_guard(r):
            trainer, tokenizer = _trainer(r, pool, rows, out)
            trainer.train(resume_from_checkpoint=train.last_checkpoint(out, cfg.train.resume))
            adapter = out / "adapter"
            trainer.save_model(str(adapter))
            tokenizer.save_pretrained(str(adapter))
            final = _final_loss(trainer.state.log_history)
            if not trainer.is_world_process_zero():
                return SftResult(cfg.output_dir, str(adapter), trainer.state.global_step, final, None)
            tracking.log_table(train.generations(trainer.model, tokenizer, r.model.system_prompt), "generations.json")
        base, revision = models.base_model_path(r.model)
        reg = tracking.log_adapter_model(
            adapter, registered_name=cfg.register.name, alias=cfg.register.alias,
            base_model=r.model.hub_id or base, revision=revision, system_prompt=r.model.system_prompt,
            tags={**tags, "base_model": r.model.hub_id or r.model.name, "base_revision": r.model.revision or "",
                  "hw": r.hw.name, "stage": STAGE, "git.sha": tracking.git_state().get("git.sha", ""),
                  "final_loss": "" if final is None else f"{final:.4f}"})
    return SftResult(cfg.output_dir, str(adapter), trainer.state.global_step, final, reg["uri"])


def _trainer(r: Resolved, pool: Any, rows: list[int], out) -> tuple[Any, Any]:
    from datasets import Dataset
    from transformers import EarlyStoppingCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    from pipeline import models, train
    from pipeline.data.clean import with_system

    cfg, hw = r.cfg, r.hw
    system = r.model.system_prompt
    data = Dataset.from_list([{"messages": with_system(pool.train[i]["messages"], system)} for i in rows])
    held = Dataset.from_list([{"messages": with_system(x["messages"], system)} for x in pool.eval]) if pool.eval else None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    steps = max(1, math.ceil(len(data) / (hw.micro_batch * hw.grad_accum * world)))
    args = train.trainer_args(SFTConfig, hw, cfg.train, out, has_eval=held is not None, steps=steps,
                              log_backend=cfg.log_backend, assistant_only_loss=True, packing=cfg.train.packing)
    set_seed(cfg.train.seed)  # the LoRA init draws from the RNG: the same seed gives the same starting adapter
    model, tokenizer = models.load_for_training(r.model, hw, cfg.lora, cfg.qlora)
    callbacks = [train.metrics_callback(cfg.train.epochs)]
    if cfg.train.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience))
    trainer = train.in_order(SFTTrainer)(model=model, args=args, train_dataset=data, eval_dataset=held,
                                         processing_class=tokenizer, callbacks=callbacks)
    return trainer, tokenizer


def _final_loss(history: list[dict[str, Any]]) -> float | None:
    losses = [h["loss"] for h in history if "loss" in h]
    return float(losses[-1]) if losses else None


def main(argv: list[str] | None = None) -> int:
    return cli.main(STAGE, plan, run, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
