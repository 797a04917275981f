"""The decode loop: same tokens as HF generate, log-probs equal to a fresh forward, clean stops."""

import copy

import pytest
import torch
from transformers import DynamicCache

from stages.model.batching import CompletionBatch
from stages.model.generation import completion_logprobs, sample, shared_prompt_logprobs, top_p_filter
from stages.model.modeling import build_tiny_model, build_tokenizer, encode_prompts, prompt_text

PROMPTS = ["What is 12 + 34?", "What is 99 - 10?", "Hi"]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from stages.config import TinyModel
    tokenizer = build_tokenizer()
    shape = TinyModel(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64)
    return build_tiny_model(shape, tokenizer, seed=3).eval(), tokenizer


def test_greedy_with_a_shared_prefill_matches_hf_generate(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = encode_prompts(tokenizer, PROMPTS)
    ours = sample(model, ids, group_size=3, max_new_tokens=10, eos_ids=[tokenizer.eos_token_id],
                  pad_id=tokenizer.pad_token_id, greedy=True)
    batch = tokenizer([prompt_text(tokenizer, p) for p in PROMPTS], return_tensors="pt", padding=True)
    reference = model.generate(**batch, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id)[:, batch["input_ids"].shape[1]:]
    for row in range(len(PROMPTS)):
        expected = reference[row][: ours.lengths[row * 3]]
        for sample_index in range(3):  # greedy: all G samples of a prompt agree
            got = ours.completion_ids[row * 3 + sample_index][: ours.lengths[row * 3 + sample_index]]
            assert torch.equal(got, expected)


def test_kept_logprobs_equal_a_fresh_forward_pass(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = encode_prompts(tokenizer, PROMPTS)
    generator = torch.Generator().manual_seed(0)
    out = sample(model, ids, group_size=4, max_new_tokens=16, eos_ids=[tokenizer.eos_token_id],
                 pad_id=tokenizer.pad_token_id, temperature=0.7, generator=generator)
    completions = [row[:n].tolist() for row, n in zip(out.completion_ids, out.lengths)]
    batch = CompletionBatch.from_lists([i for i in ids for _ in range(4)], completions, tokenizer.pad_token_id)
    with torch.no_grad():
        fresh, _ = completion_logprobs(model, *batch.as_inputs(), temperature=0.7)
    torch.testing.assert_close(fresh * batch.completion_mask, out.logprobs, atol=1e-5, rtol=0)


def test_sharing_each_prompts_forward_gives_the_plain_logprobs_and_gradients(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = encode_prompts(tokenizer, PROMPTS)  # different lengths: left padding differs by prompt
    out = sample(model, ids, group_size=3, max_new_tokens=12, eos_ids=[tokenizer.eos_token_id],
                 pad_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(1))
    completions = [row[:n].tolist() for row, n in zip(out.completion_ids, out.lengths)]
    order = torch.randperm(len(completions), generator=torch.Generator().manual_seed(2))  # as a minibatch
    batch = CompletionBatch.from_lists([ids[i // 3] for i in order], [completions[i] for i in order],
                                       tokenizer.pad_token_id)
    mask = batch.completion_mask

    def logprobs_and_grads(fn):
        model.zero_grad()
        logp, entropy = fn(model, *batch.as_inputs(), temperature=0.7, with_entropy=True)
        (logp * mask * torch.linspace(-1, 1, mask.shape[1])).sum().backward()
        return logp * mask, entropy * mask, [p.grad.clone() for p in model.parameters()]

    plain, shared = logprobs_and_grads(completion_logprobs), logprobs_and_grads(shared_prompt_logprobs)
    torch.testing.assert_close(shared[0], plain[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(shared[1], plain[1], atol=1e-5, rtol=0)
    for got, expected in zip(shared[2], plain[2]):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    model.zero_grad()


def test_sampling_is_reproducible_from_the_generator_seed(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = encode_prompts(tokenizer, PROMPTS)
    draws = [sample(model, ids, group_size=4, max_new_tokens=8, eos_ids=[tokenizer.eos_token_id],
                    pad_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(seed)).completion_ids
             for seed in (1, 1, 2)]
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])


def test_a_sequence_stops_at_eos_and_is_padded_after_it(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = encode_prompts(tokenizer, PROMPTS)
    # Make every token an eos candidate by naming the model's likeliest tokens as eos ids.
    probe = sample(model, ids, group_size=1, max_new_tokens=1, eos_ids=[tokenizer.eos_token_id],
                   pad_id=tokenizer.pad_token_id, greedy=True).completion_ids[:, 0].tolist()
    out = sample(model, ids, group_size=2, max_new_tokens=8, eos_ids=probe, pad_id=tokenizer.pad_token_id,
                 greedy=True)
    assert out.lengths.tolist() == [1] * 6
    assert out.stopped.all()
    assert out.completion_ids.shape[1] == 1  # the batch stopped as soon as all had ended


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(top_p_filter(logits, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.1)).tolist() == [[True, False, False, False]]
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_rows_that_end_early_leave_the_batch_and_the_rest_decode_as_before(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    model = copy.deepcopy(model)
    with torch.no_grad():  # the untrained model repeats one token; noise makes greedy completions differ
        for weight in model.parameters():
            weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
    ids = encode_prompts(tokenizer, PROMPTS)
    kwargs = dict(group_size=3, max_new_tokens=10, pad_id=tokenizer.pad_token_id, greedy=True)
    full = sample(model, ids, eos_ids=[tokenizer.eos_token_id], **kwargs)
    assert not full.stopped.any()
    # Make the third token of the first prompt's completion an eos id: its rows end early.
    stop = int(full.completion_ids[0, 2])
    dropped = []
    select = DynamicCache.batch_select_indices
    monkeypatch.setattr(DynamicCache, "batch_select_indices",
                        lambda self, keep: (dropped.append(len(keep)), select(self, keep))[1])
    out = sample(model, ids, eos_ids=[stop], **kwargs)
    assert dropped, "no rows were dropped from the batch"
    for row in range(len(ids) * 3):
        tokens = full.completion_ids[row].tolist()
        length = tokens.index(stop) + 1 if stop in tokens else len(tokens)
        assert out.lengths[row] == length and bool(out.stopped[row]) == (stop in tokens)
        assert out.completion_ids[row, :length].tolist() == tokens[:length]
        assert (out.completion_ids[row, length:] == tokenizer.pad_token_id).all()
        torch.testing.assert_close(out.logprobs[row, :length], full.logprobs[row, :length], atol=1e-5, rtol=0)
        assert (out.logprobs[row, length:] == 0).all()


def test_a_shared_prompt_step_is_bit_identical_at_two_threads_at_the_default_width():
    """The default model (hidden 128, 4 layers) and minibatch (32 completions of 16 prompts):
    big enough for torch to split kernels over threads (its grain is 32,768 elements; each
    layer's selected keys here hold ~57,000). Selecting each row's prompt KV by indexing made 10
    of 30 identical steps round differently at two threads; it must be 30 of 30 the same."""
    from stages.params import load_params
    from conftest import ROOT

    shape = load_params(ROOT / "params.yaml").model.tiny
    tokenizer = build_tokenizer()
    model = build_tiny_model(shape, tokenizer, seed=0)
    draw = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 100, (int(torch.randint(12, 18, (1,), generator=draw)),), generator=draw).tolist()
               for _ in range(16)]
    completions = [torch.randint(4, 100, (int(torch.randint(5, 30, (1,), generator=draw)),), generator=draw).tolist()
                   for _ in range(32)]
    # As `grpo.minibatches: completions` draws them: 32 of the 16 x 8 completions, shuffled, so
    # both threads' halves of the batch add into the same prompts' keys.
    rows = torch.randperm(128, generator=draw)[:32].tolist()
    batch = CompletionBatch.from_lists([prompts[row // 8] for row in rows], completions, tokenizer.pad_token_id)
    assert 32 * shape.hidden_size * 12 > 32768  # rows x width x shortest prompt: past the grain, kernels split

    def gradient() -> bytes:
        model.zero_grad()
        logp, _ = shared_prompt_logprobs(model, *batch.as_inputs(), with_entropy=True)
        (logp * batch.completion_mask).sum().backward()
        return b"".join(p.grad.numpy().tobytes() for p in model.parameters())

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first = gradient()
        assert all(gradient() == first for _ in range(29))
    finally:
        torch.set_num_threads(threads)


def test_the_kv_cache_is_passed_as_the_installed_transformers_names_it(model_and_tokenizer):
    """Recent transformers renamed `past_key_values` to `cache` and warns on the old name; a real
    run's log was mostly that warning. Neither the decode loop nor the shared-prompt forward may
    trigger it."""
    import logging

    from transformers.utils import logging as hf_logging

    model, tokenizer = model_and_tokenizer
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logging.warning_once.cache_clear()  # it says everything once per process: let it speak again
    hf_logging.get_logger("transformers").addHandler(handler)
    try:
        ids = encode_prompts(tokenizer, PROMPTS)
        out = sample(model, ids, group_size=2, max_new_tokens=6, eos_ids=[tokenizer.eos_token_id],
                     pad_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(0))
        completions = [row[:n].tolist() for row, n in zip(out.completion_ids, out.lengths)]
        batch = CompletionBatch.from_lists([i for i in ids for _ in range(2)], completions, tokenizer.pad_token_id)
        shared_prompt_logprobs(model, *batch.as_inputs())
    finally:
        hf_logging.get_logger("transformers").removeHandler(handler)
    assert not [r.getMessage() for r in records if "past_key_values" in r.getMessage()]
