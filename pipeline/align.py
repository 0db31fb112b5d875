"""align: ORPO or DPO (`loss: orpo | dpo`) from the SFT adapter, with the R-DPO length penalty and the zh share.

One stage for both losses: the trainer is picked in :func:`pipeline.training.preference.trainer_classes`; everything
else — the pool in the sampler's order (``mix.pref.zh_share``), trainer arguments from the profile, metrics, resume,
the registry — is the training layer the sft stage uses too. The policy continues the SFT adapter's LoRA weights;
DPO's reference is the frozen SFT policy, ORPO has none.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.core import atomic
from pipeline.core.errors import StageError
from pipeline.core.paths import repo_path
from pipeline.core.resolved import Resolved
from pipeline.core.strict import Key
from pipeline.data import prepared
from pipeline.data.clean import with_system
from pipeline.hardware import planner
from pipeline.models.loading import LoraConfig, check_device, load_for_training, same_base
from pipeline.stage import cli
from pipeline.stage.dryrun import (
    Item,
    Plan,
    base_model_input,
    data_input,
    dir_output,
    log_backend_fact,
    model_ref_input,
    probes_section,
    registry_output,
    resume_input,
    sampling_section,
)
from pipeline.stage.resolve import resolve
from pipeline.stage.spec import Stage
from pipeline.tracking import fingerprints, lineage, runs
from pipeline.training import preference
from pipeline.training import trainer as T
from pipeline.training.config import TrainConfig, TrainingStageConfig

LOSSES = ("orpo", "dpo")


@dataclass
class AlignTrainConfig(TrainConfig):
    epochs: float = 1.0
    lr: float = 5e-6
    warmup_ratio: float = 0.1


@dataclass(kw_only=True)
class AlignConfig(TrainingStageConfig):
    loss: Literal["orpo", "dpo"]
    start_from: str | None = None        # SFT adapter: run id | name@alias | name/version | folder; null = the newest
    output_dir: str = "outputs/align/default"
    beta: float = 0.2
    length_penalty: float = 0.02
    reference: Literal["none", "sft_policy"] = "none"
    train: AlignTrainConfig = field(default_factory=AlignTrainConfig)

    def check(self, key: Key) -> list[str]:
        problems = super().check(key)  # the log backend's package
        if self.beta <= 0:
            problems.append(f"{key('beta')} must be positive; got {self.beta}")
        if self.length_penalty < 0:
            problems.append(f"{key('length_penalty')} must be >= 0; got {self.length_penalty}")
        if self.loss == "orpo" and self.reference != "none":
            problems.append(f"{key('reference')} must be none for `loss: orpo` (ORPO needs no reference model)")
        if self.loss == "dpo" and self.reference == "none":
            problems.append(f"{key('reference')} must be sft_policy for `loss: dpo` (DPO needs a reference model)")
        return problems


def plan(r: Resolved) -> Plan:
    cfg = r.cfg
    t = cfg.train
    if cfg.start_from is None:
        start = Item("start point (SFT adapter)", f"latest FINISHED sft run with base {r.model.name} and profile "
                     f"{r.hw.name}", f"looked up in MLflow at run time; produced by `make sft HW={r.hw.name} DRY_RUN=0`")
    else:
        start = model_ref_input("start point (SFT adapter)", cfg.start_from, "sft", r, key="start_from")
    reference = "none (ORPO)" if cfg.reference == "none" else "the frozen SFT policy"
    return Plan(r, facts=[
        ("loss", f"{cfg.loss}, beta {cfg.beta}, length penalty alpha {cfg.length_penalty} (R-DPO: the margin minus "
                 f"alpha·(|y_w| − |y_l|) tokens), reference: {reference}"),
        ("data mix", f"preference pairs in the sampler's order, zh share of tokens >= {_pref_share(r)}; OASST1's zh "
                     f"trees give the only Chinese pairs, the shortfall action is logged"),
        ("schedule", f"{t.epochs} epochs, lr {t.lr}, {t.scheduler}, warmup {t.warmup_ratio}, "
                     f"max_grad_norm {t.max_grad_norm}, seed {t.seed}"),
        log_backend_fact(cfg.log_backend, cfg.output_dir),
    ], sections=[sampling_section(cfg.data, "pref", r, t.epochs), probes_section(r)],
       inputs=[start, data_input(cfg.data, ("pref.jsonl", "pref_eval.jsonl"), r), base_model_input(r),
               *resume_input(cfg.output_dir, t.resume)],
       outputs=[dir_output(cfg.output_dir, "adapter + checkpoints"), registry_output(cfg.register)],
       estimate=planner.training(r.hw, r.model, kind="pref", lora_source=LoraConfig(), epochs=t.epochs,
                                 max_steps=t.max_steps, save_total_limit=t.save_total_limit,
                                 data_path=None if cfg.data.run_id or not cfg.data.path else repo_path(cfg.data.path),
                                 logit_chunk=preference.logit_chunk(cfg.loss), loss=cfg.loss))


def _pref_share(r: Resolved) -> str:
    """The zh share the pool's manifest holds, or (before prepare ran) what prepare's config will write."""
    manifest = repo_path(r.cfg.data.path or "") / "manifest.json"
    if r.cfg.data.path and manifest.exists():
        return f"{json.loads(manifest.read_text(encoding='utf-8'))['mix']['pref']['zh_share']} (pool manifest)"
    return f"{resolve('prepare', hw=r.hw.name).cfg.mix.pref.zh_share} (prepare config)"


@dataclass
class AlignResult:
    output_dir: str
    adapter: str
    steps: int
    final_loss: float | None
    start: str
    registered: str | None

    def __str__(self) -> str:
        return (f"{self.steps} steps from {self.start}, final loss {self.final_loss}, adapter {self.adapter} → "
                f"{self.registered}")


def run(r: Resolved) -> AlignResult:
    cfg = r.cfg
    check_device(r.hw)
    start = lineage.find_adapter(cfg.start_from, stage="sft", model=r.model.name, hw=r.hw.name)
    recorded = start["tags"].get("base_model", "")
    if not same_base(recorded, r.model):
        raise StageError(f"start point {start['source']} was trained on base {recorded!r}, but this run's base is "
                         f"{r.model.hub_id or r.model.name}; set `start_from` to an adapter of the same base, "
                         f"or `model` to its base")
    pool = prepared.load_pool(cfg.data, "pref", r)
    out = repo_path(cfg.output_dir)
    atomic.check_replaceable(out / "adapter", "adapter_config.json", "adapter")  # before any training
    tags = {**prepared.data_tags(pool), "start_from": start["source"], "start_from.run_id": start["run_id"] or "",
            "start_from.version": start["version"] or "", "loss": cfg.loss}
    with runs.start_run(STAGE.name, r.as_dict(), hw=r.hw.name, model=r.model.name, tags=tags,
                        system_metrics=True):
        rows, report = prepared.order(pool, cfg.train.epochs)
        T.log_data(pool, rows, report, zh_pairs=sum(1 for x in pool.train if x["lang"] == "zh"),
                   shortfall=(report["shortfall"] or {}).get("action", "none"))
        done = T.fit(r, STAGE.name, lambda: build_trainer(r, pool, rows, out, start["folder"]), out, tags,
                     pool)
    return AlignResult(cfg.output_dir, str(done.adapter), done.steps, done.final_loss, start["source"], done.registered)


def build_trainer(r: Resolved, pool: prepared.Pool, rows: list[int], out: Path, adapter: Path | None,
             loaded: tuple[Any, Any] | None = None) -> tuple[Any, Any]:
    """(trainer, tokenizer) over ``rows`` of the pool; ``loaded`` = (PEFT model, tokenizer) already built (the
    benchmark's random model), else the profile's base continuing the SFT ``adapter``."""
    from datasets import Dataset
    from transformers import set_seed

    cfg, hw = r.cfg, r.hw
    set_seed(cfg.train.seed)
    model, tokenizer = loaded or load_for_training(r.model, hw, None, cfg.qlora, adapter=str(adapter))
    data = Dataset.from_list([_pair(pool.train[i], cfg.loss, tokenizer, r.model.system_prompt) for i in rows])
    held = Dataset.from_list([_pair(x, cfg.loss, tokenizer, r.model.system_prompt) for x in pool.eval]) \
        if pool.eval else None
    config_cls, trainer_cls = preference.trainer_classes(cfg.loss, cfg.length_penalty)
    extra = {"precompute_ref_log_probs": True, "loss_type": ["sigmoid"]} if cfg.loss == "dpo" else {}
    trainer = T.build_trainer(trainer_cls, config_cls, r, model, tokenizer, data, held, out, beta=cfg.beta, **extra)
    return trainer, tokenizer


def _pair(row: dict[str, Any], loss: str, tokenizer: Any, system: str) -> dict[str, Any]:
    """A preference row as the trainer wants it. ORPO gets the prompt rendered through the chat template and the
    answers as plain strings: given messages, it would train on `answer<|im_end|>\n<|im_end|>` (a double end)."""
    prompt = with_system(row["prompt"], system)
    if loss == "orpo":
        return {"prompt": tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
                "chosen": row["chosen"][0]["content"], "rejected": row["rejected"][0]["content"]}
    return {"prompt": prompt, "chosen": row["chosen"], "rejected": row["rejected"]}


STAGE = Stage("align", AlignConfig, plan, run, __doc__.split("\n\n")[0],
              links={"data.run_id": "prepare", "start_from": "sft"}, key_metrics=T.KEY_METRICS, pool="pref",
              accel=True, variants=LOSSES, variant_flag="loss", pinned={"start_from": "start_from"},
              checks={"data_pool": fingerprints.pool_digest, "weights": fingerprints.weights,
                      "final_loss": fingerprints.final_loss})


def main(argv: list[str] | None = None) -> int:
    return cli.main(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
