"""Batched sampling and per-token log-probs, over any Hugging Face causal LM.

A lean decode loop instead of `generate`: each prompt is prefilled once and its KV cache
shared by its G samples; a sequence stops at an eos id and the batch when all have; and the
log-prob of each sampled token (under the temperature-scaled distribution the loss uses) is
kept, so the update needs no second forward pass for `logp_old`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from stages.model.logprobs import cache_argument, readout


@dataclass
class Samples:
    completion_ids: torch.Tensor  # [N, T] right-padded with pad_id, eos included
    logprobs: torch.Tensor  # [N, T] log-prob of each sampled token, 0 on padding
    lengths: torch.Tensor  # [N] tokens per completion, eos included
    stopped: torch.Tensor  # [N] True when the completion ended with an eos id


def pad_rows(rows: list, width: int, value: float, *, left: bool = False,
             dtype: torch.dtype = torch.long) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of varying length as one [N, width] tensor and its 0/1 mask, padded on the right (or left).

    One vectorised scatter instead of a tensor per row: a GRPO batch has hundreds of rows.
    """
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    columns = np.arange(width)
    mask = columns >= width - lengths[:, None] if left else columns < lengths[:, None]
    values = np.full((len(rows), width), value, dtype=torch.empty(0, dtype=dtype).numpy().dtype)
    if lengths.sum():
        values[mask] = np.concatenate([np.asarray(row) for row in rows if len(row)])
    return torch.from_numpy(values), torch.from_numpy(mask.astype(np.int64))


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_rows(sequences, max(len(s) for s in sequences), pad_id, left=True)


def select_rows(cache: DynamicCache, rows: torch.Tensor) -> None:
    """Give row i of the batch the cached keys and values of row `rows[i]` (its prompt), under grad.

    `index_select`, not the cache's own `batch_select_indices` (advanced indexing): indexing's
    backward is `index_put_(accumulate=True)`, which on CPU adds into a large tensor from
    several threads at once with atomics, so two runs of the same step round differently at
    two threads or more (seen at the default model: 10 of 30 identical steps gave other
    gradients). `index_select`'s backward, `index_add_`, adds in index order whatever the threads.
    """
    for layer in cache.layers:
        if isinstance(getattr(layer, "keys", None), torch.Tensor):
            layer.keys, layer.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)
        else:  # a layer that keeps its tensors otherwise: its own way
            layer.batch_select_indices(rows)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding, as `generate` computes them."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask the tail outside the smallest set of tokens whose probability reaches top_p."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p  # keep at least the top token
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


@torch.inference_mode()
def sample(
    model: PreTrainedModel,
    prompt_ids: list[list[int]],
    *,
    group_size: int,
    max_new_tokens: int,
    eos_ids: list[int],
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> Samples:
    """`group_size` completions per prompt, rows grouped by prompt: [p0s0, p0s1, ..., p1s0, ...]."""
    device = model.device
    ids, mask = left_pad(prompt_ids, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    cache = DynamicCache(config=model.config)  # filled in place by every forward below
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                **cache_argument(model, cache), use_cache=True, logits_to_keep=1)
    if group_size > 1:
        cache.batch_repeat_interleave(group_size)
    logits = out.logits[:, -1].float().repeat_interleave(group_size, dim=0)
    mask = mask.repeat_interleave(group_size, dim=0)
    next_position = positions(mask)[:, -1] + 1

    n = logits.shape[0]
    eos = torch.tensor(eos_ids, device=device)
    tokens = torch.full((n, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((n, max_new_tokens), device=device)
    lengths = torch.full((n,), max_new_tokens, dtype=torch.long, device=device)
    stopped = torch.zeros(n, dtype=torch.bool, device=device)  # ended with an eos id
    rows = torch.arange(n, device=device)  # the row (of the n) that each row of the batch decodes
    done = torch.zeros(n, dtype=torch.bool, device=device)  # per row of the batch
    compactable = all(hasattr(layer, "batch_select_indices") for layer in cache.layers)

    for step in range(max_new_tokens):
        scaled = F.log_softmax(logits / temperature, dim=-1)
        if greedy:
            token = scaled.argmax(-1)
        else:
            probs = top_p_filter(scaled, top_p).softmax(-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        token = token.masked_fill(done, pad_id)
        tokens[rows, step] = token
        logprobs[rows, step] = scaled.gather(-1, token[:, None]).squeeze(-1).masked_fill(done, 0.0)
        ended = ~done & torch.isin(token, eos)
        lengths[rows[ended]] = step + 1
        stopped[rows[ended]] = True
        done |= ended
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        # Ended rows would cost a full row of compute on every later step: once they are a
        # quarter of the batch, drop them (the cache copy this takes is worth it no sooner).
        if compactable and 4 * int(done.sum()) >= len(done):
            keep = (~done).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            rows, done, token, mask, next_position = rows[keep], done[keep], token[keep], mask[keep], next_position[keep]
        mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=device)], dim=-1)
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_position[:, None],
                    **cache_argument(model, cache), use_cache=True)
        logits = out.logits[:, -1].float()
        next_position = next_position + 1

    width = int(lengths.max())
    return Samples(tokens[:, :width].cpu(), logprobs[:, :width].cpu(), lengths.cpu(), stopped.cpu())


def completion_logprobs(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,  # [B, P] left-padded
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,  # [B, T] right-padded
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs of the completion under `model`, temperature-scaled like sampling."""
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    mask = torch.cat([prompt_mask, completion_mask], dim=1)
    width = completion_ids.shape[1]
    reader = readout(model)
    # Only the positions that predict a completion token go through the head: it is the big cost.
    states = reader.states(ids, mask, positions(mask), keep=width + 1)[:, :-1]
    return reader.logprobs(states, completion_ids, temperature, with_entropy)


def shared_prompt_logprobs(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,  # [B, P] left-padded
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,  # [B, T] right-padded
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    share: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`completion_logprobs`, with each distinct prompt run once and its KV cache shared by its rows.

    A GRPO batch holds up to G completions of every prompt: the prompt's forward (and, under
    grad, its backward) is done once, not once per completion. The result and its gradient
    are those of `completion_logprobs` up to float summation order. The last completion token
    is never fed: nothing reads its output.
    """
    # Rows are the same prompt when ids and padding agree (a pad id can also be a real token).
    unique, row_prompt = torch.unique(torch.cat([prompt_ids, prompt_mask], dim=1), dim=0, return_inverse=True)
    # Under gradient checkpointing transformers drops the cache the completions would read the
    # prompt from (a recomputed layer must not write it twice): each row runs whole instead.
    checkpointing = model.training and torch.is_grad_enabled() and any(
        getattr(module, "gradient_checkpointing", False) for module in model.modules())
    if len(unique) == len(prompt_ids) or checkpointing or not share:  # nothing shared (one forward is cheaper), or no cache
        return completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                   temperature, with_entropy)
    width = prompt_ids.shape[1]
    unique_ids, unique_mask = unique[:, :width], unique[:, width:]
    reader = readout(model)
    cache = DynamicCache(config=model.config)
    prompt_states = reader.states(unique_ids, unique_mask, positions(unique_mask), keep=1, cache=cache)
    states = prompt_states.index_select(0, row_prompt)  # [B, 1, ·]: predicts each completion's first token
    if completion_ids.shape[1] > 1:
        select_rows(cache, row_prompt)
        fed_ids, fed_mask = completion_ids[:, :-1], completion_mask[:, :-1]
        mask = torch.cat([prompt_mask, fed_mask], dim=1)
        rest = reader.states(fed_ids, mask, positions(mask)[:, prompt_mask.shape[1]:], cache=cache)
        states = torch.cat([states, rest], dim=1)
    return reader.logprobs(states, completion_ids, temperature, with_entropy)
