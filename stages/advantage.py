"""advantage: each completion's reward relative to its group → advantages.parquet."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from stages.records.artifacts import Layout, write_parquet
from stages.config import GRPOConfig
from stages.errors import GroupError
from stages.objective import group_advantages, zero_std_groups


def reward_matrix(rewards: pd.DataFrame, group_size: int) -> tuple[list, torch.Tensor]:
    """[P, G] rewards, one row per prompt in order of appearance, after checking the groups."""
    codes, prompt_ids = pd.factorize(rewards["prompt_id"], sort=False)
    samples = rewards["sample"].to_numpy()
    if np.issubdtype(samples.dtype, np.integer):  # the usual case: one scatter, checked in bulk
        slots = codes * group_size + samples
        if (len(rewards) == len(prompt_ids) * group_size and codes.min(initial=0) >= 0
                and ((samples >= 0) & (samples < group_size)).all() and len(np.unique(slots)) == len(slots)):
            values = np.empty(len(rewards))
            values[slots] = rewards["reward"].to_numpy()
            return prompt_ids.tolist(), torch.tensor(values, dtype=torch.float64).view(len(prompt_ids), group_size)
    for prompt_id, group in rewards.groupby("prompt_id", sort=False, dropna=False):  # name the bad group
        found = sorted(group["sample"].tolist())
        if found != list(range(group_size)):
            raise GroupError(f"prompt_id={prompt_id!r} has samples {found}, expected 0..{group_size - 1}")
    ordered = rewards.set_index(["prompt_id", "sample"]).loc[
        pd.MultiIndex.from_product([prompt_ids.tolist(), range(group_size)])]
    return prompt_ids.tolist(), torch.tensor(ordered["reward"].to_numpy(), dtype=torch.float64).view(-1, group_size)


def compute_advantages(rewards: pd.DataFrame, group_size: int, scale: str) -> pd.DataFrame:
    prompt_ids, matrix = reward_matrix(rewards, group_size)
    advantages = group_advantages(matrix, scale)
    return pd.DataFrame({
        "prompt_id": [p for p in prompt_ids for _ in range(group_size)],
        "sample": list(range(group_size)) * len(prompt_ids),
        "advantage": advantages.flatten().numpy(),
        "group_mean": matrix.mean(dim=1).repeat_interleave(group_size).numpy(),
        "group_std": matrix.std(dim=1).repeat_interleave(group_size).numpy(),
        "zero_std_group": zero_std_groups(matrix).repeat_interleave(group_size).numpy(),
    })


def advantage(cfg: GRPOConfig, group_size: int, layout: Layout, iteration: int) -> dict[str, float]:
    started = time.perf_counter()
    folder = layout.iteration(iteration)
    advantages = compute_advantages(pd.read_parquet(folder / "rewards.parquet"), group_size, cfg.scale_rewards)
    write_parquet(folder / "advantages.parquet", advantages)
    return {
        "advantage/abs_mean": float(advantages["advantage"].abs().mean()),
        "zero_std_groups": int(advantages["zero_std_group"].sum() // group_size),
        "seconds/advantage": time.perf_counter() - started,
    }
