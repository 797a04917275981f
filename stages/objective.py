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
    """[P] True where every completion of a prompt got exactly the same reward: no learning signal.

    Equality, not `std == 0`: the float std of equal rewards such as 0.1, 0.1, 0.1 is not 0."""
    return (rewards == rewards[:, :1]).all(dim=1)


# --- per-token terms --------------------------------------------------------------------


# Schulman's estimators of KL(policy || reference) from one sample (joschu.net/blog/kl-approx.html),
# as verl's `kl_penalty_forward` (k1 "kl", k2 "mse", k3 "low_var_kl"), without its clamps of k3.


def k1_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1: the log ratio itself. Unbiased, high variance, negative for some tokens."""
    return logp - ref_logp


def k2_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2: half the squared log ratio. Biased, low variance, always >= 0; its expected gradient is KL's."""
    return 0.5 * (logp - ref_logp).square()


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(policy || reference): unbiased, always >= 0."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": k1_kl, "k2": k2_kl, "k3": k3_kl}


def importance_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor, level: str = "token") -> Tensor:
    """log(pi_theta / pi_old): per token [B, T] (`token`), or per completion [B, 1] (`sequence`, GSPO).

    `sequence` is TRL's `importance_sampling_level="sequence"`: the mean of the completion's
    token log ratios, so the ratio is the geometric mean of its tokens' ratios, the same for
    every token of it. The gradient reaches each token as ratio / |o| through the mean; spread
    over the completion's |o| tokens by every loss_agg here, it is the gradient of verl's
    stop-gradient form `exp(sg(mean) + logp - sg(logp))` (tests/test_objective.py checks it).
    """
    log_ratio = logp - old_logp
    if level == "token":
        return log_ratio
    if level == "sequence":
        return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    raise ValueError(f"grpo.importance_level: unknown {level!r} (token, sequence)")


def ppo_surrogate(ratio: Tensor, advantages: Tensor, eps_low: float, eps_high: float,
                  delta: float | None = None, clip_ratio_c: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's pessimistic surrogate `min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)`, to maximise.

    ratio: [B, T] or [B, 1]; advantages: [B]. Also where each clip binds. `delta` caps the
    unclipped ratio (TRL's two-sided GRPO, INTELLECT-2: `min(min(rho, delta) * A, clip(rho) * A)`;
    with delta > 1 + eps_high it binds only for A < 0, where rho > delta). `clip_ratio_c` is
    verl's dual clip: for A < 0 the surrogate is at least `clip_ratio_c * A` (its loss at most
    `-A * clip_ratio_c`).
    """
    adv = advantages[:, None]
    unclipped = (ratio if delta is None else torch.clamp(ratio, max=delta)) * adv
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    surrogate = torch.minimum(unclipped, clipped)
    binds = {"low": (ratio < 1 - eps_low) & (adv < 0), "high": (ratio > 1 + eps_high) & (adv > 0)}
    if clip_ratio_c is not None:
        floor = clip_ratio_c * adv
        binds["dual"] = (surrogate < floor) & (adv < 0)  # verl's pg_clipfrac_lower
        surrogate = torch.where(adv < 0, torch.maximum(surrogate, floor), surrogate)
    return surrogate, binds


def clipped_surrogate(logp: Tensor, old_logp: Tensor, advantages: Tensor,
                      eps_low: float, eps_high: float) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's pessimistic surrogate per token; also where the low and high clips bind."""
    surrogate, binds = ppo_surrogate(torch.exp(logp - old_logp), advantages, eps_low, eps_high)
    return surrogate, binds["low"], binds["high"]


def cispo_surrogate(ratio: Tensor, logp: Tensor, advantages: Tensor, eps_low: float,
                    eps_high: float) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO (MiniMax-M1): `sg(clip(rho, 1 - eps_low, 1 + eps_high)) * A * logp`, to maximise.

    The clipped importance weight is a constant: every token's gradient is the weighted policy
    gradient `w * A * grad logp`, never zeroed by the clip (verl's `compute_policy_loss_cispo`;
    TRL's `loss_type="cispo"` caps at `epsilon_high` itself with no lower bound: its 5.0 is
    eps_high 4 here, and eps_low near 1 leaves the weight no lower bound). The clips bind for
    either sign of A (verl counts them so; TRL counts only the high one with A > 0).
    """
    adv = advantages[:, None]
    weight = torch.clamp(ratio, 1 - eps_low, 1 + eps_high).detach()
    return weight * adv * logp, {"low": ratio < 1 - eps_low, "high": ratio > 1 + eps_high}


def drop_truncated(mask: Tensor, truncated: Tensor | None) -> Tensor:
    """The loss mask with the completions that ran out of tokens zeroed (TRL's mask_truncated_completions).

    truncated: [B] True where finish_reason is "length"; None keeps every completion.
    """
    return mask if truncated is None else mask * (~truncated.to(mask.device, torch.bool))[:, None].to(mask.dtype)


# --- the sampling engine's log-probs ----------------------------------------------------
# An engine other than the trainer (vLLM) computes the sampled tokens' log-probs with its own
# kernels: in fp32 they agree to ~1e-5, in bf16 far less. The trainer measures the gap, and can
# correct for it with truncated importance sampling (verl's rollout correction, TRL's
# vllm_importance_sampling_correction, after "Your efficient RL framework secretly brings you
# off-policy RL training", Yao et al. 2025).


def logprob_gap(trainer_logp: Tensor, engine_logp: Tensor, mask: Tensor) -> dict[str, float]:
    """Mean and max |trainer - engine| over the completion tokens (`mask` [B, T])."""
    on = mask.bool()
    gap = (trainer_logp - engine_logp).abs()[on]
    return {"mean": float(gap.mean()) if gap.numel() else 0.0, "max": float(gap.max()) if gap.numel() else 0.0}


def truncated_is_weights(trainer_logp: Tensor, engine_logp: Tensor, cap: float) -> Tensor:
    """min(pi_trainer / pi_engine, cap) per token, a constant: the tokens were drawn from the engine's
    distribution, and the capped ratio re-weighs them towards the trainer's with bounded variance."""
    return torch.exp(trainer_logp - engine_logp).clamp(max=cap).detach()


# --- aggregation ------------------------------------------------------------------------
# Each aggregation is a sum over the completions' tokens divided by a count. Split that way, a
# minibatch processed in micro-batches divides each part's sum by the count of the whole
# minibatch, and the accumulated gradient is the whole minibatch's (not a mean of micro-batch
# means, which weighs a short micro-batch's tokens more: verl#2505). `dapo`'s count is the whole
# iteration's, spread over its minibatches: it is computed from the iteration's mask.


def _per_sequence_sum(loss: Tensor, mask: Tensor) -> Tensor:
    return ((loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum()


def _token_sum(loss: Tensor, mask: Tensor) -> Tensor:
    return (loss * mask).sum()


def _iteration_tokens_per_step(mask: Tensor, max_new_tokens: int | None, iteration_mask: Tensor | None) -> float:
    # TRL's dapo divides each micro-batch's sum by num_items_in_batch (the generation batch's
    # tokens) * gradient_accumulation_steps / steps_per_generation, over the processes: a step's
    # loss is its token sum over the generation batch's tokens per optimizer step. Here the
    # generation batch is the iteration and a pass cuts it into rows / minibatch rows steps.
    if iteration_mask is None:  # this minibatch is the whole iteration
        iteration_mask = mask
    return max(float(iteration_mask.sum()), 1.0) * mask.shape[0] / iteration_mask.shape[0]


_Normaliser = Callable[[Tensor, "int | None", "Tensor | None"], float]

LOSS_AGGREGATIONS: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], _Normaliser]] = {
    # the paper: mean over each completion's tokens, then over completions
    "grpo": (_per_sequence_sum, lambda mask, max_new_tokens, iteration_mask: mask.shape[0]),
    # every token of the minibatch weighs the same, whatever its completion's length (TRL's bnpo)
    "bnpo": (_token_sum, lambda mask, max_new_tokens, iteration_mask: max(float(mask.sum()), 1.0)),
    # every token of the iteration weighs the same, in every step (TRL's dapo): the count is the
    # iteration's tokens per minibatch, the same for all of its steps
    "dapo": (_token_sum, _iteration_tokens_per_step),
    # Dr. GRPO: a constant length, no length normalisation bias
    "dr_grpo": (_token_sum, lambda mask, max_new_tokens, iteration_mask: mask.shape[0] * _required(max_new_tokens)),
}


def _required(max_new_tokens: int | None) -> int:
    if max_new_tokens is None:
        raise ValueError("grpo.loss_agg: dr_grpo needs max_new_tokens")
    return max_new_tokens


def loss_normaliser(loss_agg: str, mask: Tensor, max_new_tokens: int | None = None,
                    iteration_mask: Tensor | None = None) -> float:
    """What `loss_agg` divides the minibatch's summed loss by, from the whole minibatch's mask [B, T].

    `iteration_mask` [rows, T']: the loss mask of every completion of the iteration the
    minibatch is cut from, which `dapo` counts; None: the minibatch is the whole iteration.
    """
    if loss_agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"grpo.loss_agg: unknown {loss_agg!r} ({', '.join(LOSS_AGGREGATIONS)})")
    return LOSS_AGGREGATIONS[loss_agg][1](mask, max_new_tokens, iteration_mask)


def masked_mean(values: Tensor, mask: Tensor) -> float:
    return float((values * mask).sum() / mask.sum().clamp(min=1))


# --- the loss ---------------------------------------------------------------------------


def grpo_loss(logp: Tensor, old_logp: Tensor, ref_logp: Tensor | None, advantages: Tensor,
              mask: Tensor, *, eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.04,
              loss_agg: str = "grpo", max_new_tokens: int | None = None,
              normaliser: float | None = None, kl_estimator: str = "k3", clip_ratio_c: float | None = None,
              delta: float | None = None, importance_level: str = "token", policy_loss: str = "ppo",
              truncated: Tensor | None = None, iteration_mask: Tensor | None = None,
              is_weights: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """Clipped policy-gradient loss with a KL penalty to the reference (k3 by default).

    logp, old_logp, ref_logp, mask: [B, T]; advantages: [B]. `old_logp` is the sampling
    policy's; `ref_logp` may be None only when beta == 0 (the reference is never run).
    `normaliser`: the whole minibatch's `loss_normaliser` when these rows are one micro-batch
    of it; by default these rows' own (they are the minibatch; `iteration_mask`, already
    without truncated completions, is the iteration's for `dapo`). `truncated` [B]: the
    completions that hit max_new_tokens, which then carry no loss (mask_truncated_completions).
    `is_weights` [B, T]: truncated importance weights of the sampling engine's tokens
    (`truncated_is_weights`), which scale each token's policy-gradient term, not its KL (verl).
    The keyword defaults are the DeepSeekMath objective (`params.yaml` documents the variants).
    """
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"grpo.kl_estimator: unknown {kl_estimator!r} ({', '.join(KL_ESTIMATORS)})")
    mask = drop_truncated(mask, truncated)
    if normaliser is None:
        normaliser = loss_normaliser(loss_agg, mask, max_new_tokens, iteration_mask)
    mask = mask.to(logp.dtype)
    ratio = torch.exp(importance_log_ratio(logp, old_logp, mask, importance_level))
    if policy_loss == "ppo":
        surrogate, binds = ppo_surrogate(ratio, advantages, eps_low, eps_high, delta, clip_ratio_c)
    elif policy_loss == "cispo":
        if delta is not None or clip_ratio_c is not None:
            raise ValueError("grpo.delta and grpo.clip_ratio_c apply to policy_loss ppo only")
        surrogate, binds = cispo_surrogate(ratio, logp, advantages, eps_low, eps_high)
    else:
        raise ValueError(f"grpo.policy_loss: unknown {policy_loss!r} (ppo, cispo)")
    per_token = -surrogate  # [B, 1] with importance_level sequence and ppo: broadcast by the mask
    if is_weights is not None:
        per_token = per_token * is_weights
    stats: dict[str, float] = {}
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("grpo_loss: ref_logp is required when beta != 0")
        kl = KL_ESTIMATORS[kl_estimator](logp, ref_logp)
        per_token = per_token + beta * kl
        stats["kl"] = masked_mean(kl.detach(), mask)
    loss = LOSS_AGGREGATIONS[loss_agg][0](per_token, mask) / normaliser
    stats["clip_ratio/low"] = masked_mean(binds["low"].float(), mask)
    stats["clip_ratio/high"] = masked_mean(binds["high"].float(), mask)
    stats["clip_ratio"] = stats["clip_ratio/low"] + stats["clip_ratio/high"]
    if "dual" in binds:
        stats["clip_ratio/dual"] = masked_mean(binds["dual"].float(), mask)
    return loss, stats
