"""Dynamic sampling (DAPO): keep drawing prompts until the iteration's groups carry a signal.

A group whose G completions all got the same total reward has zero advantage everywhere: it
costs a forward and a backward and teaches nothing (as accuracy rises, most groups are all
right). With `rollout.dynamic_sampling.filter: zero_std` the rollout stage draws the
iteration's prompts in rounds: round 0 is the iteration's usual draw, each later round
`rollout.prompts_per_iteration` prompts not drawn yet this iteration, each round sampled from
its own seed (`stages.rollout.sampling_seed`), so an iteration redone alone draws the same.
After each round the completions are scored and groups whose rewards are all exactly equal
are set aside; it stops once `prompts_per_iteration` groups with signal are in hand, or after
`max_rounds` rounds. Short of signal, it fills the batch with set-aside groups, first drawn
first (their advantage is zero: they only add the KL term), so every iteration has the same
shape, and says so in `rollout/groups_short`.

Equal means equal to the bit, on the total reward: a group of continuous rewards that differ
in the sixth decimal has a signal (its advantage is scaled by its std), and one whose rewards
are all 0.7 has none even though its float mean and std may not come out exactly 0.7 and 0
(OpenRLHF#1270 filtered on the mean and let such groups through).
"""

from __future__ import annotations

from typing import Callable

import pandas as pd


def groups_with_signal(rewards: pd.DataFrame) -> pd.Series:
    """Per prompt_id, in order of appearance: True where its completions' total rewards are not all equal."""
    totals = rewards.groupby("prompt_id", sort=False)["reward"]
    return totals.max() != totals.min()  # exact: no mean, no std, no tolerance


def sample_with_signal(wanted: int, max_rounds: int, draw: Callable[[int], pd.DataFrame],
                       generate: Callable[[pd.DataFrame, int], pd.DataFrame],
                       score: Callable[[pd.DataFrame], pd.DataFrame]) -> tuple[pd.DataFrame, dict[str, float]]:
    """The iteration's rollouts: `wanted` groups, those with signal first in draw order.

    draw(round) → that round's prompts (empty when none are left); generate(prompts, round) →
    their rollouts; score(rollouts) → rewards with prompt_id and `reward`.
    """
    kept: list[pd.DataFrame] = []
    set_aside: list[pd.DataFrame] = []
    consumed = rounds = 0
    while rounds < max_rounds and len(kept) < wanted:
        prompts = draw(rounds)
        if prompts.empty:  # every training prompt has been drawn this iteration
            break
        rollouts = generate(prompts, rounds).assign(round=rounds)
        signal = groups_with_signal(score(rollouts))
        for prompt_id, group in rollouts.groupby("prompt_id", sort=False):
            (kept if signal[prompt_id] else set_aside).append(group)
        consumed += len(prompts)
        rounds += 1
    groups = kept[:wanted] + set_aside[:max(0, wanted - len(kept))]
    return pd.concat(groups, ignore_index=True), {
        "rollout/rounds": float(rounds),
        "rollout/prompts_consumed": float(consumed),
        "rollout/groups_dropped": float(len(set_aside)),
        "rollout/groups_short": float(max(0, wanted - len(kept))),
    }
