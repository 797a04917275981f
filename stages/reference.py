"""reference: the frozen SFT policy GRPO starts from and stays close to → models/reference/.

With `model.path` empty, build the tiny character-level model and teach it the
`<think>…</think><answer>…</answer>` format by a short SFT: long enough to know the format,
short enough to be often wrong, so GRPO has something to learn. With `model.path` set,
validate that Hugging Face directory and save it as the reference unchanged (no SFT).
"""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from stages.records.artifacts import Layout
from stages.model.batching import CompletionBatch
from stages.config import Params, SFTConfig
from stages.model.generation import completion_logprobs
from stages.model.modeling import (build_tiny_model, build_tokenizer, check_context, configure_threads, context_limit,
                             encode_prompts, load_pretrained, model_source, resolve_device, save_model,
                             task_characters)
from stages.prepare import read_prompt_split


def sft_examples(frame: pd.DataFrame, tokenizer: PreTrainedTokenizerBase) -> tuple[list[list[int]], list[list[int]]]:
    prompts = encode_prompts(tokenizer, frame["prompt"].tolist())
    completions = tokenizer(frame["demonstration"].tolist(), add_special_tokens=False)["input_ids"]
    return prompts, [c + [tokenizer.eos_token_id] for c in completions]


def supervised_finetune(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                        prompts: list[list[int]], completions: list[list[int]],
                        cfg: SFTConfig, seed: int) -> list[float]:
    """Next-token cross-entropy on the completion tokens only; returns the loss per step."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, max(cfg.steps, 1))
    rng = np.random.default_rng(seed)
    losses = []
    for _ in tqdm(range(cfg.steps), desc="sft", unit="step", disable=None):
        rows = rng.choice(len(prompts), size=min(cfg.batch_size, len(prompts)), replace=False)
        batch = CompletionBatch.from_lists([prompts[i] for i in rows], [completions[i] for i in rows],
                                           tokenizer.pad_token_id).to(model.device)
        logp, _ = completion_logprobs(model, *batch.as_inputs())
        mask = batch.completion_mask.float()
        loss = -(logp * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


def check_prompts_fit(tokenizer: PreTrainedTokenizerBase, limit: tuple[int, str] | None,
                      params: Params, layout: Layout) -> None:
    """Train prompts leave room for a rollout and test prompts for an evaluation, in this model's context.

    `prepare` checked this already, but against the model params of its own run: the model
    (or its context, or the budgets) may have changed since.
    """
    if limit is None:
        return
    for split, budget_key, budget in (("train", "rollout.max_new_tokens", params.rollout.max_new_tokens),
                                      ("test", "eval.max_new_tokens", params.eval.max_new_tokens)):
        frame = read_prompt_split(layout, split)
        labels = [f"{layout.prompt_split(split)} prompt_id {pid!r}" for pid in frame["prompt_id"]]
        check_context(encode_prompts(tokenizer, frame["prompt"].tolist(), params.data.system_prompt), labels, budget,
                      budget_key, *limit)


def reference(params: Params, layout: Layout) -> dict[str, float]:
    """Validate the model and every prompt against it first; write models/reference/ only at the end."""
    configure_threads(params)
    device = resolve_device(params)
    target = layout.reference  # checked to lie inside the run directory before any work
    started = time.perf_counter()
    source = model_source(params.model, layout.root)
    if source is not None:
        model, tokenizer = load_pretrained(source, params.model, device, key="model.path")
        check_prompts_fit(tokenizer, context_limit(model.config, params.model), params, layout)
        metrics = {"sft_steps": 0}
    else:
        tokenizer = build_tokenizer(task_characters(params.data.source))
        check_prompts_fit(tokenizer, (params.model.tiny.max_position_embeddings, "model.tiny.max_position_embeddings"),
                          params, layout)
        model = build_tiny_model(params.model.tiny, tokenizer, params.seed).to(device)
        train = read_prompt_split(layout, "train")
        losses = supervised_finetune(model, tokenizer, *sft_examples(train, tokenizer), params.sft, params.seed)
        metrics = {"sft_steps": len(losses), "sft_final_loss": float(np.mean(losses[-10:])) if losses else math.nan}
    save_model(model, tokenizer, target)
    metrics["parameters"] = sum(p.numel() for p in model.parameters())
    metrics["seconds"] = time.perf_counter() - started
    return metrics
