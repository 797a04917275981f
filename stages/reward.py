"""reward: score every completion with each weighted component → rewards.parquet.

One column per component (NaN where a function abstained) and `reward`, their weighted sum.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np
import pandas as pd

from stages.artifacts import Layout, write_parquet
from stages.config import RewardConfig
from stages.errors import RewardError, one_line
from stages.rewards import RewardFn, resolve
from stages.scoring import scoring_process
from stages.groups import check_groups


def run_settings(cfg: RewardConfig, max_new_tokens: int | None) -> dict[str, Any]:
    """The run's settings every reward function gets as keyword columns, beside the rollouts' own."""
    return {"target_language": cfg.target_language, "max_new_tokens": max_new_tokens,
            "overlong_buffer": cfg.overlong_buffer}


def _call(fn: RewardFn, rollouts: pd.DataFrame, settings: dict[str, Any]) -> Any:
    columns = {
        "answer": rollouts["answer"].tolist(),
        "prompt_id": rollouts["prompt_id"].tolist(),
        "sample": rollouts["sample"].tolist(),
        # Tokens, eos included; None for a frame without it (one made by hand, not by rollout).
        "completion_length": rollouts["completion_length"].tolist() if "completion_length" in rollouts else None,
        **settings,
    }
    return fn(rollouts["prompt"].tolist(), rollouts["completion"].tolist(), **columns)


def _culprit(rollouts: pd.DataFrame, row: int) -> str:
    """How a user finds the completion again in rollouts.parquet."""
    culprit = rollouts.iloc[row]
    return f"prompt_id={culprit['prompt_id']!r} sample={culprit['sample']}"


def _failure(name: str, fn: RewardFn, rollouts: pd.DataFrame, settings: dict[str, Any],
             error: Exception) -> RewardError:
    """The error for a reward that raised: on the first completion it raises on alone, if any."""
    for row in range(len(rollouts)):
        try:
            _call(fn, rollouts.iloc[row:row + 1], settings)
        except Exception as alone:
            return RewardError(f"reward {name!r} raised on {_culprit(rollouts, row)}: "
                               f"{type(alone).__name__}: {one_line(alone)}")
    return RewardError(f"reward {name!r} raised on the batch of {len(rollouts)} completions (on none alone): "
                       f"{type(error).__name__}: {one_line(error)}")


def _as_list(name: str, result: Any, expected: int) -> list:
    """A reward's result as one entry per completion, or an error saying what came back instead."""
    shape = getattr(result, "shape", None)
    if shape is not None and len(shape) != 1:
        raise RewardError(f"reward {name!r} returned an array of shape {tuple(shape)}, expected ({expected},): "
                          f"one score per completion")
    if result is None or isinstance(result, (str, bytes, dict)) or not hasattr(result, "__iter__"):
        raise RewardError(f"reward {name!r} returned {type(result).__name__} {one_line(repr(result), 60)}, "
                          f"expected a list of {expected} scores, one per completion")
    scores = list(result)
    if len(scores) != expected:
        raise RewardError(f"reward {name!r} returned {len(scores)} scores for {expected} completions")
    return scores


def score_component(name: str, fn: RewardFn, rollouts: pd.DataFrame, settings: dict[str, Any]) -> np.ndarray:
    """Exactly one finite float per completion (NaN = abstained, from `None`), or an error naming the culprit.
    `settings` (`run_settings`) are passed to `fn` as keyword columns."""
    try:
        result = _call(fn, rollouts, settings)
    except Exception as error:  # the user's code: find the completion it fails on, to reproduce it
        raise _failure(name, fn, rollouts, settings, error) from None
    values = np.full(len(rollouts), np.nan)
    for row, score in enumerate(_as_list(name, result, len(rollouts))):
        if score is None:  # an explicit abstention
            continue
        try:
            value = math.nan if isinstance(score, (str, bytes)) else float(score)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise RewardError(
                f"reward {name!r} returned {one_line(repr(score), 60)} for {_culprit(rollouts, row)}: "
                f"expected a finite number or None (abstain)"
            )
        values[row] = value
    return values


def score_rollouts(rollouts: pd.DataFrame, cfg: RewardConfig, group_size: int | None = None,
                   where: str = "", max_new_tokens: int | None = None) -> pd.DataFrame:
    """Check the groups, then score: one column per component and `reward`, their weighted sum.

    Each component is scored in the scoring process (`stages.scoring`), within
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
    the longest training prompt with max_new_tokens of completion (`stages.reward_models`)."""
    if cfg.models or cfg.judges:
        from stages.reward_models import check_prompts_fit

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
