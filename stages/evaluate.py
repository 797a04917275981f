"""evaluate: greedy decoding on the held-out prompts, reference vs final policy → metrics/eval.json.

For each model: `accuracy` (the share answered exactly right: accuracy reward 1), `format_rate`,
and `language`, the mean share of the reasoning written in reward.target_language's script.
`curve_point` is the same measure of the policy during training (`eval.every`), with sampled
pass@k and mean@k (`eval.samples`)."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stages.records.artifacts import Layout, write_json
from stages.config import Params
from stages.model.generation import sample
from stages.model.modeling import (autocast, check_context, check_model_dir, compute_dtype, configure_threads,
                             context_limit, dtype_for, encode_prompts,
                             eos_token_ids, load_pretrained, resolve_device)
from stages.model.memory import memory_named
from stages.prepare import read_prompt_split
from stages.reward import reward_metrics, score_rollouts
from stages.rollout import iteration_seed  # streams 0-3: prompts, sampling, minibatches, dropout
from stages.config import SCRIPTS
from stages.rewards.rules import accuracy, extract_reasoning, format_reward, script_share


def greedy_completions(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                       max_new_tokens: int, batch_size: int, system: str = "") -> list[str]:
    completions: list[str] = []
    eos = eos_token_ids(model, tokenizer)
    for start in range(0, len(prompts), batch_size):
        ids = encode_prompts(tokenizer, prompts[start:start + batch_size], system)
        out = sample(model, ids, group_size=1, max_new_tokens=max_new_tokens, eos_ids=eos,
                     pad_id=tokenizer.pad_token_id, greedy=True)
        completions += tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
    return completions


def exactly_right(prompts: list[str], completions: list[str], answers: list[str]) -> list[bool]:
    # Right means exactly right: an answer spelled in words (partial credit in training) is not counted.
    return [score == 1.0 for score in accuracy(prompts, completions, answer=answers)]


def held_out_scores(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, test: pd.DataFrame,
                    max_new_tokens: int, batch_size: int, system: str = "",
                    target_language: str = "en") -> dict[str, float]:
    prompts = test["prompt"].tolist()
    completions = greedy_completions(model, tokenizer, prompts, max_new_tokens, batch_size, system)
    correct = exactly_right(prompts, completions, test["answer"].tolist())
    formatted = format_reward(prompts, completions)
    in_script = [script_share(extract_reasoning(c), SCRIPTS[target_language]) for c in completions]
    return {"accuracy": sum(correct) / len(correct), "format_rate": sum(formatted) / len(formatted),
            "language": sum(in_script) / len(in_script)}


def sampled_scores(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, test: pd.DataFrame, params: Params,
                   seed: int) -> dict[str, float]:
    """pass@k (a prompt counts if any of its k samples is right) and mean@k (the samples' accuracy),
    k = eval.samples, sampled as the rollouts are (rollout.temperature, top_p) from `seed`; and the
    samples' mean reward under the run's own `reward` (each component too: `rewards/NAME`), as verl
    validates, so a run rewarded by a model or a judge shows where it moves on unseen prompts.
    Named pass_at_k and mean_at_k: MLflow refuses "@" in a metric's name."""
    k, cfg = params.eval.samples, params.rollout
    generator = torch.Generator(model.device).manual_seed(seed)  # its own: training's draws stay as they are
    eos, prompts = eos_token_ids(model, tokenizer), test["prompt"].tolist()
    per_batch = max(1, params.eval.batch_size // k)  # eval.batch_size bounds the sequences decoded at once
    completions: list[str] = []
    lengths: list[int] = []
    for start in range(0, len(prompts), per_batch):
        out = sample(model, encode_prompts(tokenizer, prompts[start:start + per_batch], params.data.system_prompt),
                     group_size=k, max_new_tokens=params.eval.max_new_tokens, eos_ids=eos,
                     pad_id=tokenizer.pad_token_id, temperature=cfg.temperature, top_p=cfg.top_p, generator=generator)
        completions += tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
        lengths += out.lengths.tolist()
    samples = pd.DataFrame({"prompt_id": np.repeat(test["prompt_id"].to_numpy(), k), "sample": np.tile(np.arange(k),
                            len(prompts)), "prompt": np.repeat(prompts, k), "answer": np.repeat(test["answer"].to_numpy(), k),
                            "completion": completions, "completion_length": lengths})
    right = np.array(exactly_right(samples["prompt"].tolist(), completions, samples["answer"].tolist()))
    right = right.reshape(len(prompts), k)
    rewards = score_rollouts(samples, params.reward, k, "the held-out samples", params.eval.max_new_tokens)
    return {f"pass_at_{k}": float(right.any(axis=1).mean()), f"mean_at_{k}": float(right.mean()),
            **reward_metrics(rewards, list(params.reward.weights), groups=False)}


def curve_point(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, params: Params, layout: Layout,
                iteration: int) -> dict[str, float]:
    """The held-out metrics of the policy in `model`, the one after `iteration` (0: before the first),
    as `eval/*` metrics of that iteration (`eval.every`): greedy accuracy, format rate and language
    share, and with `eval.samples` k, sampled pass@k and mean@k. Greedy decoding draws nothing, and
    the samples come from a generator seeded by (seed, iteration) alone: evaluating leaves the
    training's draws unchanged, and a resumed run measures what the uninterrupted one did."""
    started = time.perf_counter()
    test = read_prompt_split(layout, "test")
    with (memory_named(f"the held-out evaluation after iteration {iteration}",
                       f"{params.eval.batch_size} sequences decoded at once, up to {params.eval.max_new_tokens} new "
                       f"tokens, vocabulary {model.config.vocab_size}", "lower eval.batch_size"),
          autocast(model.device, params.precision)):
        scores = held_out_scores(model.eval(), tokenizer, test, params.eval.max_new_tokens, params.eval.batch_size,
                                 params.data.system_prompt, params.reward.target_language)
        if params.eval.samples:
            scores |= sampled_scores(model, tokenizer, test, params, iteration_seed(params.seed, iteration, 4))
    return {**{f"eval/{key}": value for key, value in scores.items()},
            "seconds/eval": time.perf_counter() - started}


def evaluate(params: Params, layout: Layout) -> dict[str, float]:
    configure_threads(params)
    device = resolve_device(params)
    compute_dtype(device, params.precision)  # a precision this machine cannot run: refused before any work
    target = layout.metrics / "eval.json"  # checked to lie inside the run directory before any work
    test = read_prompt_split(layout, "test")
    models = (("reference", layout.reference), ("policy", layout.policy))
    for _, path in models:  # both, before minutes of decoding with the first: named by path, as artefacts
        check_model_dir(path, params.model.trust_remote_code)
    metrics: dict[str, float] = {"test_prompts": len(test)}
    for name, path in models:
        started = time.perf_counter()
        model, tokenizer = load_pretrained(path, params.model, device, dtype=dtype_for(device, params.precision))
        limit = context_limit(model.config, params.model)
        if limit is not None:  # eval.max_new_tokens is not checked by any earlier stage against this model
            labels = [f"{layout.prompt_split('test')} prompt_id {pid!r}" for pid in test["prompt_id"]]
            check_context(encode_prompts(tokenizer, test["prompt"].tolist(), params.data.system_prompt), labels,
                          params.eval.max_new_tokens, "eval.max_new_tokens", *limit)
        with (memory_named(f"the evaluation of models/{name}",
                           f"{params.eval.batch_size} prompts decoded at once, up to {params.eval.max_new_tokens} "
                           f"new tokens, vocabulary {model.config.vocab_size}", "lower eval.batch_size"),
              autocast(device, params.precision)):
            scores = held_out_scores(model.eval(), tokenizer, test, params.eval.max_new_tokens, params.eval.batch_size,
                                     params.data.system_prompt, params.reward.target_language)
        metrics.update({f"{name}_{key}": value for key, value in scores.items()})
        metrics[f"{name}_seconds"] = time.perf_counter() - started
    metrics["accuracy_gain"] = metrics["policy_accuracy"] - metrics["reference_accuracy"]
    write_json(target, metrics)
    return metrics
