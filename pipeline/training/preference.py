"""The two preference losses of the align stage, and the design's length penalty inside both.

Length penalty (R-DPO, Park et al. 2024, "Disentangling Length from Quality in Direct Preference Optimization"): the
preference sigmoid sees the margin *minus* ``α · (|y_w| − |y_l|)``, with |y| the completion's length in tokens, so a
chosen answer that wins only by being longer earns less:

- DPO:  loss = −log σ( β·[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))] − α·(|y_w| − |y_l|) )
- ORPO: loss = NLL(y_w) − λ·log σ( log odds(y_w) − log odds(y_l) − α·(|y_w| − |y_l|) ),
  odds(y) = P(y) / (1 − P(y)) with P the length-normalised sequence probability, λ = ``beta``.

α = 0 gives TRL's own losses exactly. For DPO the term enters through the reference log-probabilities, which are
computed once before training (``precompute_ref_log_probs``): shifting log π_ref(y) by α/β·|y| subtracts exactly
α·(|y_w| − |y_l|) from β times the margin, and TRL's loss code runs unchanged. TRL's logged rewards then include the
term; ``length_penalty`` is logged on its own.

Chunked ORPO loss: TRL's ``concatenated_forward`` keeps the logits of chosen + rejected, [2B, T, V] with V = 152 064 for
Qwen2.5-7B; at micro-batch 2 × 2048 tokens × 2 sequences the bf16 logits, their fp32 copy and its gradient come to ≈
11.6 GiB, more than ORPO can spend on a 24 GiB card. Ours calls the model as the Trainer passes it (DDP, PEFT and
accelerate's autocast wrappers all run) with ``logits_to_keep=1``, takes the decoder's output (after the final norm)
from a forward hook, and projects it onto the vocabulary ``CHUNK_TOKENS`` (1024) tokens at a time, each chunk under a
non-reentrant ``torch.utils.checkpoint`` that keeps only the label log-probabilities and recomputes the chunk's logits
in backward: the extra peak is O(1024 × V), ≈ 1.5 GiB (bf16 logits, fp32 copy, its exp) and ≈ 2.5 GiB while the chunk's
gradient is taken, instead of O(2B·T·V), for one more lm_head forward (≈ 2 % of a 7B step). It returns what TRL's
returns — average label log-probabilities, the chosen NLL over prompt + response, and for ``logits/chosen`` /
``logits/rejected`` the mean logit as a 0-d tensor (all TRL does with the logits is ``.detach().mean()``). MoE aux loss,
encoder-decoders and FSDP (whose lm_head weight is only whole inside the root forward) take TRL's path.
"""

from __future__ import annotations

from typing import Any

CHUNK_TOKENS = 1024  # positions per lm_head chunk of the ORPO loss; its logits cost ≈ CHUNK_TOKENS × V × 10 bytes


def logit_chunk(loss: str) -> int:
    """Tokens the loss projects onto the vocabulary at a time, for the planner (0: TRL's own loss, counted apart)."""
    return CHUNK_TOKENS if loss == "orpo" else 0


def length_term(alpha: float, chosen_len: Any, rejected_len: Any) -> Any:
    """α·(|y_w| − |y_l|): what the preference margin loses (tensors or numbers)."""
    return alpha * (chosen_len - rejected_len)


def rdpo_loss(beta: float, alpha: float, policy_w: Any, policy_l: Any, ref_w: Any, ref_l: Any, len_w: Any,
              len_l: Any) -> Any:
    """The R-DPO per-pair loss, written out (the reference for the unit test and the docs)."""
    import torch.nn.functional as F

    margin = beta * ((policy_w - ref_w) - (policy_l - ref_l)) - length_term(alpha, len_w, len_l)
    return -F.logsigmoid(margin)


def orpo_ratio(log_odds: Any, alpha: float, len_w: Any, len_l: Any) -> Any:
    """ORPO's log σ(log-odds ratio − α·(|y_w| − |y_l|)), the term λ weighs."""
    import torch.nn.functional as F

    return F.logsigmoid(log_odds - length_term(alpha, len_w, len_l))


def trainer_classes(loss: str, alpha: float) -> tuple[type, type]:
    """(config class, trainer class) for `loss`: the one place that picks and adapts a TRL preference trainer."""
    return {"dpo": _dpo, "orpo": _orpo}[loss](alpha)


def _dpo(alpha: float) -> tuple[type, type]:
    from trl import DPOConfig, DPOTrainer

    class LengthPenalisedDPO(DPOTrainer):
        def _compute_loss(self, model, inputs, return_outputs):
            if alpha and "ref_chosen_logps" in inputs:
                lens = inputs["completion_mask"].sum(dim=1).to(inputs["ref_chosen_logps"].dtype)
                len_w, len_l = lens.chunk(2, dim=0)
                inputs = {**inputs, "ref_chosen_logps": inputs["ref_chosen_logps"] + alpha / self.beta * len_w,
                          "ref_rejected_logps": inputs["ref_rejected_logps"] + alpha / self.beta * len_l}
                mode = "train" if self.model.training else "eval"
                term = self.accelerator.gather_for_metrics(length_term(alpha, len_w, len_l)).mean().item()
                self._metrics[mode]["length_penalty"].append(term)
            return super()._compute_loss(model, inputs, return_outputs)

    return DPOConfig, LengthPenalisedDPO


def _orpo(alpha: float) -> tuple[type, type]:
    import torch
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    from trl.experimental.orpo.orpo_trainer import log1mexp

    class LengthPenalisedORPO(ORPOTrainer):
        def concatenated_forward(self, model, batch):
            self._lengths = [(batch[f"{k}_labels"] != -100).sum(dim=1).float() for k in ("chosen", "rejected")]
            if model.training:  # its batches have no `input_ids`, so the Trainer counts no tokens: count them here
                seen = sum(batch[f"{k}_attention_mask"].sum() for k in ("chosen", "rejected")).reshape(1)
                self.state.num_input_tokens_seen += int(self.accelerator.gather(seen).sum())
            if self.aux_loss_enabled or self.is_encoder_decoder or self.is_fsdp_enabled:
                return super().concatenated_forward(model, batch)
            cat = self.concatenated_inputs(batch, padding_value=self.padding_value, device=self.accelerator.device)
            inner = self.accelerator.unwrap_model(model)
            hidden = final_hidden(model, inner.get_decoder(), cat)
            return chunked_orpo_outputs(inner.get_output_embeddings(), hidden, cat, len(batch["chosen_labels"]))

        def odds_ratio_loss(self, policy_chosen_logps, policy_rejected_logps):
            if not alpha:
                return super().odds_ratio_loss(policy_chosen_logps, policy_rejected_logps)
            w, lo = policy_chosen_logps.float(), policy_rejected_logps.float()
            log_odds = (w - lo) - (log1mexp(w) - log1mexp(lo))
            len_w, len_l = (x.to(log_odds.device) for x in self._lengths)
            ratio = orpo_ratio(log_odds, alpha, len_w, len_l)
            term = length_term(alpha, len_w, len_l).mean().item()
            self.store_metrics({"length_penalty": term}, train_eval="train" if self.model.training else "eval")
            device = self.accelerator.device
            return (self.beta * ratio, self.beta * w.to(device).detach(), self.beta * lo.to(device).detach(),
                    torch.mean(ratio), torch.mean(log_odds))

    return ORPOConfig, LengthPenalisedORPO


def final_hidden(model: Any, decoder: Any, cat: dict[str, Any]) -> Any:
    """The decoder's last hidden state (after its final norm) for the concatenated batch, [2B, T, H]. ``model`` is
    called as the Trainer passes it, so DDP's reducer, PEFT and accelerate's autocast run; it projects one position
    (``logits_to_keep=1``), and a hook on ``decoder`` (a module inside it) catches the hidden states in the model's
    dtype, before accelerate upcasts the outputs."""
    caught = []
    handle = decoder.register_forward_hook(lambda module, args, out: caught.append(out[0]))
    try:
        model(cat["concatenated_input_ids"], attention_mask=cat["concatenated_attention_mask"], use_cache=False,
              logits_to_keep=1)
    finally:
        handle.remove()
    return caught[0]


def chunked_orpo_outputs(head: Any, hidden: Any, cat: dict[str, Any], n: int) -> tuple[Any, ...]:
    """TRL's ``concatenated_forward`` tuple from the hidden states, ``CHUNK_TOKENS`` positions through ``head`` at a
    time: (chosen logps, rejected logps, chosen mean logit, rejected mean logit, chosen NLL); ``n`` = chosen rows."""
    import torch
    from torch.utils.checkpoint import checkpoint

    ids, mask, labels = (cat[f"concatenated_{k}"].to(hidden.device) for k in ("input_ids", "attention_mask", "labels"))
    labels = labels[:, 1:]  # position t predicts token t + 1
    nll = torch.where(mask[:, 1:] == 1, ids[:, 1:], -100)
    flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = torch.stack([labels, nll], dim=-1).reshape(-1, 2)
    parts = [checkpoint(_chunk_logps, head, flat[i:i + CHUNK_TOKENS], targets[i:i + CHUNK_TOKENS], use_reentrant=False)
             for i in range(0, len(flat), CHUNK_TOKENS)]
    picked = torch.cat([p for p, _ in parts]).view(*labels.shape, 2)
    mean_logit = torch.cat([m for _, m in parts]).view(labels.shape)  # each position's mean over the vocabulary
    logps = picked[..., 0].sum(-1) / (labels != -100).sum(-1)
    nll_loss = -picked[:n, :, 1].sum() / (nll[:n] != -100).sum()
    return logps[:n], logps[n:], mean_logit[:n].mean(), mean_logit[n:].mean(), nll_loss


def _chunk_logps(head: Any, hidden: Any, targets: Any) -> tuple[Any, Any]:
    """One chunk: log p(target) in fp32 for each column of ``targets`` [c, k] (-100 gives 0) and each row's mean logit
    (detached: it only feeds the logits metrics)."""
    import torch

    logits = head(hidden).float()
    picked = logits.gather(-1, targets.clamp(min=0)) - torch.logsumexp(logits, dim=-1, keepdim=True)
    return picked.masked_fill(targets == -100, 0.0), logits.mean(-1).detach()
