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
"""

from __future__ import annotations

from typing import Any


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
            return super().concatenated_forward(model, batch)

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
