"""rollout: G sampled completions per prompt → runs/iterations/NNNN/rollouts.parquet.

One row per completion, with everything needed to recompute the iteration's loss: the
prompt and completion token ids and the sampling policy's per-token log-probs.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stages.records.artifacts import Layout, write_parquet
from stages.config import Params
from stages.rewards.dynamic_sampling import sample_with_signal
from stages.errors import DataError, RolloutError
from stages.model.generation import sample
from stages.records.groups import check_groups
from stages.records.manifest import checkpoint_path
from stages.model.memory import memory_named
from stages.model.modeling import autocast, check_context, context_limit, encode_prompts, eos_token_ids
from stages.prepare import read_prompt_split
from stages.reward import Scorer, score_rollouts
from stages.model.vllm_engine import VllmEngine, request_seed


def iteration_seed(seed: int, iteration: int, stream: int) -> int:
    """A seed per (run, iteration, use): any iteration can be redone alone and give the same draws."""
    return int(np.random.SeedSequence([seed, iteration, stream]).generate_state(1)[0])


def prompt_rows(available: int, count: int, seed: int, iteration: int, round: int = 0,
                taken: frozenset[int] = frozenset()) -> np.ndarray:
    """Rows of the training prompts an iteration draws, in file order. Round 0 is the iteration's draw;
    a later round of dynamic sampling draws up to `count` of the rows not `taken` yet, from its own seed."""
    if count > available:
        raise DataError(f"rollout.prompts_per_iteration={count} exceeds the {available} training prompts")
    if round == 0:
        rows = np.random.default_rng(iteration_seed(seed, iteration, 0)).choice(available, size=count, replace=False)
    else:
        left = np.setdiff1d(np.arange(available), np.fromiter(taken, dtype=int, count=len(taken)))
        rng = np.random.default_rng(np.random.SeedSequence([seed, iteration, 0, round]))
        rows = rng.choice(left, size=min(count, len(left)), replace=False)
    return np.sort(rows)


def choose_prompts(train: pd.DataFrame, count: int, seed: int, iteration: int) -> pd.DataFrame:
    return train.iloc[prompt_rows(len(train), count, seed, iteration)].reset_index(drop=True)


def sampling_seed(seed: int, iteration: int, share: int = 0, round: int = 0) -> int:
    """The sampling generator's seed for one rollout worker's share (share 0: the single process's)
    in one round of dynamic sampling (round 0: the iteration's first draw, the only one without it)."""
    if round:
        return int(np.random.SeedSequence([seed, iteration, 1, share, round]).generate_state(1)[0])
    if share == 0:
        return iteration_seed(seed, iteration, 1)
    return int(np.random.SeedSequence([seed, iteration, 1, share]).generate_state(1)[0])


def worker_shares(prompts: pd.DataFrame, workers: int) -> list[pd.DataFrame]:
    """The iteration's prompts cut into `workers` contiguous shares: each worker owns whole groups,
    so advantages need no communication, and the rows come back in the single process's order."""
    return [prompts.iloc[rows] for rows in np.array_split(np.arange(len(prompts)), workers)]


def sampling_checkpoint(iteration: int, max_lag: int) -> int:
    """The checkpoint whose policy samples `iteration`: the one after iteration - 1 - max_lag
    (0: the policy before any update). The schedule, not timing, decides it."""
    return max(0, iteration - 1 - max_lag)


def generate_rollouts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: pd.DataFrame,
                      params: Params, iteration: int, source: str = "data/prompts/train.parquet",
                      share: int = 0, round: int = 0, engine: VllmEngine | None = None) -> pd.DataFrame:
    """G completions per prompt from our decode loop over `model`, or from the vLLM servers of
    `engine` (then `model` is the trainer's, read for its context length and eos ids only)."""
    cfg = params.rollout
    prompt_ids = encode_prompts(tokenizer, prompts["prompt"].tolist(), params.data.system_prompt)
    # rollout.max_new_tokens may have grown since `reference` checked the prompts against the model.
    labels = [f"{source} prompt_id {pid!r}" for pid in prompts["prompt_id"]]
    limit = context_limit(model.config, params.model)
    if limit is not None:
        check_context(prompt_ids, labels, cfg.max_new_tokens, "rollout.max_new_tokens", *limit)
    if engine is not None:  # a server's own context may be shorter than the model's (--max-model-len)
        engine.check_context(prompt_ids, labels, cfg.max_new_tokens)
        out = engine.sample(prompt_ids, [request_seed(params.seed, iteration, pid) for pid in prompts["prompt_id"]],
                            group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                            eos_ids=eos_token_ids(model, tokenizer), temperature=cfg.temperature, top_p=cfg.top_p,
                            where=f"the rollout of iteration {iteration}")
    else:
        generator = torch.Generator(model.device).manual_seed(sampling_seed(params.seed, iteration, share, round))
        model.eval()
        # Sampled under the update's precision: the first step's ratio is then 1, not a precision gap.
        with autocast(model.device, params.precision):
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


def check_rollouts(rollouts: pd.DataFrame, group_size: int, max_new_tokens: int) -> None:
    """The contract the reward and update stages rely on, checked before rollouts.parquet is written.

    Complete groups; token ids, log-probs and length that agree; finish reasons measured
    against the configured `max_new_tokens` ("length" means the budget was used up).
    """
    check_groups(rollouts, group_size, f"iteration {rollouts['iteration'].iloc[0]}" if len(rollouts) else "")
    lengths = rollouts["completion_length"].to_numpy()
    finish = rollouts["finish_reason"].to_numpy()
    problems = [
        (rollouts["completion_ids"].map(len).to_numpy() != lengths, "completion_length disagrees with its token ids"),
        (rollouts["logprobs"].map(len).to_numpy() != lengths, "completion_length disagrees with its log-probs"),
        (lengths > max_new_tokens, f"is longer than rollout.max_new_tokens={max_new_tokens}"),
        (~np.isin(finish, ["stop", "length"]), "has a finish_reason other than 'stop' or 'length'"),
        ((finish == "length") & (lengths != max_new_tokens),
         f"has finish_reason 'length' before rollout.max_new_tokens={max_new_tokens} tokens"),
        (~rollouts["logprobs"].map(lambda values: bool(np.isfinite(values).all())).to_numpy(),
         "has a non-finite log-prob"),
    ]
    for bad, what in problems:
        if bad.any():
            culprit = rollouts.iloc[int(np.flatnonzero(bad)[0])]
            raise RolloutError(f"iteration {culprit['iteration']}: prompt_id={culprit['prompt_id']!r} "
                               f"sample={culprit['sample']} {what} (length {culprit['completion_length']})")


def iteration_prompts(params: Params, layout: Layout, iteration: int) -> pd.DataFrame:
    return choose_prompts(read_prompt_split(layout, "train"), params.rollout.prompts_per_iteration, params.seed,
                          iteration)


def generate_share(params: Params, layout: Layout, iteration: int, prompts: pd.DataFrame, model: PreTrainedModel,
                   tokenizer: PreTrainedTokenizerBase, share: int = 0, round: int = 0,
                   engine: VllmEngine | None = None) -> pd.DataFrame:
    """One worker's rollouts (the single process's: all prompts, share 0) of one sampling round."""
    cfg = params.rollout
    with memory_named(f"the rollout of iteration {iteration}",
                      f"{len(prompts)} prompts x G {cfg.group_size} decoded at once, up to "
                      f"{cfg.max_new_tokens} new tokens, vocabulary {model.config.vocab_size}",
                      "lower rollout.prompts_per_iteration or rollout.max_new_tokens"):
        return generate_rollouts(model, tokenizer, prompts, params, iteration, str(layout.prompt_split("train")), share,
                                 round, engine)


def load_sampling_weights(params: Params, layout: Layout, iteration: int, engine: VllmEngine) -> dict[str, float]:
    """The vLLM servers' weights: the checkpoint the schedule names for `iteration`, reloaded in place
    from its directory unless they hold it already (a resumed run, or one sharing a server, reloads)."""
    checkpoint = sampling_checkpoint(iteration, params.rollout.max_lag)
    if engine.holds == checkpoint:
        return {}
    return {"seconds/weight_reload": engine.load_checkpoint(checkpoint, checkpoint_path(layout, checkpoint))}


def sample_iteration(params: Params, layout: Layout, iteration: int,
                     generate: Callable[[pd.DataFrame, int], pd.DataFrame],
                     score: Scorer = score_rollouts) -> tuple[pd.DataFrame, dict[str, float]]:
    """The iteration's rollouts from `generate(prompts, round)` (this process's loop or vLLM, or the
    rollout workers, each whole groups): its one draw, or with `rollout.dynamic_sampling` rounds of
    draws until enough groups carry a learning signal (`stages.rewards.dynamic_sampling`), each round
    scored here by `score`, as the reward stage scores. The draws depend on the seed, the
    iteration and the round, never on who generates or when."""
    if params.rollout.dynamic_sampling.filter == "none":
        return generate(iteration_prompts(params, layout, iteration), 0), {}
    train, taken = read_prompt_split(layout, "train"), set()

    def draw(round: int) -> pd.DataFrame:
        rows = prompt_rows(len(train), params.rollout.prompts_per_iteration, params.seed, iteration, round,
                           frozenset(taken))
        taken.update(rows.tolist())
        return train.iloc[rows].reset_index(drop=True)

    return sample_with_signal(
        params.rollout.prompts_per_iteration, params.rollout.dynamic_sampling.max_rounds, draw, generate,
        score=lambda rows: score(rows, params.reward, params.rollout.group_size,
                                 f"iteration {iteration} sampling round {int(rows['round'].iloc[0])}",
                                 params.rollout.max_new_tokens))


def rollout(params: Params, layout: Layout, iteration: int, model: PreTrainedModel,
            tokenizer: PreTrainedTokenizerBase, score: Scorer = score_rollouts,
            engine: VllmEngine | None = None) -> dict[str, float]:
    """The iteration's rollouts, generated in this process (`sample_iteration`).
    `engine`: the vLLM servers that sample (`rollout.engine: vllm`); None: our loop over `model`."""
    reload = load_sampling_weights(params, layout, iteration, engine) if engine is not None else {}
    started = time.perf_counter()
    rollouts, sampling = sample_iteration(
        params, layout, iteration, score=score,
        generate=lambda prompts, round: generate_share(params, layout, iteration, prompts, model, tokenizer, 0, round,
                                                       engine))
    return {**write_rollouts(params, layout, iteration, rollouts, time.perf_counter() - started), **sampling, **reload}


def write_rollouts(params: Params, layout: Layout, iteration: int, rollouts: pd.DataFrame,
                   seconds: float) -> dict[str, float]:
    """Check an iteration's rollouts (from one process or the workers' shares, in order) and write them."""
    target = layout.iteration(iteration) / "rollouts.parquet"  # checked to lie inside the run directory
    check_rollouts(rollouts, params.rollout.group_size, params.rollout.max_new_tokens)
    write_parquet(target, rollouts)
    lengths = rollouts["completion_length"]
    return {
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        # Truncated = ran out of the configured budget without an eos (TRL's clipped_ratio); a
        # completion whose eos is its max_new_tokens-th token stopped, it was not cut.
        "completions/clipped_ratio": float((rollouts["finish_reason"] == "length").mean()),
        "rollout/tokens_per_second": float(lengths.sum() / seconds),
        "seconds/rollout": seconds,
    }
