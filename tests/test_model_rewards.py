"""Rewards from models (`reward.models`, `reward.judges`): a reward model and an LLM judge, trained
here in seconds to prefer well-formed completions, as components beside the rule-based ones."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, prepare_tiny_project, train
from model_rewards import JUDGE_TEMPLATE, examples
from stages.records.artifacts import Layout
from stages.config import RewardConfig
from stages.params import load_params
from stages.errors import ConfigError, RewardError
from stages.reward import check_model_inputs, score_rollouts
from flows.server import free_port


def _completions(count: int = 48, seed: int = 11) -> pd.DataFrame:
    """The task's prompts with demonstrations and corruptions of them, in groups of 4."""
    rows = examples(count, seed)
    return pd.DataFrame({"prompt_id": [f"p{n // 4}" for n in range(count)], "sample": [n % 4 for n in range(count)],
                         "prompt": [p for p, _, _ in rows], "answer": ["0"] * count,
                         "completion": [c for _, c, _ in rows], "well_formed": [s for *_, s in rows]})


def _cfg(weights: dict[str, float], **sections) -> RewardConfig:
    return RewardConfig(weights=weights, target_language="en", custom=[], timeout_seconds=120, workers=0,
                        overlong_buffer=8, **sections)


def test_a_reward_model_scores_each_completion_as_a_component(format_reward_model):
    completions = _completions()
    scored = score_rollouts(completions, _cfg({"rm": 0.5, "format": 1.0}, models={"rm": str(format_reward_model)}))
    formed = completions["well_formed"] == 1.0
    assert scored["rm"][formed].mean() - scored["rm"][~formed].mean() > 0.5, "the model prefers well-formed ones"
    assert np.allclose(scored["reward"], 0.5 * scored["rm"] + scored["format"])


def test_reward_model_batches_keep_to_groups_so_a_score_does_not_depend_on_its_neighbours(format_reward_model):
    """Reward workers take whole groups: what else is scored with a group must not change its bits."""
    completions = _completions()
    cfg = _cfg({"rm": 1.0}, models={"rm": {"path": str(format_reward_model), "batch_size": 3}})
    together = score_rollouts(completions, cfg)["rm"]
    groups = [group for _, group in completions.groupby("prompt_id", sort=False)]
    alone = pd.concat([score_rollouts(group, cfg) for group in groups])["rm"]
    reordered = score_rollouts(pd.concat(groups[::-1]), cfg)["rm"].loc[completions.index]
    assert together.tolist() == alone.tolist() == reordered.tolist()


def test_a_judge_models_replies_are_parsed_into_scores(format_judge):
    completions = _completions()
    judge = {"model": str(format_judge), "template": JUDGE_TEMPLATE, "max_new_tokens": 1}
    scored = score_rollouts(completions, _cfg({"judge": 1.0}, judges={"judge": judge}))
    assert (scored["judge"] == completions["well_formed"]).mean() >= 0.95


def test_a_reply_without_a_score_stops_naming_the_completion_or_abstains_as_the_params_say(format_judge):
    completions = _completions(8)
    judge = {"model": str(format_judge), "template": JUDGE_TEMPLATE, "max_new_tokens": 1, "parse": r"score=(\d)"}
    with pytest.raises(RewardError, match=r"reward 'judge' raised on prompt_id='p0' sample=0: ValueError: judge "
                                          r"'judge' replied '[01]', in which reward.judges.judge.parse finds no number"):
        score_rollouts(completions, _cfg({"judge": 1.0}, judges={"judge": judge}))
    scored = score_rollouts(completions, _cfg({"judge": 1.0}, judges={"judge": {**judge, "unparsed": "abstain"}}))
    assert scored["judge"].isna().all() and (scored["reward"] == 0).all()


def _two_label_head(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "id2label": {"0": "bad", "1": "good"},
                                                    "label2id": {"bad": 0, "good": 1}}))
    return target


def _pickled(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    (target / "model.safetensors").rename(target / "pytorch_model.bin")
    return target


@pytest.mark.parametrize(("overrides", "message"), [
    (lambda rm, judge, tmp: [f"reward.models.rm={judge}"],
     "reward.models.rm: {judge} is a LlamaForCausalLM, not a sequence-classification reward model"),
    (lambda rm, judge, tmp: [f"reward.models.rm={_two_label_head(rm, tmp / 'two')}"],
     "reward.models.rm: {tmp}/two has a head of 2 labels; a reward model has one"),
    (lambda rm, judge, tmp: [f"reward.models.rm={_pickled(rm, tmp / 'pickled')}"],
     "reward.models.rm: {tmp}/pickled has only pickle weights (pytorch_model.bin), which are never loaded"),
    (lambda rm, judge, tmp: [f"reward.models.rm={tmp}/missing"], "reward.models.rm: {tmp}/missing is not a directory"),
    (lambda rm, judge, tmp: [f"reward.judges.judge={{model: {judge}, template: 'grade {{completion}}'}}"],
     "reward.judges.judge.template: template has no {{prompt}}"),
    (lambda rm, judge, tmp: [f"reward.judges.judge={{model: {judge}, template: '{{prompt}} {{completion}} {{gold}}'}}"],
     "reward.judges.judge.template: template has {{gold}}: its fields are {{prompt}}, {{completion}}, {{answer}}"),
    (lambda rm, judge, tmp: [f"reward.judges.judge={{model: {judge}, url: 'http://127.0.0.1:1/v1', "
                             f"template: '{{prompt}}{{completion}}'}}"],
     "reward.judges.judge: set one of model (a local directory) and url"),
    (lambda rm, judge, tmp: [f"reward.judges.judge={{model: {rm}, template: '{{prompt}}{{completion}}'}}"],
     "reward.judges.judge.model: {rm} is a LlamaForSequenceClassification, not a causal language model"),
])
def test_what_a_model_reward_cannot_use_is_refused_at_params_load_in_one_line(
        format_reward_model, format_judge, tmp_path, overrides, message):
    weights = ["reward.weights={accuracy: 1.0, rm: 1.0}", "reward.weights={accuracy: 1.0, judge: 1.0}"]
    chosen = overrides(format_reward_model, format_judge, tmp_path)
    with pytest.raises(ConfigError) as refused:
        load_params(ROOT / "params.yaml", [*chosen, weights[0] if "models" in chosen[0] else weights[1]])
    expected = message.format(rm=format_reward_model, judge=format_judge, tmp=tmp_path)
    assert expected in str(refused.value) and "\n" not in str(refused.value), str(refused.value)


def test_a_judge_model_that_cannot_hold_a_prompt_and_completion_is_refused_before_any_rollout(format_judge, tmp_path):
    root = prepare_tiny_project(tmp_path, 1, [
        f"reward.judges.judge={{model: {format_judge}, template: '{JUDGE_TEMPLATE}', max_new_tokens: 1}}",
        "reward.weights={judge: 1.0}"])
    params = load_params(root / "params.yaml", ["rollout.max_new_tokens=250", "model.tiny.max_position_embeddings=512"])
    with pytest.raises(ConfigError, match=rf"reward.judges.judge.model: {format_judge} holds 256 tokens, and prompt "
                                          r"row \d+ with rollout.max_new_tokens=250 of completion needs 2\d\d"):
        check_model_inputs(params.reward, Layout(root), params.rollout.max_new_tokens)


def test_a_judge_server_that_does_not_answer_stops_grpo_train_before_any_rollout(env, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    root = prepare_tiny_project(tmp_path, 1, [f"reward.judges.judge={{url: '{url}', template: '{JUDGE_TEMPLATE}'}}",
                                              "reward.weights={accuracy: 1.0, judge: 1.0}"])
    result = train(root, env)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]  # after the flow's own log lines
    assert last.startswith(f"error: reward.judges.judge.url: the server at {url} does not answer"), result.stderr
    assert not (root / "runs" / "iterations").exists()


ITERATIONS = 6


@pytest.fixture(scope="module")
def rewarded_by_the_model(env, format_reward_model, tmp_path_factory):
    """`grpo train` whose only reward is the reward model, measured on the held-out prompts before and after."""
    root = prepare_tiny_project(tmp_path_factory.mktemp("rm-run"), ITERATIONS, [
        f"reward.models.rm={format_reward_model}", "reward.weights={rm: 1.0}", "grpo.lr=0.003",
        "rollout.prompts_per_iteration=8", "rollout.group_size=8", "grpo.minibatch_size=16",
        f"eval.every={ITERATIONS}", "eval.samples=4"])
    result = train(root, env)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_a_run_rewarded_by_a_reward_model_moves_the_policy_where_the_model_points(rewarded_by_the_model):
    metrics = pd.read_csv(rewarded_by_the_model / "metrics" / "iterations.csv").set_index("iteration")
    before, after = metrics.loc[0, "eval/rewards/rm"], metrics.loc[ITERATIONS, "eval/rewards/rm"]
    assert after - before > 0.1, f"held-out reward-model score {before:.3f} -> {after:.3f}"
    assert metrics.loc[ITERATIONS, "rewards/rm"] > metrics.loc[1, "rewards/rm"]


def test_grpo_rescore_recomputes_a_reward_models_scores_bit_for_bit(rewarded_by_the_model):
    """Scored again in a fresh process (a new scoring process, the model loaded anew): the same bits."""
    result = subprocess.run([sys.executable, "-m", "flows.cli", "rescore", "2", "--params",
                             str(rewarded_by_the_model / "params.yaml"), "--root", str(rewarded_by_the_model)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((rewarded_by_the_model / "rescored" / "0002-recorded" / "summary.json").read_text())
    assert summary["unchanged"] is True and summary["advantage_max_abs_change"] == 0.0
