"""rescore: an iteration's rollouts scored again under other reward settings, beside the recorded scores.

    grpo rescore 37 --set reward.weights.format=0.5
    grpo rescore 37 --set 'reward.custom=["mypkg.rewards:judge"]' --set reward.weights.judge=1.0

Nothing is generated: the iteration's rollouts.parquet (its digest checked against the
manifest) is scored by the reward stage's own code under the changed `reward.*` settings,
and advantages are computed as the advantage stage does. The results go to
`rescored/NNNN-NAME/` (rewards.parquet, advantages.parquet, summary.json), never over the run's
files (`runs/` is the train stage's DVC output). Under the recorded settings every reward and
advantage comes out as recorded.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.advantage import compute_advantages
from stages.records.artifacts import Layout, write_json, write_parquet
from stages.config import Params
from stages.records.manifest import recorded_iteration
from stages.reward import score_rollouts

COLUMNS = ["prompt_id", "sample", "prompt", "answer", "completion", "completion_length"]


def rescore_name(overrides: list[str]) -> str:
    """A folder name from the overrides: `reward.weights.format=0.5` → `weights.format=0.5`."""
    if not overrides:
        return "recorded"
    name = ",".join(override.removeprefix("reward.") for override in overrides)
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", name)[:100]


def signal_changes(before: pd.DataFrame, after: pd.DataFrame) -> dict[str, list]:
    """Prompts whose group gained or lost a learning signal (all rewards exactly equal: none)."""
    zero_before = before.groupby("prompt_id", sort=False)["zero_std_group"].first()
    zero_after = after.groupby("prompt_id", sort=False)["zero_std_group"].first()
    return {"gained_signal": zero_before[zero_before & ~zero_after].index.tolist(),
            "lost_signal": zero_before[~zero_before & zero_after].index.tolist()}


def compare(rewards: tuple[pd.DataFrame, pd.DataFrame], advantages: tuple[pd.DataFrame, pd.DataFrame],
            group_size: int) -> dict[str, Any]:
    (rewards_before, rewards_after), (advantages_before, advantages_after) = rewards, advantages
    components = sorted((set(rewards_before) | set(rewards_after)) - {"prompt_id", "sample"})
    change = advantages_after["advantage"].to_numpy() - advantages_before["advantage"].to_numpy()
    return {
        "mean": {name: [float(frame[name].mean()) if name in frame else None
                        for frame in (rewards_before, rewards_after)] for name in components},
        "zero_std_groups": [int(frame["zero_std_group"].sum() // group_size)
                            for frame in (advantages_before, advantages_after)],
        **signal_changes(advantages_before, advantages_after),
        "advantage_max_abs_change": float(np.abs(change).max()),
        "advantage_sign_flips": int((np.sign(advantages_after["advantage"].to_numpy())
                                     != np.sign(advantages_before["advantage"].to_numpy())).sum()),
        "unchanged": bool(rewards_before.equals(rewards_after) and advantages_before.equals(advantages_after)),
    }


def rescore(params: Params, layout: Layout, iteration: int, changed: Params, name: str) -> dict[str, Any]:
    """Score the iteration's rollouts under `changed`'s reward settings into rescored/NNNN-name/."""
    recorded_iteration(params, layout, iteration)
    folder = layout.iteration(iteration)
    name = re.sub(r"[^A-Za-z0-9_.=,+-]", "_", name).strip(".") or "recorded"  # one folder, under rescored/
    target = layout.inside(layout.root / "rescored" / f"{iteration:04d}-{name}")
    rollouts = pd.read_parquet(folder / "rollouts.parquet", columns=COLUMNS)
    rewards_before = pd.read_parquet(folder / "rewards.parquet")
    advantages_before = pd.read_parquet(folder / "advantages.parquet")
    group_size = params.rollout.group_size
    rewards_after = score_rollouts(rollouts, changed.reward, group_size, str(folder / "rollouts.parquet"),
                                   changed.rollout.max_new_tokens)
    advantages_after = compute_advantages(rewards_after, group_size, changed.grpo.scale_rewards)
    summary = {"iteration": iteration, "written_to": str(target),
               **compare((rewards_before, rewards_after), (advantages_before, advantages_after), group_size)}
    write_parquet(target / "rewards.parquet", rewards_after)
    write_parquet(target / "advantages.parquet", advantages_after)
    write_json(target / "summary.json", summary)
    return summary
