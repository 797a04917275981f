"""The group contract every stage after rollout rests on: each prompt has exactly G completions.

Kept free of torch, so the reward scoring process (stages/rewards/scoring.py) imports it cheaply.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from stages.errors import GroupError


def check_groups(frame: pd.DataFrame, group_size: int | None = None, where: str = "") -> None:
    """Every prompt has exactly G completions with distinct sample indices 0..G-1.

    This is what the advantage's groups rest on. Without `group_size` (a stage that is not
    told G), G is the most common group size, so a short or padded group is still named.
    `where` (a file, an iteration) starts the message.
    """
    at = f"{where}: " if where else ""
    if frame.empty:
        raise GroupError(f"{at}no completions at all")
    unnamed = frame["prompt_id"].isna() | frame["sample"].isna()
    if unnamed.any():
        raise GroupError(f"{at}row {int(np.flatnonzero(unnamed)[0])} has no prompt_id or no sample index")
    repeated = frame.duplicated(["prompt_id", "sample"])
    if repeated.any():
        culprit = frame[repeated].iloc[0]
        raise GroupError(f"{at}prompt_id={culprit['prompt_id']!r} has sample {culprit['sample']} more than once")
    groups = frame.groupby("prompt_id", sort=False)["sample"].agg(lambda samples: sorted(samples.tolist()))
    expected = group_size or int(groups.map(len).mode().max())
    for prompt_id, samples in groups.items():
        if samples != list(range(expected)):
            why = f"rollout.group_size={group_size}" if group_size else "as the other prompts have"
            raise GroupError(f"{at}prompt_id={prompt_id!r} has samples {samples}, expected 0..{expected - 1} ({why})")
