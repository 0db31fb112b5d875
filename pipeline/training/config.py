"""What the configs of the two training stages share: the schedule (:class:`TrainConfig`) and the keys every
training stage has (:class:`TrainingStageConfig`); ``pipeline/sft.py`` and ``pipeline/align.py`` add their own."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Literal

from pipeline.core.strict import Key, at_least, share
from pipeline.data.prepared import DataRef
from pipeline.models.loading import QloraConfig
from pipeline.tracking.model_registry import RegisterConfig

LogBackend = Literal["none", "tensorboard", "wandb"]  # beside MLflow, which is always on
BACKEND_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # the module the Trainer's callback imports


def backend_problems(key: Key, backend: str) -> list[str]:
    """A log backend whose package is not installed fails only once the Trainer starts (after the model loads):
    refuse it in the config check instead, naming the extra that brings it."""
    module = BACKEND_MODULES.get(backend)
    if module is None or importlib.util.find_spec(module) is not None:
        return []
    return [f"{key('log_backend')} is {backend}, but the {module} package is not installed: "
            f'pip install -e ".[logging]" (or set log_backend: none)']


@dataclass
class TrainConfig:
    """The schedule both training stages share; the defaults are the design's SFT values."""
    epochs: float = 1.5
    lr: float = 2e-4
    warmup_ratio: float = 0.03
    scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    max_grad_norm: float = 1.0
    seed: int = 42
    max_steps: int | None = None         # stop after this many optimizer steps (smoke runs, tests); null = epochs
    logging_steps: int = 10
    eval_steps: int = 200                # eval_loss on the eval split every N steps (and at the end)
    save_steps: int = 200                # a checkpoint every N steps (what `resume` continues from)
    save_total_limit: int = 2
    resume: str | None = None            # auto (the last checkpoint in output_dir) | a checkpoint folder | null
    early_stopping_patience: int | None = None  # stop after N evals without a lower eval_loss; null = off

    def check(self, key: Key) -> list[str]:
        problems = share(key, "warmup_ratio", self.warmup_ratio)
        if self.lr <= 0 or self.epochs <= 0:
            problems.append(f"{key('lr')} and {key('epochs')} must be positive")
        problems += at_least(key, self, ("logging_steps", "eval_steps", "save_steps", "save_total_limit"))
        return problems + at_least(key, self, ("max_steps", "early_stopping_patience"), nullable=True)


@dataclass(kw_only=True)
class TrainingStageConfig:
    """The keys sft and align share: the base, the pool, where the adapter goes, 4-bit settings, the schedule, an
    extra logger and the registered model."""
    model: str = "qwen2.5-7b-instruct"
    data: DataRef = field(default_factory=DataRef)
    output_dir: str = "outputs/train/default"
    qlora: QloraConfig = field(default_factory=QloraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log_backend: LogBackend = "none"
    register: RegisterConfig = field(default_factory=RegisterConfig)

    def check(self, key: Key) -> list[str]:
        return backend_problems(key, self.log_backend)
