"""The whole pipeline through the CLI on a tiny config: artefacts, their contracts, and re-runs."""

import json
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch

from flows.cli import pipeline, train_step
from stages.records.artifacts import Layout, tree_digest
from stages.model.batching import CompletionBatch, pad_to
from stages.params import load_params
from stages.model.generation import completion_logprobs
from stages.model.modeling import load_pretrained
from stages.objective import group_advantages, grpo_loss

from conftest import ROOT, TINY, without_timings

ROLLOUT_COLUMNS = {"iteration", "prompt_id", "sample", "prompt", "completion", "prompt_ids", "completion_ids",
                   "logprobs", "finish_reason", "completion_length"}
ITERATION_COLUMNS = {"reward", "rewards/accuracy", "rewards/format", "rewards/language", "kl", "clip_ratio/low",
                     "clip_ratio/high", "entropy", "completions/min_length", "completions/mean_length",
                     "completions/max_length", "completions/clipped_ratio", "frac_reward_zero_std", "loss",
                     "grad_norm", "seconds/rollout", "seconds/reward", "seconds/advantage", "seconds/update"}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """One tiny run with the default (eager) forward, shared by the tests that only read it. One
    minibatch, so the loss is recomputable. `compile: true` has its own tests (test_compile.py,
    and a killed compiled run's resume in test_resume.py)."""
    root = tmp_path_factory.mktemp("project")
    overrides = [*TINY, "grpo.minibatch_size=16", "grpo.mu=1", "grpo.beta=0.1"]
    pipeline(load_params(ROOT / "params.yaml", overrides), Layout(root))
    return root, overrides


def test_every_iteration_writes_its_artefacts_and_manifest_last(project):
    root, overrides = project
    layout = Layout(root)
    params = load_params(ROOT / "params.yaml", overrides)
    for iteration in (1, 2):
        folder = layout.iteration(iteration)
        manifest = json.loads((folder / "manifest.json").read_text())
        for name, digest in manifest["outputs"].items():
            assert tree_digest(folder / name) == digest
        assert (folder / "manifest.json").stat().st_mtime_ns >= max(
            (folder / n).stat().st_mtime_ns for n in manifest["outputs"])
    assert sorted(p.name for p in (layout.runs / "checkpoints").iterdir()) == ["0001", "0002"]
    assert (layout.policy / "model.safetensors").is_file()
    assert len(pd.read_csv(layout.metrics / "iterations.csv")) == params.grpo.iterations


def test_rollouts_hold_g_samples_per_prompt_with_token_level_logprobs(project):
    root, overrides = project
    params = load_params(ROOT / "params.yaml", overrides)
    rollouts = pd.read_parquet(Layout(root).iteration(1) / "rollouts.parquet")
    assert ROLLOUT_COLUMNS <= set(rollouts.columns)
    assert len(rollouts) == params.rollout.prompts_per_iteration * params.rollout.group_size
    assert all(sorted(samples) == [0, 1, 2, 3] for samples in rollouts.groupby("prompt_id")["sample"].apply(list))
    assert (rollouts["logprobs"].map(len) == rollouts["completion_length"]).all()
    assert (rollouts["completion_ids"].map(len) == rollouts["completion_length"]).all()
    assert set(rollouts["finish_reason"]) <= {"stop", "length"}
    truncated = rollouts["finish_reason"] == "length"
    assert (rollouts.loc[truncated, "completion_length"] == params.rollout.max_new_tokens).all()


def test_advantages_are_the_group_relative_rewards(project):
    root, _ = project
    folder = Layout(root).iteration(1)
    rewards = pd.read_parquet(folder / "rewards.parquet")
    advantages = pd.read_parquet(folder / "advantages.parquet")
    assert {"accuracy", "format", "language", "reward"} <= set(rewards.columns)
    merged = rewards.merge(advantages, on=["prompt_id", "sample"]).sort_values(["prompt_id", "sample"])
    matrix = torch.tensor(merged["reward"].to_numpy()).view(-1, 4)
    torch.testing.assert_close(torch.tensor(merged["advantage"].to_numpy()).view(-1, 4), group_advantages(matrix))


def test_an_iterations_loss_can_be_recomputed_from_its_files(project):
    root, overrides = project
    layout, params = Layout(root), load_params(ROOT / "params.yaml", overrides)
    folder = layout.iteration(1)
    rollouts = pd.read_parquet(folder / "rollouts.parquet").merge(
        pd.read_parquet(folder / "advantages.parquet"), on=["prompt_id", "sample"])
    reference, tokenizer = load_pretrained(layout.reference, params.model, torch.device("cpu"))
    batch = CompletionBatch.from_lists([list(p) for p in rollouts["prompt_ids"]],
                                       [list(c) for c in rollouts["completion_ids"]], tokenizer.pad_token_id)
    with torch.no_grad():  # iteration 1 starts from the reference: policy = reference = sampler
        logp, _ = completion_logprobs(reference, *batch.as_inputs())
    old_logp = pad_to([list(x) for x in rollouts["logprobs"]], batch.completion_ids.shape[1])
    loss, stats = grpo_loss(logp, old_logp, logp, torch.tensor(rollouts["advantage"].to_numpy(), dtype=torch.float32),
                            batch.completion_mask.float(), beta=params.grpo.beta, loss_agg=params.grpo.loss_agg)
    recorded = json.loads((folder / "update.json").read_text())
    assert loss.item() == pytest.approx(recorded["loss"], abs=1e-5)
    assert recorded["kl"] == pytest.approx(0.0, abs=1e-6)


def test_eval_metrics_are_fractions_for_reference_and_policy(project):
    root, _ = project
    metrics = json.loads((Layout(root).metrics / "eval.json").read_text())
    for key in ("reference_accuracy", "policy_accuracy", "reference_format_rate", "policy_format_rate"):
        assert 0.0 <= metrics[key] <= 1.0


def test_a_rerun_skips_done_iterations_and_a_changed_knob_redoes_them(project, tmp_path):
    root, overrides = project
    shutil.copytree(root, tmp_path / "copy")  # the shared run stays as it was for the other tests
    layout, params = Layout(tmp_path / "copy"), load_params(ROOT / "params.yaml", overrides)
    manifests = [layout.iteration(i) / "manifest.json" for i in (1, 2)]
    written = [m.stat().st_mtime_ns for m in manifests]
    before = {i: tree_digest(layout.iteration(i)) for i in (1, 2)}

    train_step(params, layout)
    assert [m.stat().st_mtime_ns for m in manifests] == written  # nothing redone
    assert {i: tree_digest(layout.iteration(i)) for i in (1, 2)} == before

    train_step(params.model_copy(update={"grpo": params.grpo.model_copy(update={"beta": 0.0})}), layout)
    assert all(m.stat().st_mtime_ns > w for m, w in zip(manifests, written))
    update = json.loads((layout.iteration(1) / "update.json").read_text())
    assert "kl" not in update  # beta = 0: the reference never ran


def test_bad_params_exit_non_zero_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "prepare", "--params", str(ROOT / "params.yaml"), "--root", str(tmp_path),
         "--set", "rollout.group_size=1"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: params: rollout.group_size: Input should be greater than or equal to 2"]
    assert not (tmp_path / "data").exists()


def test_eval_every_adds_a_held_out_curve_and_leaves_the_training_unchanged(project, tmp_path):
    root, overrides = project
    copy = tmp_path / "curve"
    for name in ("data", "models/reference"):
        shutil.copytree(root / name, copy / name)
    layout = Layout(copy)
    train_step(load_params(ROOT / "params.yaml", [*overrides, "eval.every=1", "eval.samples=3"]), layout)

    # The same policy, and the same training metrics, as the run without evaluations.
    assert tree_digest(layout.policy) == tree_digest(Layout(root).policy)
    curve = pd.read_csv(layout.metrics / "iterations.csv")
    plain = pd.read_csv(Layout(root).metrics / "iterations.csv")
    trained = curve[curve.iteration > 0].reset_index(drop=True)
    untimed = without_timings(plain).columns
    pd.testing.assert_frame_equal(trained[untimed], plain[untimed], check_dtype=False)  # row 0 makes ints floats

    # Row 0 is the policy before training, the reference; the last row the final policy: the
    # evaluate stage's two measures of them.
    assert curve.iteration.tolist() == [0, 1, 2]
    assert pd.isna(curve.loc[0, "reward"])
    final = json.loads((Layout(root).metrics / "eval.json").read_text())
    for measure in ("accuracy", "format_rate", "language"):
        assert curve[f"eval/{measure}"].iloc[0] == final[f"reference_{measure}"]
        assert curve[f"eval/{measure}"].iloc[-1] == final[f"policy_{measure}"]
    for column in ("eval/accuracy", "eval/format_rate", "eval/language", "eval/pass_at_3", "eval/mean_at_3"):
        assert curve[column].between(0, 1).all(), column
    assert (curve["eval/pass_at_3"] >= curve["eval/mean_at_3"]).all()  # any of 3 right vs their mean

    # The curve is part of the run's record: the same settings redo nothing; another curve is another
    # run, trained again to the same weights, so that no curve has holes.
    manifests = [layout.iteration(i) / "manifest.json" for i in (1, 2)]
    written = [m.stat().st_mtime_ns for m in manifests]
    train_step(load_params(ROOT / "params.yaml", [*overrides, "eval.every=1", "eval.samples=3"]), layout)
    assert [m.stat().st_mtime_ns for m in manifests] == written
    train_step(load_params(ROOT / "params.yaml", [*overrides, "eval.every=2"]), layout)
    assert all(m.stat().st_mtime_ns > w for m, w in zip(manifests, written))
    assert pd.read_csv(layout.metrics / "iterations.csv")["eval/accuracy"].notna().tolist() == [True, False, True]
    assert tree_digest(layout.policy) == tree_digest(Layout(root).policy)
