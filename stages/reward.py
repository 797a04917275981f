"""reward: score every completion with each weighted component → rewards.parquet.

One column per component (NaN where a function abstained) and `reward`, their weighted sum.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd

from stages.artifacts import Layout, write_parquet
from stages.config import RewardConfig
from stages.errors import RewardError
from stages.rewards import RewardFn, resolve


def _call(name: str, fn: RewardFn, rollouts: pd.DataFrame, target_language: str) -> list:
    columns = {
        "answer": rollouts["answer"].tolist(),
        "prompt_id": rollouts["prompt_id"].tolist(),
        "sample": rollouts["sample"].tolist(),
        "target_language": target_language,
    }
    return list(fn(rollouts["prompt"].tolist(), rollouts["completion"].tolist(), **columns))


def score_component(name: str, fn: RewardFn, rollouts: pd.DataFrame, target_language: str) -> np.ndarray:
    """One float per completion (NaN = abstained), or an error naming the culprit."""
    try:
        scores = _call(name, fn, rollouts, target_language)
    except Exception:
        # Find the completion it fails on, so the user can reproduce it from rollouts.parquet.
        for row in range(len(rollouts)):
            try:
                _call(name, fn, rollouts.iloc[row:row + 1], target_language)
            except Exception as error:
                culprit = rollouts.iloc[row]
                raise RewardError(
                    f"reward {name!r} raised on prompt_id={culprit['prompt_id']!r} sample={culprit['sample']}: "
                    f"{type(error).__name__}: {error}"
                ) from None
        raise
    if len(scores) != len(rollouts):
        raise RewardError(f"reward {name!r} returned {len(scores)} scores for {len(rollouts)} completions")
    values = np.full(len(scores), np.nan)
    for row, score in enumerate(scores):
        if score is None:
            continue
        try:
            value = float(score)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            culprit = rollouts.iloc[row]
            raise RewardError(
                f"reward {name!r} returned {score!r} for prompt_id={culprit['prompt_id']!r} "
                f"sample={culprit['sample']}: expected a finite number or None"
            )
        values[row] = value
    return values


def score_rollouts(rollouts: pd.DataFrame, cfg: RewardConfig) -> pd.DataFrame:
    rewards = rollouts[["prompt_id", "sample"]].copy()
    total = np.zeros(len(rollouts))
    for name, fn in resolve(cfg.weights, cfg.custom).items():
        rewards[name] = score_component(name, fn, rollouts, cfg.target_language)
        total += cfg.weights[name] * np.nan_to_num(rewards[name].to_numpy(), nan=0.0)  # abstain adds 0
    rewards["reward"] = total
    return rewards


def reward_metrics(rewards: pd.DataFrame, components: list[str]) -> dict[str, float]:
    grouped = rewards.groupby("prompt_id", sort=False)["reward"]
    group_std = grouped.std()
    metrics = {
        "reward": float(rewards["reward"].mean()),
        "reward_std": float(group_std.mean()),
        "frac_reward_zero_std": float((group_std == 0).mean()),
    }
    for name in components:
        metrics[f"rewards/{name}"] = float(rewards[name].mean())
    return metrics


def reward(cfg: RewardConfig, layout: Layout, iteration: int) -> dict[str, float]:
    started = time.perf_counter()
    folder = layout.iteration(iteration)
    rollouts = pd.read_parquet(folder / "rollouts.parquet", columns=["prompt_id", "sample", "prompt", "answer", "completion"])
    rewards = score_rollouts(rollouts, cfg)
    write_parquet(folder / "rewards.parquet", rewards)
    return {**reward_metrics(rewards, list(cfg.weights)), "seconds/reward": time.perf_counter() - started}
