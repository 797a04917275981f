"""Log-probs read through the LM head a chunk at a time: the full computation's values and
gradients, for tied and untied heads and models that change their logits, and never a
[rows, positions, vocabulary] tensor."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

import stages.model.logprobs as logprobs
from stages.model.batching import CompletionBatch
from stages.model.generation import completion_logprobs, shared_prompt_logprobs
from stages.model.logprobs import head_logprobs, readout


def full_logprobs(hidden, head, targets, temperature):
    """The computation the chunked one replaces: every logit at once."""
    logp = torch.log_softmax(head(hidden).float() / temperature, dim=-1)
    return logp.gather(-1, targets[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("bias", [False, True])
def test_chunked_head_logprobs_equal_the_full_ones_with_their_gradients(monkeypatch, bias):
    monkeypatch.setattr(logprobs, "CHUNK_LOGITS", 7 * 50)  # 7 positions a chunk: 6 chunks, the last short
    draw = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 10, 16, generator=draw, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=bias)
    targets = torch.randint(0, 50, (4, 10), generator=draw)
    weights = torch.randn(4, 10, generator=draw)  # an arbitrary downstream loss

    def run(fn):
        hidden.grad = None
        head.zero_grad()
        logp, entropy = fn()
        (logp * weights).sum().backward()
        return [logp, entropy, hidden.grad] + [p.grad for p in head.parameters()]

    chunked = run(lambda: head_logprobs(hidden, head, targets, temperature=0.7, with_entropy=True))
    full = run(lambda: full_logprobs(hidden, head, targets, 0.7))
    for got, expected in zip(chunked, full, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def tiny_llama(tie: bool, vocab: int = 300) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie, pad_token_id=0)
    return LlamaForCausalLM(config)


def tiny_gemma2() -> Gemma2ForCausalLM:
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                          final_logit_softcapping=5.0, pad_token_id=0)
    return Gemma2ForCausalLM(config)


def a_batch(vocab: int) -> CompletionBatch:
    draw = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, vocab, (n,), generator=draw).tolist() for n in (5, 9, 5, 9, 7, 5)]
    prompts[2] = prompts[0]  # shared prompts, as in a GRPO minibatch
    prompts[3] = prompts[1]
    completions = [torch.randint(1, vocab, (n,), generator=draw).tolist() for n in (6, 11, 3, 11, 8, 1)]
    return CompletionBatch.from_lists(prompts, completions, pad_id=0)


def logits_path(model, batch, temperature):
    """Log-probs from the model's own logits, as before the chunked head."""
    ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
    mask = torch.cat([batch.prompt_mask, batch.completion_mask], dim=1)
    width = batch.completion_ids.shape[1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                   logits_to_keep=width + 1).logits[:, :-1]
    logp = torch.log_softmax(logits.float() / temperature, -1)
    return logp.gather(-1, batch.completion_ids[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("build", [lambda: tiny_llama(tie=True), lambda: tiny_llama(tie=False), tiny_gemma2],
                         ids=["tied-head", "untied-head", "soft-capped-logits"])
@pytest.mark.parametrize("fn", [completion_logprobs, shared_prompt_logprobs], ids=["plain", "shared-prompt"])
def test_a_models_logprobs_and_gradients_are_those_of_its_own_logits(monkeypatch, build, fn):
    monkeypatch.setattr(logprobs, "CHUNK_LOGITS", 5 * 300)  # several chunks
    model = build()
    batch = a_batch(model.config.vocab_size)
    mask = batch.completion_mask.float()
    weights = torch.linspace(-1, 1, mask.shape[1])

    def run(compute):
        model.zero_grad()
        logp, entropy = compute()
        (logp * mask * weights).sum().backward()
        return [logp * mask, entropy * mask] + [p.grad.clone() for p in model.parameters()]

    ours = run(lambda: fn(model, *batch.as_inputs(), temperature=0.7, with_entropy=True))
    theirs = run(lambda: logits_path(model, batch, 0.7))
    for got, expected in zip(ours, theirs, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # Gemma's soft-capped logits are not its head's output: read from its logits instead.
    assert (readout(model).head is None) == (build is tiny_gemma2)


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op produced while active."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.most = max(self.most, tensor.numel())
        return out


def test_a_large_vocabulary_never_makes_a_tensor_of_every_positions_logits(monkeypatch):
    vocab = 50_000
    monkeypatch.setattr(logprobs, "CHUNK_LOGITS", 4 * vocab)  # the default's 64 MiB would hold this whole batch
    model = tiny_llama(tie=True, vocab=vocab)
    batch = a_batch(vocab)
    rows, width = batch.completion_ids.shape
    with LargestTensor() as largest:
        logp, _ = shared_prompt_logprobs(model, *batch.as_inputs(), with_entropy=True)
        logp.sum().backward()
    # The largest tensors are the head's weight and its gradient (vocabulary × hidden 32), not
    # the batch's logits (vocabulary × 66 positions).
    assert largest.most == vocab * model.config.hidden_size < rows * width * vocab


def test_a_model_read_from_is_not_kept_alive_by_its_readout():
    import gc
    import weakref

    model = tiny_llama(tie=True)
    readout(model)
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None
