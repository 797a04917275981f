"""`precision`: which forwards run in bf16, over fp32 master weights; refused where it cannot run."""

import copy

import pytest
import torch

import stages.model.modeling as modeling
from stages.errors import ModelError
from stages.model.generation import shared_prompt_logprobs
from stages.model.modeling import autocast, compute_dtype
from stages.update import TrainState, load_update_batch, update

from test_update import LR, iteration_files, params_for  # noqa: F401 (a fixture)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_is_bf16_on_cuda_and_fp32_on_cpu_and_fp32_is_fp32_everywhere():
    assert compute_dtype(CUDA, "auto") is torch.bfloat16
    assert compute_dtype(CPU, "auto") is None
    assert compute_dtype(CUDA, "fp32") is None and compute_dtype(CPU, "fp32") is None


def test_bf16_on_a_cpu_without_bf16_units_is_one_line_naming_the_key(monkeypatch):
    monkeypatch.setattr(modeling, "cpu_has_bf16", lambda: False)
    with pytest.raises(ModelError) as refused:
        compute_dtype(CPU, "bf16")
    assert str(refused.value).startswith("precision: bf16: this CPU has no bf16 units")
    assert "use auto or fp32" in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.skipif(not modeling.cpu_has_bf16(), reason="this CPU has no bf16 units")
def test_bf16_on_cpu_runs_the_forwards_in_bf16_and_keeps_fp32_weights(iteration_files):
    layout, model, tokenizer = iteration_files
    batch = load_update_batch(layout, 1, tokenizer.pad_token_id).inputs
    with torch.no_grad():
        full, _ = shared_prompt_logprobs(model, *batch.as_inputs())
        with autocast(CPU, "bf16"):
            half, _ = shared_prompt_logprobs(model, *batch.as_inputs())
    mask = batch.completion_mask.bool()
    difference = (full - half)[mask].abs()
    assert 0 < difference.max() < 0.1  # bf16 matmuls: close, not equal

    params = params_for("grpo", beta=0.1).model_copy(update={"precision": "bf16"})
    policy = copy.deepcopy(model)
    update(params, layout, 1, TrainState(policy, tokenizer, torch.optim.SGD(policy.parameters(), lr=LR)), model)
    assert all(p.dtype == torch.float32 for p in policy.parameters())  # master weights stay fp32
    assert any(not torch.equal(p, q) for p, q in zip(policy.parameters(), model.parameters()))
