"""sft: LoRA / QLoRA supervised fine-tuning on the prepared pool, tracked in MLflow, the adapter registered.

TRL's SFTTrainer on the pool in the prepare stage's sampler order (zh token share, curriculum, 1.5 epochs laid out up
front), assistant-only loss through the model's chat template, the model's Chinese system prompt where a conversation
has none; precision, batch, max_length, checkpointing, QLoRA and Liger from the hardware profile.
"""

from __future__ import annotations

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
    tags = train.data_tags(pool)
    with tracking.start_run(STAGE, r.as_dict(), hw=r.hw.name, model=r.model.name, tags=tags):
        rows, report = train.order(pool, cfg.train.epochs)
        train.log_data(pool, rows, report)
        done = train.fit(r, STAGE, lambda: _trainer(r, pool, rows, out), out, tags)
    return SftResult(cfg.output_dir, str(done.adapter), done.steps, done.final_loss, done.registered)


def _trainer(r: Resolved, pool: Any, rows: list[int], out) -> tuple[Any, Any]:
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from pipeline import models, train
    from pipeline.data.clean import with_system

    cfg, hw = r.cfg, r.hw
    system = r.model.system_prompt
    data = Dataset.from_list([{"messages": with_system(pool.train[i]["messages"], system)} for i in rows])
    held = Dataset.from_list([{"messages": with_system(x["messages"], system)} for x in pool.eval]) if pool.eval else None
    set_seed(cfg.train.seed)  # the LoRA init draws from the RNG: the same seed gives the same starting adapter
    model, tokenizer = models.load_for_training(r.model, hw, cfg.lora, cfg.qlora)
    trainer = train.build_trainer(SFTTrainer, SFTConfig, r, model, tokenizer, data, held, out,
                                  assistant_only_loss=True, packing=cfg.train.packing)
    return trainer, tokenizer


def main(argv: list[str] | None = None) -> int:
    return cli.main(STAGE, plan, run, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
