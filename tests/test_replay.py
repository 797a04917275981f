"""`grpo replay` and `grpo rescore`: an iteration's update and rewards recomputed from its files alone,
exactly under the recorded settings, side by side under changed ones, never over the run's files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT, clean_env, prepare_tiny_project
from stages.records.artifacts import Layout, tree_digest
from stages.params import load_params
from stages.replay import replay
from stages.rescore import rescore

ITERATIONS = 3


def run_files(root: Path) -> tuple[str, str]:
    """The run's iterations and checkpoints (runs/.lock names whoever last held the project)."""
    return tree_digest(root / "runs" / "iterations"), tree_digest(root / "runs" / "checkpoints")


def grpo(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args, "--params", str(root / "params.yaml"),
                           "--root", str(root)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished three-iteration run (keep_last 2: iteration 1's checkpoint is pruned) through `grpo train`."""
    root = prepare_tiny_project(tmp_path_factory.mktemp("run"), ITERATIONS,
                                ["threads=2", "grpo.mu=2", "checkpoints.keep_last=2"])
    result = grpo(root, "train", env=clean_env(tmp_path_factory.mktemp("state")))
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_replay_reproduces_every_recorded_step_bit_for_bit(finished):
    params = load_params(finished / "params.yaml")
    for iteration in (1, ITERATIONS):  # from the reference, and from a checkpoint with its optimizer state
        outcome = replay(params, Layout(finished), iteration)
        recorded = json.loads((Layout(finished).iteration(iteration) / "update.json").read_text())
        assert outcome["exact"] is True
        assert outcome["replayed"]["first_step"]["loss"] == recorded["steps"][0]["loss"]
        assert outcome["replayed"]["first_step"]["grad_norm"] == recorded["steps"][0]["grad_norm"]


def test_replay_under_another_objective_shows_both_and_writes_nothing(finished):
    before = run_files(finished)
    result = grpo(finished, "replay", str(ITERATIONS), "--set", "grpo.loss_agg=dr_grpo", "--set", "grpo.beta=0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exact: True" in result.stdout
    assert "recorded" in result.stdout and "replayed" in result.stdout and "changed" in result.stdout
    outcome = replay(load_params(finished / "params.yaml"), Layout(finished), ITERATIONS,
                     load_params(finished / "params.yaml", ["grpo.loss_agg=dr_grpo", "grpo.beta=0.5"]))
    assert outcome["changed"]["first_step"]["loss"] != outcome["replayed"]["first_step"]["loss"]
    assert run_files(finished) == before


def test_rescore_under_the_recorded_settings_changes_nothing(finished):
    before = run_files(finished)
    result = grpo(finished, "rescore", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((finished / "rescored" / "0002-recorded" / "summary.json").read_text())
    assert summary["unchanged"] is True and summary["advantage_max_abs_change"] == 0.0
    assert summary["gained_signal"] == [] and summary["lost_signal"] == []
    assert run_files(finished) == before


def test_rescore_under_other_weights_writes_the_new_scores_under_a_new_name(finished):
    params = load_params(finished / "params.yaml")
    changed = load_params(finished / "params.yaml", ["reward.weights.format=1.0", "reward.weights.accuracy=0.0"])
    summary = rescore(params, Layout(finished), 2, changed, "format-only")
    target = finished / "rescored" / "0002-format-only"
    rewards = pd.read_parquet(target / "rewards.parquet")
    assert (rewards["reward"] == rewards["format"]).all()
    assert summary["mean"]["reward"][1] == pytest.approx(rewards["format"].mean())
    assert summary["unchanged"] is False
    assert summary["zero_std_groups"][1] == int(pd.read_parquet(target / "advantages.parquet")["zero_std_group"].sum()
                                                // params.rollout.group_size)


def test_grpo_rescore_scores_a_finished_run_with_a_reward_model(finished, format_reward_model):
    before = run_files(finished)
    result = grpo(finished, "rescore", "2", "--set", f"reward.models.rm={format_reward_model}",
                  "--set", "reward.weights.rm=1.0", "--name", "with-rm")
    assert result.returncode == 0, result.stderr[-3000:]
    rescored = pd.read_parquet(finished / "rescored" / "0002-with-rm" / "rewards.parquet")
    recorded = pd.read_parquet(Layout(finished).iteration(2) / "rewards.parquet")
    assert rescored["rm"].notna().all() and rescored["rm"].std() > 0
    assert (rescored["reward"] - recorded["reward"] - rescored["rm"]).abs().max() < 1e-9
    assert run_files(finished) == before


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("args", "message"), [
    (["replay", "9"], "iteration 9: {root}/runs/iterations/0009/manifest.json does not exist (done: 1..3)"),
    (["replay", "2"], "iteration 2 started from {root}/runs/checkpoints/0001, which is no longer kept "
                      "(checkpoints.keep_last=2"),
    (["replay", "3", "--set", "reward.weights.format=1"], "grpo replay --set reward.weights.format: only grpo.* keys"),
    (["rescore", "3", "--set", "grpo.beta=0"], "grpo rescore --set grpo.beta: only reward.* keys"),
    (["replay", "3", "--set", "grpo.kl_estimator=k4"], "params: grpo.kl_estimator: Input should be 'k1', 'k2' or 'k3'"),
])
def test_what_cannot_be_replayed_is_one_line(finished, args, message):
    result = grpo(finished, *args)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and message.format(root=finished) in result.stderr, result.stderr


def test_replay_and_rescore_of_altered_files_are_refused(finished, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    flip_a_byte(copy / "runs" / "iterations" / "0003" / "advantages.parquet")
    for command in ("replay", "rescore"):
        result = grpo(copy, command, "3")
        assert result.returncode == 1 and result.stderr.count("\n") == 1
        assert f"{copy}/runs/iterations/0003/advantages.parquet does not match its digest in manifest.json" in result.stderr
    (copy / "params.yaml").write_text((copy / "params.yaml").read_text().replace("beta: 0.04", "beta: 0.05"))
    result = grpo(copy, "replay", "1")
    assert result.returncode == 1 and "iteration 1 ran with other inputs: the params" in result.stderr
