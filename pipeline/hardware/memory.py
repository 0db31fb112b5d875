"""Peak memory of a LoRA / QLoRA training step, from the architecture's numbers alone.

The parts, for one micro-step of ``tokens`` tokens (micro-batch × sequence length × sequences per row):

- **weights**: every parameter in the precision of the profile (2 bytes in bf16); QLoRA stores the decoder's linear
  layers in NF4 with double quantisation (0.516 bytes a parameter) and keeps the embedding and the head in bf16.
- **adapter**: the LoRA parameters in fp32 (PEFT keeps adapters in fp32 on a bf16 base), their gradients and AdamW's
  two moments: 16 bytes a parameter.
- **activations**, per token and decoder layer, in the activation precision: the inputs of the attention and MLP
  blocks and their norms (8·h), q / k / v and the attention output, the MLP's gate and up projections (2·ffn; 4·ffn
  without Liger's fused SwiGLU, which recomputes the product), and the dropped-out copy of each LoRA target's input
  (LoRA dropout). Without activation checkpointing every layer keeps them, plus one layer's gradients in flight;
  with it, each layer keeps its input (h) and one layer is recomputed with its gradients (2 layers' worth); with
  ``checkpoint_layers`` k of L, the k checkpointed layers keep their inputs and the other L − k keep everything.
- **logits**: a loss that materialises the logits of the whole vocabulary costs 10 bytes a token and vocabulary entry
  (bf16 logits, their fp32 upcast, the fp32 gradient); our chunked ORPO loss pays that for one chunk of tokens
  (``logit_chunk``); TRL's own SFT / DPO losses and Liger's fused cross-entropy work on smaller pieces still
  (counted as nothing here).

Fitted to nothing: the per-element counts come from the modules' shapes. Checked against every configuration measured
in ``../shared/ANCHORS.md`` (H200, Qwen2.5-7B shape) in tests/test_planner.py, all within ±10 % of the measured peak
allocated memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GiB = 2 ** 30
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit weights + an fp8 absmax per 64 + an fp32 second-level absmax per 256
ADAPTER_BYTES = 4 + 4 + 8                 # fp32 parameter, fp32 gradient, AdamW's two fp32 moments
LOGIT_BYTES = 2 + 4 + 4                   # bf16 logits, fp32 upcast, fp32 gradient
RESERVE_FACTOR, RESERVE_GIB = 1.02, 0.3   # what PyTorch's caching allocator holds beyond the peak allocated
PRECISION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class Shape:
    """What the estimates need of an architecture ``config.json``."""
    hidden: int
    layers: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def of(cls, arch: dict[str, Any]) -> Shape:
        heads = arch["num_attention_heads"]
        return cls(arch["hidden_size"], arch["num_hidden_layers"], arch["intermediate_size"], heads,
                   arch.get("num_key_value_heads") or heads, arch.get("head_dim") or arch["hidden_size"] // heads,
                   arch["vocab_size"], bool(arch.get("tie_word_embeddings")))

    def linear(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear module of one decoder layer."""
        h, q, kv, f = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.ffn
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, f),
                "up_proj": (h, f), "down_proj": (f, h)}

    @property
    def layer_linear_params(self) -> int:
        return sum(i * o for i, o in self.linear().values())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)  # the embedding, and an untied head

    @property
    def params(self) -> int:
        norms = self.layers * 2 * self.hidden + self.hidden
        return self.layers * self.layer_linear_params + self.embedding_params + norms

    @property
    def matmul_params(self) -> int:
        """The parameters a token's forward multiplies by: the decoder's linear layers and the head."""
        return self.layers * self.layer_linear_params + self.vocab * self.hidden

    def flops_per_token(self, seq_len: int) -> float:
        """ANCHORS.md's convention for LoRA training (PaLM): 4·N + 12·L·h·T."""
        return 4 * self.matmul_params + 12 * self.layers * self.hidden * seq_len

    def lora_params(self, r: int, targets: list[str]) -> int:
        return self.layers * sum(r * (i + o) for name, (i, o) in self.linear().items() if name in targets)


@dataclass(frozen=True)
class Step:
    """One micro-step of training: how many tokens, and what the profile and config turn on."""
    micro_batch: int
    seq_len: int
    sequences: int = 1                   # sequences per row: 1 for SFT, 2 for a preference pair (chosen + rejected)
    lora_r: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj")
    lora_dropout: bool = True
    precision: str = "bf16"
    qlora: bool = False
    checkpointing: bool = True
    checkpoint_layers: int | None = None  # with checkpointing: how many decoder layers recompute (None: all)
    liger: bool = False
    full_logits: bool = False            # the loss materialises the whole vocabulary's logits (a plain loop's loss)
    logit_chunk: int = 0                 # or projects this many tokens onto the vocabulary at a time (chunked ORPO)

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len * self.sequences

    def checkpointed(self, layers: int) -> int:
        if not self.checkpointing:
            return 0
        return layers if self.checkpoint_layers is None else min(self.checkpoint_layers, layers)


@dataclass
class Memory:
    parts: dict[str, float] = field(default_factory=dict)   # GiB by part
    per_token: float = 0.0                                  # GiB each more token costs
    fixed: float = 0.0                                      # GiB that does not grow with the tokens

    @property
    def peak(self) -> float:
        """Peak allocated GiB (what ``torch.cuda.max_memory_allocated`` reports)."""
        return sum(self.parts.values())

    @property
    def reserved(self) -> float:
        return self.peak * RESERVE_FACTOR + RESERVE_GIB


def weight_bytes(shape: Shape, precision: str, qlora: bool) -> float:
    if qlora:  # the decoder's linear layers in NF4; embedding, head and norms in the bf16 compute dtype
        return shape.layers * shape.layer_linear_params * NF4_BYTES + (shape.params - shape.layers *
                                                                        shape.layer_linear_params) * 2
    return shape.params * PRECISION_BYTES[precision]


def layer_activation_bytes(shape: Shape, step: Step) -> float:
    """Bytes one decoder layer keeps per token for its backward pass."""
    f = shape.linear()
    q, kv = f["q_proj"][1], f["k_proj"][1]
    # residual stream and norms (6·h), q and the attention output (2·q), k and v (2·kv), the MLP's intermediates
    kept = 6 * shape.hidden + 2 * q + 2 * kv + (2 if step.liger else 4) * shape.ffn
    if step.lora_dropout:
        kept += sum(i for name, (i, _) in f.items() if name in step.lora_targets)
    return kept * PRECISION_BYTES[step.precision if not step.qlora else "bf16"]


def training(shape: Shape, step: Step) -> Memory:
    """The peak of one training micro-step."""
    act = layer_activation_bytes(shape, step)
    width = PRECISION_BYTES[step.precision if not step.qlora else "bf16"]
    k = step.checkpointed(shape.layers)
    per_token = k * shape.hidden * width + (shape.layers - k) * act + (2 if k else 1) * act
    parts = {"weights": weight_bytes(shape, step.precision, step.qlora) / GiB,
             "adapter": shape.lora_params(step.lora_r, list(step.lora_targets)) * ADAPTER_BYTES / GiB,
             "activations": step.tokens * per_token / GiB}
    fixed = parts["weights"] + parts["adapter"]
    if step.full_logits:
        per_token += shape.vocab * LOGIT_BYTES
        parts["logits"] = step.tokens * shape.vocab * LOGIT_BYTES / GiB
    elif step.logit_chunk:
        parts["logits"] = min(step.logit_chunk, step.tokens) * shape.vocab * LOGIT_BYTES / GiB
        fixed += parts["logits"]
    return Memory(parts, per_token / GiB, fixed)


def inference(shape: Shape, precision: str, tokens: int) -> Memory:
    """A forward pass without gradients (evaluation): the weights, one layer's activations, the batch's logits."""
    width = PRECISION_BYTES[precision]
    per_token = 4 * (shape.hidden + shape.ffn) * width + shape.vocab * 4
    parts = {"weights": shape.params * width / GiB, "activations": tokens * per_token / GiB}
    return Memory(parts, per_token / GiB, parts["weights"])
