"""Loading a model definition's base: where ``from_pretrained`` finds it, its tokenizer, and for training the base
(bf16 / fp32, or 4-bit for QLoRA) with a LoRA adapter on top — the one place that knows the PEFT and bitsandbytes
calls. The LoRA and QLoRA settings every training config carries are defined here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.core.errors import ConfigError, StageError
from pipeline.core.paths import repo_path
from pipeline.core.profiles import HardwareProfile, ModelDef, available, load_model
from pipeline.core.runtime import launched, local_rank
from pipeline.core.strict import Key, load_yaml
from pipeline.models.tiny import tiny_model_dir

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
ADAPTER_WEIGHTS = "adapter_model.safetensors"
log = logging.getLogger(__name__)


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj"])

    def check(self, key: Key) -> list[str]:
        problems = []
        if self.r < 1 or self.alpha < 1:
            problems.append(f"{key('r')} and {key('alpha')} must be at least 1; got {self.r}, {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"{key('dropout')} must be in [0, 1); got {self.dropout}")
        return problems


@dataclass
class QloraConfig:
    """How the base is quantised when the hardware profile turns ``qlora`` on."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bf16", "fp16"] = "bf16"


def base_model_path(model: ModelDef) -> tuple[str, str | None]:
    """What ``from_pretrained`` takes for a model definition: (hub id, revision), or (local tiny folder, None)."""
    if model.tiny is not None:
        return str(tiny_model_dir(model)), None
    return model.hub_id, model.revision


def safe_load_kwargs(model: ModelDef) -> dict:
    """What every ``from_pretrained`` of a model definition's base passes: weights from safetensors only (a pickled
    ``pytorch_model.bin`` can run code when loaded), and the repository's own code only where the definition turns
    ``trust_remote_code`` on — with a warning each time."""
    if model.trust_remote_code:
        log.warning("model definition %s turns trust_remote_code on: loading runs Python code from %s; keep its "
                    "revision pinned to a commit you have read", model.name, model.hub_id or model.name)
    return {"use_safetensors": True, "trust_remote_code": model.trust_remote_code}


def require_safetensors(adapter: str | Path) -> None:
    """Refuse a local adapter folder whose weights are not ``adapter_model.safetensors`` (PEFT would fall back to a
    pickled ``adapter_model.bin``)."""
    folder = Path(adapter)
    if folder.is_dir() and not (folder / ADAPTER_WEIGHTS).is_file():
        found = ", ".join(sorted(p.name for p in folder.glob("adapter_model*"))) or "no adapter weights"
        raise StageError(f"{folder} has {found} but no {ADAPTER_WEIGHTS}: adapters load from safetensors only (a "
                         f"pickled .bin can run code when loaded); save it again with safe_serialization=True")


def load_tokenizer(model: ModelDef):
    from transformers import AutoTokenizer

    path, revision = base_model_path(model)
    return AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=model.trust_remote_code)


def same_base(recorded: str, model: ModelDef) -> bool:
    """Whether an adapter's recorded base is ``model``: the hub id, the model name, or a tiny model's cache folder."""
    name = Path(recorded).name
    return recorded in (model.hub_id, model.name) or name == model.name or name.startswith(f"{model.name}-")


def base_of(recorded: str, given: ModelDef, overrides: list[tuple[str, object]]) -> ModelDef | None:
    """The model definition to load an adapter on: ``given`` (the profile's, or the one `SET="model=…"` names) when it
    is the adapter's recorded base; else, when no model was named, the definition the recorded base is (its hub id,
    name or tiny cache folder); else None (a mismatch the caller refuses)."""
    if not recorded or same_base(recorded, given):
        return given
    if any(key.rpartition(".")[2] == "model" for key, _ in overrides):
        return None
    own = [m for m in map(load_model, available("models")) if same_base(recorded, m)]
    return max(own, key=lambda m: len(m.name)) if own else None


# ----------------------------------------------------------------------------------------------------------------
# Training: the base (bf16/fp32, or 4-bit for QLoRA) with a LoRA adapter on top
# ----------------------------------------------------------------------------------------------------------------


def check_device(hw: HardwareProfile) -> None:
    """Refuse, before anything is loaded, what this machine cannot do (bitsandbytes does not refuse QLoRA on CPU)."""
    import torch

    cuda = torch.cuda.is_available()
    if hw.qlora and not cuda:
        raise StageError(f"profile {hw.name} turns QLoRA on, which needs a CUDA GPU, and this machine has none; "
                         f"use a GPU or SET=\"hw.qlora=false\"")
    if hw.device == "cuda" and not cuda:
        if _profile_file_device(hw) != "cuda":  # the profile says cpu: `hw.device=cuda` came from the overrides
            raise StageError(f"`hw.device=cuda` (from SET / --set) asks profile {hw.name} for a CUDA GPU and this "
                             f"machine has none; drop that override")
        raise StageError(f"profile {hw.name} needs a CUDA GPU and this machine has none; use HW=cpu here")
    if hw.precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise StageError(f"profile {hw.name} trains in bf16, which {torch.cuda.get_device_name()} does not support; "
                         f"SET=\"hw.precision=fp16\" (or fp32)")


def _profile_file_device(hw: HardwareProfile) -> str | None:
    try:
        return load_yaml(repo_path(hw.source_file)).get("device") if hw.source_file else None
    except ConfigError:
        return None


def load_for_training(model: ModelDef, hw: HardwareProfile, lora: LoraConfig | None, qlora: QloraConfig,
                      adapter: str | None = None):
    """(PEFT model with a trainable LoRA, tokenizer). QLoRA loads the base in 4 bit (NF4, double quant, bf16
    compute) and leaves the other weights in the compute dtype — PEFT's prepare_model_for_kbit_training would upcast
    them to fp32, measured at half the speed and +60 % memory. ``adapter`` continues from a saved adapter."""
    from transformers import AutoModelForCausalLM

    path, revision = base_model_path(model)
    base = AutoModelForCausalLM.from_pretrained(path, revision=revision, **load_kwargs(hw, qlora),
                                                **safe_load_kwargs(model))
    return with_lora(base, hw, lora, adapter, base_path=path), load_tokenizer(model)


def load_kwargs(hw: HardwareProfile, qlora: QloraConfig) -> dict:
    """``from_pretrained``'s dtype and, for QLoRA, the 4-bit quantisation of the profile."""
    import torch

    if not hw.qlora:
        return {"dtype": getattr(torch, DTYPES[hw.precision])}
    from transformers import BitsAndBytesConfig

    compute = getattr(torch, DTYPES[qlora.compute_dtype])
    # The 4-bit weights packed in the compute dtype (not uint8): FSDP (ACCEL=fsdp) shards them then like the bf16
    # weights around them, and the model loads in that same dtype (the PEFT FSDP-QLoRA recipe); one GPU is unaffected.
    kw = {"dtype": compute, "quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=qlora.quant_type, bnb_4bit_use_double_quant=qlora.double_quant,
        bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=compute)}
    if launched():  # several processes: each one's 4-bit base on its own GPU (the Trainer sets the device later)
        kw["device_map"] = {"": local_rank()}
    return kw


def with_lora(base, hw: HardwareProfile, lora: LoraConfig | None, adapter: str | None = None,
              base_path: str | None = None):
    """The base with a trainable LoRA: a new one from ``lora``, or the saved ``adapter`` continued."""
    from peft import LoraConfig as PeftLora
    from peft import PeftModel, get_peft_model

    if hw.activation_checkpointing:
        base.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need an input with grad
    if adapter:
        require_safetensors(adapter)
        peft_model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
        for config in peft_model.peft_config.values():  # a registered adapter names its base portably: point it here
            config.base_model_name_or_path = base_path
        return peft_model
    return get_peft_model(base, PeftLora(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                         target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))


# ----------------------------------------------------------------------------------------------------------------
# Generation: a merged folder on its own, or an adapter on the model definition's base
# ----------------------------------------------------------------------------------------------------------------


def load_for_generation(folder: str | Path, adapter: bool, model: ModelDef):
    """(model in eval mode, tokenizer) for generation: a merged (or any full) model ``folder`` as it is, or an adapter
    ``folder`` on ``model``'s base. bf16 on a GPU that has it, else fp32; the adapter's tokenizer (its chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    path, revision = base_model_path(model) if adapter else (str(folder), None)
    net = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=dtype,
                                               device_map="cuda" if cuda else "cpu", **safe_load_kwargs(model))
    if adapter:
        from peft import PeftModel

        net = PeftModel.from_pretrained(net, str(folder))
    return net.eval(), AutoTokenizer.from_pretrained(folder)
