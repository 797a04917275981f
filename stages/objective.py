"""The GRPO objective as a handful of pure tensor functions (DeepSeekMath, with the known variants).

Each variant is a small function in a registry: a new one is a function and a line.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

# --- advantages -------------------------------------------------------------------------


def group_advantages(rewards: Tensor, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """Outcome-supervised advantage of each completion relative to its prompt's group.

    rewards: [P, G], one row per prompt. `A = (r - mean_group(r)) / (std + eps)` where std is
    the unbiased std of the group (`group`, the paper), of the whole batch (`batch`), or 1
    (`none`, Dr. GRPO). A group whose rewards are all equal gets zero advantage.
    """
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "group":
        return centered / (rewards.std(dim=1, keepdim=True) + eps)
    if scale == "batch":
        return centered / (rewards.std() + eps)
    if scale == "none":
        return centered
    raise ValueError(f"grpo.scale_rewards: unknown {scale!r} (group, batch, none)")


def zero_std_groups(rewards: Tensor) -> Tensor:
    """[P] True where every completion of a prompt got the same reward: no learning signal."""
    return rewards.std(dim=1) == 0 if rewards.shape[1] > 1 else torch.ones(rewards.shape[0], dtype=torch.bool)


# --- per-token terms --------------------------------------------------------------------


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(policy || reference): unbiased, always >= 0."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def clipped_surrogate(logp: Tensor, old_logp: Tensor, advantages: Tensor,
                      eps_low: float, eps_high: float) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's pessimistic surrogate per token; also where the low and high clips bind."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    low_clipped = (ratio < 1 - eps_low) & (adv < 0)
    high_clipped = (ratio > 1 + eps_high) & (adv > 0)
    return torch.minimum(unclipped, clipped), low_clipped, high_clipped


# --- aggregation ------------------------------------------------------------------------
# Each aggregation is a sum over the completions' tokens divided by a count. Split that way, a
# minibatch processed in micro-batches divides each part's sum by the count of the whole
# minibatch, and the accumulated gradient is the whole minibatch's (not a mean of micro-batch
# means, which weighs a short micro-batch's tokens more: verl#2505).


def _per_sequence_sum(loss: Tensor, mask: Tensor) -> Tensor:
    return ((loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum()


def _token_sum(loss: Tensor, mask: Tensor) -> Tensor:
    return (loss * mask).sum()


LOSS_AGGREGATIONS: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], Callable[[Tensor, int | None], float]]] = {
    # the paper: mean over each completion's tokens, then over completions
    "grpo": (_per_sequence_sum, lambda mask, max_new_tokens: mask.shape[0]),
    # every token weighs the same, whatever its completion's length (TRL's bnpo: the minibatch's tokens)
    "dapo": (_token_sum, lambda mask, max_new_tokens: max(float(mask.sum()), 1.0)),
    # Dr. GRPO: a constant length, no length normalisation bias
    "dr_grpo": (_token_sum, lambda mask, max_new_tokens: mask.shape[0] * _required(max_new_tokens)),
}


def _required(max_new_tokens: int | None) -> int:
    if max_new_tokens is None:
        raise ValueError("grpo.loss_agg: dr_grpo needs max_new_tokens")
    return max_new_tokens


def loss_normaliser(loss_agg: str, mask: Tensor, max_new_tokens: int | None = None) -> float:
    """What `loss_agg` divides the minibatch's summed loss by, from the whole minibatch's mask [B, T]."""
    if loss_agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"grpo.loss_agg: unknown {loss_agg!r} ({', '.join(LOSS_AGGREGATIONS)})")
    return LOSS_AGGREGATIONS[loss_agg][1](mask, max_new_tokens)


def masked_mean(values: Tensor, mask: Tensor) -> float:
    return float((values * mask).sum() / mask.sum().clamp(min=1))


# --- the loss ---------------------------------------------------------------------------


def grpo_loss(logp: Tensor, old_logp: Tensor, ref_logp: Tensor | None, advantages: Tensor,
              mask: Tensor, *, eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.04,
              loss_agg: str = "grpo", max_new_tokens: int | None = None,
              normaliser: float | None = None) -> tuple[Tensor, dict[str, float]]:
    """Clipped policy-gradient loss with a k3 KL penalty to the reference.

    logp, old_logp, ref_logp, mask: [B, T]; advantages: [B]. `old_logp` is the sampling
    policy's; `ref_logp` may be None only when beta == 0 (the reference is never run).
    `normaliser`: the whole minibatch's `loss_normaliser` when these rows are one micro-batch
    of it; by default these rows' own (they are the minibatch).
    """
    if normaliser is None:
        normaliser = loss_normaliser(loss_agg, mask, max_new_tokens)
    mask = mask.to(logp.dtype)
    surrogate, low_clipped, high_clipped = clipped_surrogate(logp, old_logp, advantages, eps_low, eps_high)
    per_token = -surrogate
    stats: dict[str, float] = {}
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("grpo_loss: ref_logp is required when beta != 0")
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + beta * kl
        stats["kl"] = masked_mean(kl.detach(), mask)
    loss = LOSS_AGGREGATIONS[loss_agg][0](per_token, mask) / normaliser
    stats["clip_ratio/low"] = masked_mean(low_clipped.float(), mask)
    stats["clip_ratio/high"] = masked_mean(high_clipped.float(), mask)
    stats["clip_ratio"] = stats["clip_ratio/low"] + stats["clip_ratio/high"]
    return loss, stats
