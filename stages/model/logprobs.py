"""Per-token log-probs and entropy from a causal LM's final hidden states, a chunk of positions at a time.

At a real vocabulary the logits are the run's biggest tensor: a minibatch of 32 completions
of 256 tokens over Qwen2.5's 151,936 entries is 5 GB in fp32, and the log-softmax, the
entropy and their backward each want a copy more. Here the LM head is applied to a chunk of
positions at a time: the forward keeps one log-prob (and one entropy) per position, and the
backward recomputes each chunk's logits from the saved hidden states instead of keeping
them (what Liger's fused linear cross-entropy does, in plain torch). The memory is a chunk ×
the vocabulary (64 MiB) whatever the minibatch; the price is the head's matmul once more.
At a small vocabulary the whole batch is one chunk.
"""

from __future__ import annotations

import functools
import inspect
import weakref

import torch
from torch import Tensor, nn
from transformers import Cache

CHUNK_LOGITS = 1 << 24  # logits per chunk: 64 MiB in fp32


def positions_per_chunk(vocabulary: int) -> int:
    return max(1, CHUNK_LOGITS // vocabulary)


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    logits = nn.functional.linear(hidden, weight, bias).float()
    return logits if temperature == 1.0 else logits.div_(temperature)


class _HeadLogprobs(torch.autograd.Function):
    """log softmax(hidden @ weightᵀ + bias) / temperature at `targets`, the logits never whole."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float,
                chunk: int, with_entropy: bool) -> tuple[Tensor, Tensor]:
        rows = hidden.shape[0]
        logp = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(rows if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        for start in range(0, rows, chunk):
            part = slice(start, start + chunk)
            logits = _chunk_logits(hidden[part], weight, bias, temperature)
            all_logp = logits.log_softmax(-1)
            logp[part] = all_logp.gather(-1, targets[part, None]).squeeze(-1)
            if with_entropy:
                entropy[part] = -(all_logp.exp() * all_logp).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_logp: Tensor, _grad_entropy: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, targets = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            part = slice(start, start + ctx.chunk)
            grad = grad_logp[part, None].float()
            # d log p(target) / d logits = onehot(target) - softmax, times the incoming gradient.
            grad_logits = _chunk_logits(hidden[part], weight, bias, ctx.temperature).softmax(-1).mul_(-grad)
            grad_logits.scatter_add_(-1, targets[part, None], grad)  # one index per row: no collisions
            if ctx.temperature != 1.0:
                grad_logits.div_(ctx.temperature)
            if need_hidden:
                grad_hidden[part] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_weight:  # added chunk after chunk, in order: the same sum at any thread count
                grad_weight.addmm_(grad_logits.T, hidden[part].float())
            if need_bias:
                grad_bias += grad_logits.sum(0)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None, None)


def head_logprobs(hidden: Tensor, head: nn.Linear, targets: Tensor, temperature: float = 1.0,
                  with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-probs of `targets` [B, T] given the final hidden states [B, T, H] that predict them.

    Equal to `log_softmax(head(hidden) / temperature).gather(targets)` (and its entropy) up to
    float summation order, gradient included, but never holding more than one chunk of logits.
    """
    shape = targets.shape
    logp, entropy = _HeadLogprobs.apply(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias,
                                        targets.reshape(-1), temperature, positions_per_chunk(head.out_features),
                                        with_entropy)
    return logp.view(shape), entropy.view(shape) if with_entropy else None


def cache_argument(model: nn.Module, cache: Cache | None) -> dict[str, Cache | None]:
    """The KV cache as this transformers version names the argument: `cache` in recent 5.x, where the
    older `past_key_values` still works but warns at every call; `past_key_values` before that."""
    if hasattr(model, "get_base_model"):  # peft's wrapper takes **kwargs: ask the model it wraps
        model = model.get_base_model()
    return {_cache_name(type(model)): cache}


@functools.cache
def _cache_name(model_class: type) -> str:
    # Once per class: the decode loop asks at every step.
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


@torch.compiler.disable  # a probe, not a shape worth a compiled graph (and a recompile) of its own
def _exact_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """The model's body and LM head when its logits are exactly head(body(...)), as a probe shows."""
    head = model.get_output_embeddings()
    try:
        body = model.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    if not isinstance(head, nn.Linear) or body is None:
        return None
    # Some models scale or soft-cap their logits after the head (Gemma's final_logit_softcapping,
    # Cohere's logit_scale, Granite's logits_scaling): ask the model instead of listing them.
    probe = torch.tensor([[0, 1]], device=head.weight.device)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=probe).logits.float()
            ours = head(body(input_ids=probe).last_hidden_state).float()
    except Exception:  # a body that takes other arguments: the model's own forward, then
        return None
    finally:
        model.train(training)
    return (body, head) if torch.allclose(ours, logits, rtol=1e-4, atol=1e-4) else None


class Readout:
    """Where a model's log-probs are read from: its final hidden states through the chunked head,
    or, for a model whose logits are more than its head's output, its logits (held whole).

    `states(...)` runs the model and returns the [B, T, ·] tensor the log-probs come from, so
    callers can slice and join positions without caring which it is.
    """

    def __init__(self, model: nn.Module) -> None:
        # Weakly: `readout` keeps one Readout per model in a WeakKeyDictionary, whose values must
        # not hold their key alive (every model a process ever read from would stay in memory).
        self._model = weakref.ref(model)
        self.body, self.head = _exact_head(model) or (None, None)

    @property
    def model(self) -> nn.Module:
        return self._model()

    def states(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, keep: int = 0,
               cache: Cache | None = None) -> Tensor:
        """The last `keep` positions' hidden states (or logits); 0: every position. With a `cache`,
        the positions continue the ones it holds, and it is filled with these."""
        # One set of arguments for every call: under `compile: true` each new set is a recompile.
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  **cache_argument(self.model, cache), "use_cache": cache is not None}
        if self.head is None:
            return self.model(**inputs, logits_to_keep=keep).logits
        hidden = self.body(**inputs).last_hidden_state
        return hidden[:, -keep:] if keep else hidden

    def logprobs(self, states: Tensor, targets: Tensor, temperature: float = 1.0,
                 with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        if self.head is not None:
            return head_logprobs(states, self.head, targets, temperature, with_entropy)
        logp = (states.float() / temperature).log_softmax(-1)
        entropy = None
        if with_entropy:
            with torch.no_grad():
                entropy = -(logp.exp() * logp).sum(-1)
        return logp.gather(-1, targets[..., None]).squeeze(-1), entropy


_READOUTS: weakref.WeakKeyDictionary[nn.Module, Readout] = weakref.WeakKeyDictionary()


def readout(model: nn.Module) -> Readout:
    """The model's Readout, probed once per model object."""
    if model not in _READOUTS:
        _READOUTS[model] = Readout(model)
    return _READOUTS[model]
