"""rollout: G sampled completions per prompt → runs/iterations/NNNN/rollouts.parquet.

One row per completion, with everything needed to recompute the iteration's loss: the
prompt and completion token ids and the sampling policy's per-token log-probs.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stages.artifacts import Layout, write_parquet
from stages.config import Params
from stages.errors import DataError
from stages.generation import sample
from stages.modeling import encode_prompts, eos_token_ids


def iteration_seed(seed: int, iteration: int, stream: int) -> int:
    """A seed per (run, iteration, use): any iteration can be redone alone and give the same draws."""
    return int(np.random.SeedSequence([seed, iteration, stream]).generate_state(1)[0])


def choose_prompts(train: pd.DataFrame, count: int, seed: int, iteration: int) -> pd.DataFrame:
    if count > len(train):
        raise DataError(f"rollout.prompts_per_iteration={count} exceeds the {len(train)} training prompts")
    rows = np.random.default_rng(iteration_seed(seed, iteration, 0)).choice(len(train), size=count, replace=False)
    return train.iloc[np.sort(rows)].reset_index(drop=True)


def generate_rollouts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: pd.DataFrame,
                      params: Params, iteration: int) -> pd.DataFrame:
    cfg = params.rollout
    prompt_ids = encode_prompts(tokenizer, prompts["prompt"].tolist())
    generator = torch.Generator(model.device).manual_seed(iteration_seed(params.seed, iteration, 1))
    model.eval()
    out = sample(model, prompt_ids, group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                 eos_ids=eos_token_ids(model, tokenizer), pad_id=tokenizer.pad_token_id,
                 temperature=cfg.temperature, top_p=cfg.top_p, generator=generator)
    lengths = out.lengths.tolist()
    completion_ids = [row[:n] for row, n in zip(out.completion_ids.tolist(), lengths)]
    repeat = np.repeat(np.arange(len(prompts)), cfg.group_size)
    return pd.DataFrame({
        "iteration": iteration,
        "prompt_id": prompts["prompt_id"].to_numpy()[repeat],
        "sample": np.tile(np.arange(cfg.group_size), len(prompts)),
        "prompt": prompts["prompt"].to_numpy()[repeat],
        "answer": prompts["answer"].to_numpy()[repeat],
        "completion": tokenizer.batch_decode(completion_ids, skip_special_tokens=True),
        "prompt_ids": [prompt_ids[i] for i in repeat],
        "completion_ids": completion_ids,
        "logprobs": [row[:n] for row, n in zip(out.logprobs.tolist(), lengths)],
        "finish_reason": np.where(out.stopped.numpy(), "stop", "length"),
        "completion_length": lengths,
    })


def rollout(params: Params, layout: Layout, iteration: int, model: PreTrainedModel,
            tokenizer: PreTrainedTokenizerBase) -> dict[str, float]:
    started = time.perf_counter()
    train = pd.read_parquet(layout.prompt_split("train"))
    prompts = choose_prompts(train, params.rollout.prompts_per_iteration, params.seed, iteration)
    rollouts = generate_rollouts(model, tokenizer, prompts, params, iteration)
    seconds = time.perf_counter() - started
    write_parquet(layout.iteration(iteration) / "rollouts.parquet", rollouts)
    lengths = rollouts["completion_length"]
    return {
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        # Measured against the configured budget, not against what happened to be generated.
        "completions/clipped_ratio": float((lengths >= params.rollout.max_new_tokens).mean()),
        "rollout/tokens_per_second": float(lengths.sum() / seconds),
        "seconds/rollout": seconds,
    }
