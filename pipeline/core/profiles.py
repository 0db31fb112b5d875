"""Model definitions (``configs/models/``), hardware profiles (``configs/hw/``) and hub settings (``configs/hub.yaml``).

Each goes through the strict loader; a profile names the folder of stage configs it runs with (``config_dir``: the
cpu profile picks the offline twins in ``configs/smoke/``).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.core.errors import ConfigError
from pipeline.core.paths import CONFIGS, ROOT, repo_path, shown
from pipeline.core.secrets import redact_urls
from pipeline.core.strict import Key, apply_override, at_least, build, close, load_yaml

DEFAULT_HW = "4090"
Precision = Literal["bf16", "fp16", "fp32"]


@dataclass
class TinySpec:
    """Build the model offline from its ``architecture`` file with random weights and an in-process tokenizer
    (``trained``: a BPE of ``tokenizer_vocab`` trained on the shipped corpus; ``qwen2.5``: Qwen2.5's real one)."""
    seed: int = 0
    tokenizer_vocab: int = 1024
    tokenizer: Literal["trained", "qwen2.5"] = "trained"


@dataclass
class ModelDef:
    name: str
    family: Literal["qwen2", "qwen3"]
    licence: str
    architecture: str
    chat_template: Literal["qwen2_5", "qwen3_instruct_2507"]
    system_prompt: str
    hub_id: str | None = None
    revision: str | None = None
    tiny: TinySpec | None = None
    # run the model repository's own Python code when loading (a model transformers does not know); off unless the
    # definition turns it on, which every load logs as a warning
    trust_remote_code: bool = False
    source_file: str = ""

    def check(self, key: Key) -> list[str]:
        problems = []
        if self.hub_id and not self.revision:
            problems.append(f"{key('revision')} is required with `hub_id` (pin a commit sha)")
        if bool(self.hub_id) == bool(self.tiny):
            problems.append("set exactly one of `hub_id` (a real model) or `tiny` (built offline)")
        if not self.architecture_path.is_file():
            problems.append(f"{key('architecture')} file {self.architecture} not found in configs/models/")
        return problems

    @property
    def architecture_path(self) -> Path:
        return CONFIGS / "models" / self.architecture

    def architecture_config(self) -> dict[str, Any]:
        return json.loads(self.architecture_path.read_text(encoding="utf-8"))

    @functools.cached_property
    def max_positions(self) -> int:
        return int(self.architecture_config()["max_position_embeddings"])

    @property
    def ref(self) -> str:
        """What the plan and the tags show: hub id @ revision, or the tiny model's name."""
        return f"{self.hub_id}@{self.revision}" if self.hub_id else f"{self.name} (built offline, seed {self.tiny.seed})"


@dataclass
class HardwareProfile:
    name: str
    description: str
    device: Literal["cuda", "cpu"]
    memory_gib: float
    precision: Precision
    micro_batch: int
    grad_accum: int
    max_length: int
    qlora: bool
    activation_checkpointing: bool
    liger: bool
    # with checkpointing: the first N decoder layers recompute (null: all; a model with fewer layers recomputes all),
    # or `auto`: the fewest that let the stage's step fit the card with the planner's margin, per stage and model
    checkpoint_layers: int | Literal["auto"] | None = None
    peak_tflops: float | None = None
    config_dir: str = "configs"          # the stage configs this profile runs with (cpu: the offline twins)
    source_file: str = ""

    def check(self, key: Key) -> list[str]:
        problems = at_least(key, self, ("micro_batch", "grad_accum", "max_length"))
        if self.device == "cpu":
            problems += [f"{key(k)} needs CUDA but `device` is cpu; set `{k}: false`" for k in ("qlora", "liger")
                         if getattr(self, k)]
        if self.checkpoint_layers is not None and (not self.activation_checkpointing or self.checkpoint_layers != "auto"
                                                   and self.checkpoint_layers < 1):
            problems.append(f"{key('checkpoint_layers')} is {self.checkpoint_layers!r}: it counts the decoder layers that "
                            f"recompute under `activation_checkpointing: true` (at least 1, or auto); set it to null "
                            f"for all layers, or turn checkpointing on")
        if not repo_path(self.config_dir).is_dir():
            problems.append(f"{key('config_dir')} {self.config_dir!r} is not a folder of stage configs")
        return problems

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.grad_accum


@dataclass
class HubConfig:
    """Hugging Face hub mirror and cache: the one place every stage reads (the design's setup_env.sh)."""
    endpoint: str | None = None
    home: str = ".cache/huggingface"


def available(kind: str) -> list[str]:
    """Names of the model definitions (`models`) or hardware profiles (`hw`)."""
    return sorted(p.stem for p in (CONFIGS / kind).glob("*.yaml"))


def load_profile(name: str, overrides: list[tuple[str, Any]] = ()) -> HardwareProfile:
    path = CONFIGS / "hw" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError([f"unknown hardware profile {name!r}; valid profiles: {', '.join(available('hw'))}"
                           f" (files in {path.parent.relative_to(ROOT)}/)" + close(name, available("hw"))])
    raw = load_yaml(path)
    for key, value in overrides:
        apply_override(raw, key, value)
    prof = build(HardwareProfile, raw, shown(path), {k for k, _ in overrides})
    prof.source_file = shown(path)
    return prof


def load_model(name: str) -> ModelDef:
    path = CONFIGS / "models" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError([f"unknown model definition {name!r}; valid models: {', '.join(available('models'))}"
                           + close(name, available("models"))])
    model = build(ModelDef, load_yaml(path), shown(path))
    model.source_file = shown(path)
    return model


def load_hub() -> HubConfig:
    path = CONFIGS / "hub.yaml"
    return build(HubConfig, load_yaml(path), shown(path))


def apply_hub_env(hub: HubConfig) -> dict[str, str]:
    """Export HF_ENDPOINT / HF_HOME from configs/hub.yaml unless the user's environment already sets them.

    Returns what is in force, each with where it came from (a URL's password redacted); the plan shows it and the runs
    log it.
    """
    shown_env = {}
    for var, value in (("HF_ENDPOINT", hub.endpoint), ("HF_HOME", hub.home)):
        if os.environ.get(var):
            shown_env[var] = f"{redact_urls(os.environ[var])} (from the environment)"
        elif value:
            os.environ[var] = str(repo_path(value)) if var == "HF_HOME" else value
            shown_env[var] = f"{redact_urls(os.environ[var])} (from configs/hub.yaml)"
        else:
            shown_env[var] = "(library default)"
    return shown_env
