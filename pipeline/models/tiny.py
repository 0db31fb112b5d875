"""The tiny offline models that tests, smoke configs and the demo use in place of the hub models.

A random Qwen2 or Qwen3 of a few layers (its shape from ``configs/models/tiny-*/config.json``), a byte-level BPE
trained in-process on mixed zh/en text with Qwen's pre-tokenisation rule (or, with ``tiny.tokenizer: qwen2.5``,
Qwen2.5's real tokenizer from :mod:`.qwen_tokenizer` over the real padded vocabulary), and the family's real chat
template taken from TRL's package (Qwen2.5's byte-identical, so TRL's assistant-only training template applies
exactly as in production). Builds are deterministic for a seed and cached under ``.cache/tiny-models/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from pipeline.core.paths import ASSETS
from pipeline.core.profiles import ModelDef
from pipeline.models.qwen_tokenizer import QWEN_SPLIT, TINY_CACHE, chat_template, load_qwen25_tokenizer, qwen25_key

__all__ = ["QWEN_SPLIT", "TINY_CACHE", "chat_template", "tiny_model_dir", "build_tiny", "train_tokenizer"]

log = logging.getLogger(__name__)

CORPUS = ASSETS / "tiny_corpus.txt"
BUILDER_VERSION = "1"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in the tiny config.json files
def _tiny_key(model: ModelDef) -> str:
    versions = [metadata.version(pkg) for pkg in ("torch", "transformers", "tokenizers")]
    own = qwen25_key() if model.tiny.tokenizer == "qwen2.5" else CORPUS.read_text(encoding="utf-8")
    parts = [BUILDER_VERSION, model.architecture_path.read_text(encoding="utf-8"), json.dumps(model.tiny.__dict__),
             own, chat_template(model.chat_template), *versions]
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
        real = model.tiny.tokenizer == "qwen2.5"  # Qwen2.5's own tokenizer, built offline (qwen_tokenizer.py)
        tokenizer = load_qwen25_tokenizer() if real else train_tokenizer(model)
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
        if out.exists() and not (out / "model.safetensors").is_file():
            shutil.rmtree(out)  # an incomplete folder
        try:
            tmp.rename(out)
        except OSError:  # another process built the same model meanwhile (same key, same bytes): keep its copy
            if not (out / "model.safetensors").is_file():
                raise
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
