"""reward: score every completion with each weighted component → rewards.parquet.

One column per component (NaN where a function abstained) and `reward`, their weighted sum.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import pandas as pd

from stages.records.artifacts import Layout, write_parquet
from stages.config import RewardConfig
from stages.errors import RewardError
from stages.rewards.rules import resolve
from stages.rewards.scoring import scoring_process
from stages.records.groups import check_groups


def run_settings(cfg: RewardConfig, max_new_tokens: int | None) -> dict[str, Any]:
    """The run's settings every reward function gets as keyword columns, beside the rollouts' own."""
    return {"target_language": cfg.target_language, "max_new_tokens": max_new_tokens,
            "overlong_buffer": cfg.overlong_buffer}


def score_rollouts(rollouts: pd.DataFrame, cfg: RewardConfig, group_size: int | None = None,
                   where: str = "", max_new_tokens: int | None = None) -> pd.DataFrame:
    """Check the groups, then score: one column per component and `reward`, their weighted sum.

    Each component is scored in the scoring process (`stages.rewards.scoring`), within
    `reward.timeout_seconds`. `where` (the rollouts file) starts a group error's message.
    `max_new_tokens` (rollout.max_new_tokens) is what `overlong` measures lengths against.
    """
    check_groups(rollouts, group_size, where)
    rewards = rollouts[["prompt_id", "sample"]].copy()
    total = np.zeros(len(rollouts))
    # Here too: a reward that no longer imports (or a model directory since removed) is named before any scoring.
    resolve(cfg.weights, cfg.custom, cfg.models, cfg.judges)
    scores = scoring_process(cfg).score(cfg.weights, rollouts, run_settings(cfg, max_new_tokens), cfg.timeout_seconds)
    for name, values in scores.items():
        rewards[name] = values
        total += cfg.weights[name] * np.nan_to_num(values, nan=0.0)  # abstain adds 0
    rewards["reward"] = total
    return rewards


def reward_metrics(rewards: pd.DataFrame, components: list[str], groups: bool = True) -> dict[str, float]:
    """The mean reward and each component's; with `groups`, the within-group spread GRPO learns from."""
    metrics = {"reward": float(rewards["reward"].mean())}
    if groups:
        group_std = rewards.groupby("prompt_id", sort=False)["reward"].std()
        metrics |= {"reward_std": float(group_std.mean()), "frac_reward_zero_std": float((group_std == 0).mean())}
    for name in components:
        metrics[f"rewards/{name}"] = float(rewards[name].mean())
    return metrics


def check_model_inputs(cfg: RewardConfig, layout: Layout, max_new_tokens: int) -> None:
    """Before any rollout: every judge server answers, and every reward or judge model's context holds
    the longest training prompt with max_new_tokens of completion (`stages.rewards.models`)."""
    if cfg.models or cfg.judges:
        from stages.rewards.models import check_prompts_fit

        prompts = pd.read_parquet(layout.prompt_split("train"), columns=["prompt", "answer"])
        check_prompts_fit(cfg.models, cfg.judges, prompts["prompt"].tolist(), prompts["answer"].tolist(),
                          max_new_tokens)


# (rollouts, cfg, group_size, where, max_new_tokens): `score_rollouts`' arguments, in its order.
Scorer = Callable[[pd.DataFrame, RewardConfig, "int | None", str, "int | None"], pd.DataFrame]


def reward(cfg: RewardConfig, layout: Layout, iteration: int, group_size: int | None = None,
           score: Scorer = score_rollouts, max_new_tokens: int | None = None) -> dict[str, float]:
    """Score one iteration's rollouts; pass `group_size` (rollout.group_size) to check groups against it,
    and `max_new_tokens` (rollout.max_new_tokens) for `overlong`.
    `score` is `score_rollouts` here, or the same spread over Ray workers (`flows.cluster`)."""
    started = time.perf_counter()
    folder = layout.iteration(iteration)
    source = folder / "rollouts.parquet"
    rollouts = pd.read_parquet(source, columns=["prompt_id", "sample", "prompt", "answer", "completion",
                                                "completion_length"])
    try:
        rewards = score(rollouts, cfg, group_size, str(source), max_new_tokens)
    except RewardError as error:  # which iteration's file to open to reproduce it
        raise RewardError(f"{source}: {error}") from None
    write_parquet(folder / "rewards.parquet", rewards)
    return {**reward_metrics(rewards, list(cfg.weights)), "seconds/reward": time.perf_counter() - started}
