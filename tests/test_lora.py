"""`model.lora`: a user's Llama-shaped directory (a 32,000-entry vocabulary, a chat template)
trained through adapters with the real CLI. Only the adapted weights move, the reference is
the base model (adapters off), a killed run resumes bit-identically, and `models/policy` is a
plain model that loads and generates, with its adapter beside it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT, outcome, prepare_tiny_project
from stages.records.artifacts import Layout
from test_resume import train, workspace

sys.path.insert(0, str(ROOT / "benchmarks"))
from workload import model_directory  # noqa: E402  (a ChatML directory, as a user's download looks)

VOCABULARY = 32_000
ADAPTED = ("q_proj", "v_proj")
REWARD = "def digits(prompts, completions, **_):\n    return [sum(c.isdigit() for c in text) / 4 for text in completions]\n"


@pytest.fixture(scope="module")
def env(env, prepared):
    """The session's environment (its Prefect server), with the user's reward module importable."""
    return {**env, "PYTHONPATH": str(prepared)}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    (root / "lora_rewards.py").write_text(REWARD)
    sys.path.insert(0, str(root))  # params name the user's reward module: it must import here too
    model = model_directory(root / "user-model", VOCABULARY, hidden=64, layers=2)
    assert len(AutoTokenizer.from_pretrained(model)) == VOCABULARY
    return prepare_tiny_project(root, 3, [
        f"model.path={model}", "model.lora.r=4", "model.lora.alpha=8", f"model.lora.target_modules={list(ADAPTED)}",
        "rollout.prompts_per_iteration=4", "rollout.group_size=4", "rollout.max_new_tokens=12",
        "grpo.minibatch_size=8", "grpo.lr=0.01", "grpo.beta=0.04", "reward.custom=[lora_rewards:digits]",
        "reward.weights={accuracy: 1.0, format: 0.2, language: 0.0, digits: 1.0}", "eval.max_new_tokens=8"])


@pytest.fixture(scope="module")
def uninterrupted(prepared, env, tmp_path_factory):
    root = workspace(prepared, tmp_path_factory.mktemp("runs"), "uninterrupted")
    result = train(root, env)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_only_the_adapted_weights_move_and_checkpoints_hold_adapters(uninterrupted):
    layout = Layout(uninterrupted)
    checkpoint = layout.checkpoint(3)
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "optimizer.pt").is_file()
    assert not (checkpoint / "model.safetensors").exists()  # the base weights are the reference's
    before = load_file(layout.reference / "model.safetensors")
    after = load_file(layout.policy / "model.safetensors")
    assert after.keys() == before.keys()  # merged: a plain model, no adapter tensors
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved and all(name.split(".")[-2] in ADAPTED for name in moved), sorted(moved)


def test_the_reference_is_the_base_model_with_the_adapters_disabled(uninterrupted):
    from stages.model.adapters import as_reference, load_adapters
    from stages.model.batching import CompletionBatch
    from stages.model.generation import shared_prompt_logprobs

    layout = Layout(uninterrupted)
    base = AutoModelForCausalLM.from_pretrained(layout.reference).eval()
    policy = load_adapters(AutoModelForCausalLM.from_pretrained(layout.reference), layout.checkpoint(3)).eval()
    batch = CompletionBatch.from_lists([[5, 6, 7, 8], [5, 6, 7, 8], [9, 10]], [[11, 12, 13], [14, 15], [16]], pad_id=0)
    with torch.no_grad():
        expected, _ = shared_prompt_logprobs(base, *batch.as_inputs())
        with as_reference(policy) as reference:
            frozen, _ = shared_prompt_logprobs(reference, *batch.as_inputs())
        adapted, _ = shared_prompt_logprobs(policy, *batch.as_inputs())
    assert torch.equal(frozen, expected)
    assert not torch.allclose(adapted, expected)  # the adapters did learn something


def test_a_killed_adapted_run_resumes_to_the_uninterrupted_weights(uninterrupted, prepared, env, tmp_path):
    root = workspace(prepared, tmp_path, "killed")
    killed = train(root, env, kill_at=("update", 2))
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = train(root, env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after iteration 1" in resumed.stdout + resumed.stderr
    assert outcome(root) == outcome(uninterrupted)


def test_the_merged_policy_loads_generates_and_equals_base_plus_adapter(uninterrupted, env, tmp_path):
    from peft import PeftModel

    layout = Layout(uninterrupted)
    evaluated = subprocess.run([sys.executable, "-m", "flows.cli", "evaluate", "--params",
                                str(uninterrupted / "params.yaml"), "--root", str(uninterrupted)],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert (layout.metrics / "eval.json").is_file()

    merged = AutoModelForCausalLM.from_pretrained(layout.policy).eval()
    tokenizer = AutoTokenizer.from_pretrained(layout.policy)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    generated = merged.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > ids["input_ids"].shape[1]

    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(layout.reference),
                                        layout.policy / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(**ids).logits, merged(**ids).logits, atol=1e-5, rtol=1e-5)


def test_target_modules_that_match_nothing_are_one_line_naming_the_key(prepared, env, tmp_path):
    root = workspace(prepared, tmp_path, "typo")
    params = root / "params.yaml"
    params.write_text(params.read_text().replace("- q_proj", "- q_porj").replace("- v_proj", "- v_porj"))
    result = train(root, env)
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: model.lora.target_modules: "), errors
    assert not (Layout(root).runs / "iterations").exists() or not any((Layout(root).runs / "iterations").iterdir())
