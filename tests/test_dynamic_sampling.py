"""Dynamic sampling (`rollout.dynamic_sampling`): which groups carry a signal, how rounds are drawn,
and that a run using it is as reproducible and resumable as any other."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT, outcome, prepare_tiny_project, train
from stages.records.artifacts import Layout, file_digest
from stages.params import load_params
from stages.rewards.dynamic_sampling import groups_with_signal, sample_with_signal
from stages.rollout import prompt_rows

ZERO_STD = ["rollout.dynamic_sampling.filter=zero_std", "rollout.dynamic_sampling.max_rounds=3"]


def rewards(groups: dict[str, list[float]]) -> pd.DataFrame:
    return pd.DataFrame([{"prompt_id": p, "sample": i, "reward": r} for p, values in groups.items()
                         for i, r in enumerate(values)])


def test_a_group_of_equal_continuous_rewards_is_dropped_and_one_differing_in_the_sixth_decimal_kept():
    found = groups_with_signal(rewards({"equal": [0.123456] * 4, "differs": [0.123456, 0.123456, 0.123457, 0.123456]}))
    assert found.to_dict() == {"equal": False, "differs": True}


def test_equality_is_exact_where_a_float_mean_and_std_are_not():
    # 0.1 three times: the float mean is 0.10000000000000002 and the std 1.7e-17, not 0.1 and 0.
    values = pd.Series([0.1, 0.1, 0.1])
    assert values.std() != 0
    assert not groups_with_signal(rewards({"p": [0.1, 0.1, 0.1]}))["p"]


def test_later_rounds_draw_prompts_not_drawn_yet_and_round_zero_is_the_usual_draw():
    first = prompt_rows(100, 10, seed=0, iteration=3)
    second = prompt_rows(100, 10, seed=0, iteration=3, round=1, taken=frozenset(first.tolist()))
    assert len(set(first) | set(second)) == 20
    assert (second == prompt_rows(100, 10, seed=0, iteration=3, round=1, taken=frozenset(first.tolist()))).all()
    last = prompt_rows(25, 10, seed=0, iteration=3, round=2, taken=frozenset(range(20)))
    assert sorted(last) == [20, 21, 22, 23, 24]  # what is left, no more


def toy_round(prompts: pd.DataFrame, round: int) -> pd.DataFrame:
    """Two completions per prompt; a prompt whose id is even has a signal."""
    rows = [{"prompt_id": pid, "sample": s, "reward": float(s if int(pid) % 2 == 0 else 1)}
            for pid in prompts["prompt_id"] for s in range(2)]
    return pd.DataFrame(rows)


def rounds_of(ids_per_round: list[list[str]]):
    return lambda round: pd.DataFrame({"prompt_id": ids_per_round[round] if round < len(ids_per_round) else []})


def test_rounds_stop_once_enough_groups_have_a_signal_and_keep_them_in_draw_order():
    batch, metrics = sample_with_signal(3, 5, rounds_of([["1", "2", "3"], ["4", "5", "6"], ["8", "10", "12"]]),
                                        toy_round, lambda rows: rows)
    assert list(dict.fromkeys(batch["prompt_id"])) == ["2", "4", "6"]
    assert batch["round"].tolist() == [0, 0, 1, 1, 1, 1]
    assert metrics == {"rollout/rounds": 2.0, "rollout/prompts_consumed": 6.0, "rollout/groups_dropped": 3.0,
                       "rollout/groups_short": 0.0}


def test_short_of_signal_after_max_rounds_it_fills_with_set_aside_groups_and_says_so():
    batch, metrics = sample_with_signal(3, 2, rounds_of([["1", "3", "2"], ["5", "7", "9"]]), toy_round,
                                        lambda rows: rows)
    assert list(dict.fromkeys(batch["prompt_id"])) == ["2", "1", "3"]
    assert metrics["rollout/rounds"] == 2 and metrics["rollout/groups_short"] == 2


def test_dynamic_sampling_scales_out_and_refuses_zero_rounds(tiny_overrides):
    from stages.errors import ConfigError

    # Every process layout (test_scale_out.py runs it with 2 rollout workers and max_lag 1).
    for scaled in ("distributed.rollout_workers=2", "distributed.trainers=2", "rollout.max_lag=1"):
        load_params(ROOT / "params.yaml", [*tiny_overrides, *ZERO_STD, scaled])
    with pytest.raises(ConfigError, match=r"rollout.dynamic_sampling.max_rounds: Input should be greater than or "
                                          r"equal to 1"):
        load_params(ROOT / "params.yaml", [*tiny_overrides, *ZERO_STD, "rollout.dynamic_sampling.max_rounds=0"])


# --- through `grpo train`: the promise where users meet it -----------------------------------

ITERATIONS = 4


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_tiny_project(tmp_path_factory.mktemp("prepared"), ITERATIONS, ["threads=2", *ZERO_STD])


def iteration_files(root: Path) -> dict[str, str]:
    layout = Layout(root)
    return {f"{i}/{name}": file_digest(layout.iteration(i) / name) for i in range(1, ITERATIONS + 1)
            for name in ("rollouts.parquet", "rewards.parquet", "advantages.parquet")}


@pytest.fixture(scope="module")
def uninterrupted(prepared, env, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs") / "uninterrupted"
    shutil.copytree(prepared, root)
    result = train(root, env)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_a_run_draws_extra_rounds_and_records_them(uninterrupted):
    manifests = [json.loads((Layout(uninterrupted).iteration(i) / "manifest.json").read_text())["metrics"]
                 for i in range(1, ITERATIONS + 1)]
    assert any(m["rollout/rounds"] > 1 for m in manifests)  # the tiny reference is often all wrong
    csv = pd.read_csv(uninterrupted / "metrics" / "iterations.csv")
    assert {"rollout/rounds", "rollout/prompts_consumed", "rollout/groups_dropped"} <= set(csv.columns)
    for i, metrics in enumerate(manifests, 1):
        batch = pd.read_parquet(Layout(uninterrupted).iteration(i) / "rollouts.parquet")
        scored = pd.read_parquet(Layout(uninterrupted).iteration(i) / "rewards.parquet")
        assert batch["prompt_id"].nunique() == 4 and batch["prompt_id"].is_unique is False
        # Every group trained on has a signal, except the ones it says it was short of.
        assert (~groups_with_signal(scored)).sum() == metrics["rollout/groups_short"]
        assert metrics["rollout/prompts_consumed"] >= 4 * metrics["rollout/rounds"] - 4


def test_two_runs_with_dynamic_sampling_are_bit_identical(uninterrupted, prepared, env, tmp_path):
    again = tmp_path / "again"
    shutil.copytree(prepared, again)
    assert train(again, env).returncode == 0
    assert outcome(again) == outcome(uninterrupted)
    assert iteration_files(again) == iteration_files(uninterrupted)


def test_a_run_killed_while_sampling_resumes_to_the_uninterrupted_result(uninterrupted, prepared, env, tmp_path):
    root = tmp_path / "killed"
    shutil.copytree(prepared, root)
    killed = train(root, env, kill_at=("rollout", 3))
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = train(root, env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after iteration 2" in resumed.stdout + resumed.stderr
    assert outcome(root) == outcome(uninterrupted)
    assert iteration_files(root) == iteration_files(uninterrupted)
