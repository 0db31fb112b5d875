"""Model and tokenizer loading: the one place that knows transformers / TRL / PEFT versions.

For now it builds the tiny offline models that tests, smoke configs and the demo use in place of the hub models:
a random Qwen2 or Qwen3 of a few layers (its shape from ``configs/models/tiny-*/config.json``), a byte-level BPE
trained in-process on mixed zh/en text with Qwen's pre-tokenisation rule, and the family's real chat template taken
from TRL's package (Qwen2.5's byte-identical, so TRL's assistant-only training template applies exactly as in
production). Builds are deterministic for a seed and cached under ``.cache/tiny-models/``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from pipeline.config import ROOT, HardwareProfile, LoraConfig, ModelDef, QloraConfig

log = logging.getLogger(__name__)

TINY_CACHE = ROOT / ".cache" / "tiny-models"
CORPUS = Path(__file__).parent / "assets" / "tiny_corpus.txt"
BUILDER_VERSION = "1"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in the tiny config.json files
# Qwen2/Qwen3's split rule ahead of the byte-level mapping: Han runs stay together, digits split one by one.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def chat_template(name: str) -> str:
    """The family's real chat template, as TRL ships it (``trl/chat_templates/<name>.jinja``), read without
    importing TRL."""
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("trl is not installed: run `make setup`")
    path = Path(spec.submodule_search_locations[0]) / "chat_templates" / f"{name}.jinja"
    return path.read_text(encoding="utf-8")


def _tiny_key(model: ModelDef) -> str:
    versions = [metadata.version(pkg) for pkg in ("torch", "transformers", "tokenizers")]
    parts = [BUILDER_VERSION, model.architecture_path.read_text(encoding="utf-8"), json.dumps(model.tiny.__dict__),
             CORPUS.read_text(encoding="utf-8"), chat_template(model.chat_template), *versions]
    return hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()[:12]


def tiny_cache_path(model: ModelDef, cache: Path | None = None) -> Path:
    """Where a tiny model is cached. The path changes whenever anything that shapes the model does."""
    if model.tiny is None:
        raise ValueError(f"{model.name} is a hub model ({model.hub_id}), not a tiny offline model")
    cache = Path(cache or os.environ.get("ZH_ALIGN_TINY_CACHE") or TINY_CACHE)
    return cache / f"{model.name}-{_tiny_key(model)}"


def tiny_model_dir(model: ModelDef, cache: Path | None = None) -> Path:
    """The tiny model's folder, built on first use."""
    out = tiny_cache_path(model, cache)
    if not (out / "model.safetensors").is_file():
        build_tiny(model, out)
    return out


def build_tiny(model: ModelDef, out: Path) -> Path:
    """Build a tiny model + tokenizer into ``out`` (atomically: a temporary folder renamed into place)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        tokenizer = train_tokenizer(model)
        tokenizer.save_pretrained(tmp)
        _set_tokenizer_class(tmp / "tokenizer_config.json", "Qwen2Tokenizer")  # as on the hub, for both families
        arch = model.architecture_config()
        config = AutoConfig.for_model(arch.pop("model_type"), **arch)
        if len(tokenizer) > config.vocab_size:
            raise ValueError(f"{model.source_file}: the tokenizer has {len(tokenizer)} tokens but vocab_size is "
                             f"{config.vocab_size}; lower tiny.tokenizer_vocab or raise vocab_size")
        torch.manual_seed(model.tiny.seed)
        net = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        net.generation_config = GenerationConfig(
            bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id], pad_token_id=tokenizer.pad_token_id)
        net.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built tiny model %s in %s", model.name, out)
    return out


def _set_tokenizer_class(path: Path, name: str) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data["tokenizer_class"] = name
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def train_tokenizer(model: ModelDef):
    """A byte-level BPE trained on the shipped zh/en corpus, wrapped as a fast tokenizer with Qwen's specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=model.tiny.tokenizer_vocab + len(SPECIAL_TOKENS), special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    lines = CORPUS.read_text(encoding="utf-8").splitlines(keepends=True)
    tok.train_from_iterator(lines, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None,
        chat_template=chat_template(model.chat_template), model_max_length=model.max_positions,
        clean_up_tokenization_spaces=False, split_special_tokens=False, padding_side="right")


def base_model_path(model: ModelDef) -> tuple[str, str | None]:
    """What ``from_pretrained`` takes for a model definition: (hub id, revision), or (local tiny folder, None)."""
    if model.tiny is not None:
        return str(tiny_model_dir(model)), None
    return model.hub_id, model.revision


def load_tokenizer(model: ModelDef):
    from transformers import AutoTokenizer

    path, revision = base_model_path(model)
    return AutoTokenizer.from_pretrained(path, revision=revision)


# ----------------------------------------------------------------------------------------------------------------
# Training: the base (bf16/fp32, or 4-bit for QLoRA) with a LoRA adapter on top
# ----------------------------------------------------------------------------------------------------------------
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def check_device(hw: HardwareProfile) -> None:
    """Refuse, before anything is loaded, what this machine cannot do (bitsandbytes does not refuse QLoRA on CPU)."""
    import torch

    from pipeline.cli import StageError

    cuda = torch.cuda.is_available()
    if hw.qlora and not cuda:
        raise StageError(f"profile {hw.name} turns QLoRA on, which needs a CUDA GPU, and this machine has none; "
                         f"use a GPU or SET=\"hw.qlora=false\"")
    if hw.device == "cuda" and not cuda:
        raise StageError(f"profile {hw.name} needs a CUDA GPU and this machine has none; use HW=cpu here")
    if hw.precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise StageError(f"profile {hw.name} trains in bf16, which {torch.cuda.get_device_name()} does not support; "
                         f"SET=\"hw.precision=fp16\" (or fp32)")


def load_for_training(model: ModelDef, hw: HardwareProfile, lora: LoraConfig | None, qlora: QloraConfig,
                      adapter: str | None = None):
    """(PEFT model with a trainable LoRA, tokenizer). QLoRA loads the base in 4 bit (NF4, double quant, bf16
    compute) and leaves the other weights in the compute dtype — PEFT's prepare_model_for_kbit_training would upcast
    them to fp32, measured at half the speed and +60 % memory. ``adapter`` continues from a saved adapter."""
    import torch
    from peft import LoraConfig as PeftLora
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    path, revision = base_model_path(model)
    dtype = getattr(torch, DTYPES[hw.precision])
    kwargs: dict = {"dtype": dtype, "revision": revision}
    if hw.qlora:
        from transformers import BitsAndBytesConfig

        compute = getattr(torch, DTYPES[qlora.compute_dtype])
        kwargs.update(dtype=compute, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=qlora.quant_type, bnb_4bit_use_double_quant=qlora.double_quant,
            bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=compute))
    base = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if hw.activation_checkpointing:
        base.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need an input with grad
    if adapter:
        peft_model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
        for config in peft_model.peft_config.values():  # a registered adapter names its base portably: point it here
            config.base_model_name_or_path = path
    else:
        peft_model = get_peft_model(base, PeftLora(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                   target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
    return peft_model, load_tokenizer(model)
