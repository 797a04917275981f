"""The numerics guard: a NaN loss or gradient stops the update, names the iteration, and
leaves the last good checkpoint as it was; groups with no reward spread carry no signal and
are counted, never divided by zero."""

import pandas as pd
import pytest
import torch

from stages.advantage import advantage
from stages.records.artifacts import Layout, tree_digest, write_parquet
from stages.errors import NumericsError
from stages.model.modeling import load_model, load_tokenizer
from stages.prepare import prepare
from stages.reference import reference
from stages.reward import reward
from stages.rollout import rollout
from stages.update import TrainState, make_optimizer, update


def run_until_update(params, layout, state, iteration):
    rollout(params, layout, iteration, state.model, state.tokenizer)
    reward(params.reward, layout, iteration, params.rollout.group_size)
    return advantage(params.grpo, params.rollout.group_size, layout, iteration)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_update_stops_naming_the_iteration_and_keeps_the_last_checkpoint(poison, tiny_params, tmp_path):
    params = tiny_params.model_copy(update={"grpo": tiny_params.grpo.model_copy(update={"beta": 0.0})})
    layout = Layout(tmp_path)
    prepare(params, layout)
    reference(params, layout)
    model = load_model(layout.reference, params.model, torch.device("cpu"), dtype=torch.float32).eval()
    state = TrainState(model, load_tokenizer(layout.reference), make_optimizer(model, params))
    run_until_update(params, layout, state, 1)
    update(params, layout, 1, state, None)
    good = tree_digest(layout.checkpoint(1))

    run_until_update(params, layout, state, 2)
    with torch.no_grad():  # the weights blow up between sampling and the update
        state.model.get_input_embeddings().weight[:] = poison
    with pytest.raises(NumericsError, match=r"^iteration 2: "):
        update(params, layout, 2, state, None)
    assert not layout.checkpoint(2).exists()
    assert not (layout.iteration(2) / "update.json").exists()
    assert tree_digest(layout.checkpoint(1)) == good


def test_groups_without_reward_spread_are_counted_and_get_zero_advantage(tiny_params, tmp_path):
    layout = Layout(tmp_path)
    prepare(tiny_params, layout)
    reference(tiny_params, layout)
    model = load_model(layout.reference, tiny_params.model, torch.device("cpu"), dtype=torch.float32).eval()
    state = TrainState(model, load_tokenizer(layout.reference), make_optimizer(model, tiny_params))
    rollout(tiny_params, layout, 1, state.model, state.tokenizer)
    reward(tiny_params.reward, layout, 1, tiny_params.rollout.group_size)
    # One group whose completions all scored the same, as when a policy agrees with itself
    # (whether the sampled ones do is up to chance).
    rewards = pd.read_parquet(layout.iteration(1) / "rewards.parquet")
    agreed = rewards["prompt_id"].iloc[0]
    rewards.loc[rewards["prompt_id"] == agreed, "reward"] = 0.7
    write_parquet(layout.iteration(1) / "rewards.parquet", rewards)
    metrics = advantage(tiny_params.grpo, tiny_params.rollout.group_size, layout, 1)

    table = pd.read_parquet(layout.iteration(1) / "advantages.parquet")
    flat = table[table["zero_std_group"]]
    assert agreed in set(flat["prompt_id"])
    assert metrics["zero_std_groups"] == flat["prompt_id"].nunique()
    assert (flat["advantage"] == 0).all() and table["advantage"].notna().all()
