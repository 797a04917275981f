"""`compile: true`: the policy's and reference's forward compiled by torch.compile compute what the
eager model does. Same samples, same log-probs, same update: only the speed changes.
"""

import copy

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM

from stages.errors import ModelError
from stages.model.generation import sample
from stages.model.modeling import compile_forward, encode_prompts
from stages.update import TrainState, update

from conftest import ROOT
from test_update import G, LR, PROMPTS, make_iteration_files, params_for


@pytest.fixture(scope="module")
def iteration_files(tmp_path_factory):
    # One decoder layer, as the tests' tiny pipeline (conftest.TINY): compiling is most of these
    # tests' time, and one layer compiles faster than two (170 -> 113 s on a 2-core AVX2 CPU).
    return make_iteration_files(tmp_path_factory, num_layers=1)


def test_a_compiled_model_samples_the_same_completions_with_the_same_logprobs(iteration_files):
    _, model, tokenizer = iteration_files
    compiled = compile_forward(copy.deepcopy(model))
    ids = encode_prompts(tokenizer, PROMPTS)
    graphs = counters["stats"]["unique_graphs"]
    runs = [sample(m, ids, group_size=G, max_new_tokens=10, eos_ids=[tokenizer.eos_token_id],
                   pad_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(0))
            for m in (model, compiled)]
    eager, fused = runs
    assert counters["stats"]["unique_graphs"] > graphs  # the compiled model did run compiled code
    assert torch.equal(eager.completion_ids, fused.completion_ids)
    assert torch.equal(eager.lengths, fused.lengths)
    torch.testing.assert_close(fused.logprobs, eager.logprobs, atol=1e-5, rtol=0)


def test_a_compiled_policy_and_reference_update_the_policy_as_the_eager_ones(iteration_files):
    layout, model, tokenizer = iteration_files
    params = params_for("grpo", beta=0.1, minibatches="completions")
    after = {}
    for mode in ("eager", "compiled"):
        policy, reference = copy.deepcopy(model), copy.deepcopy(model)
        if mode == "compiled":
            compile_forward(policy), compile_forward(reference)
        optimizer = torch.optim.SGD(policy.parameters(), lr=LR)
        metrics = update(params, layout, 1, TrainState(policy, tokenizer, optimizer), reference)
        after[mode] = [p.detach() for p in policy.parameters()], metrics
    (eager, eager_metrics), (fused, fused_metrics) = after["eager"], after["compiled"]
    for got, want in zip(fused, eager):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert fused_metrics["kl"] == pytest.approx(eager_metrics["kl"], abs=1e-6)
    assert max((p - start).abs().max() for p, start in zip(eager, model.parameters())) > 1e-3  # it did step


def test_a_model_torch_compile_cannot_build_fails_with_one_line_naming_the_key():
    # inductor's own fault injection: its C++ build fails on any graph with a relu in it.
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, hidden_act="relu")
    model = compile_forward(LlamaForCausalLM(config).eval())
    with torch._inductor.config.patch({"cpp.inject_relu_bug_TESTING_ONLY": "compile_error",
                                       "force_disable_caches": True}):
        with pytest.raises(ModelError) as failure:
            model(input_ids=torch.tensor([[1, 2, 3]]))
    message = str(failure.value)
    assert message.startswith("compile: torch.compile failed on this model") and "compile: false" in message
    assert "\n" not in message
