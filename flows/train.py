"""The GRPO loop: rollout → reward → advantage → update, once per iteration, resumable."""

from __future__ import annotations

import shutil
import time
from typing import Any, Callable

import torch
from transformers import PreTrainedModel

from stages.advantage import advantage
from stages.artifacts import Layout
from stages.checkpoints import load_optimizer_state, prune
from stages.config import Params
from stages.manifest import (checkpoint_path, completed_iterations, read_manifest, resume_point,
                             training_fingerprint, write_manifest)
from stages.modeling import configure_threads, load_model, load_tokenizer, resolve_device, save_model
from stages.report import write_training_metrics
from stages.reward import reward
from stages.rollout import rollout
from stages.update import TrainState, make_optimizer, update

Log = Callable[[str], None]


def discard_after(layout: Layout, iteration: int) -> None:
    """Iterations and checkpoints past the resume point are stale: remove them before redoing."""
    for folder in (layout.runs / "iterations", layout.runs / "checkpoints"):
        for path in folder.glob("[0-9]" * 4):
            if int(path.name) > iteration:
                shutil.rmtree(path)


def load_train_state(params: Params, layout: Layout, start: int) -> TrainState:
    device = resolve_device(params)
    source = checkpoint_path(layout, start)
    # fp32 master weights: AdamW on bf16 weights loses small updates. bf16 comes from autocast.
    model = load_model(source, params.model, device, dtype=torch.float32).eval()
    state = TrainState(model, load_tokenizer(source, params.model.trust_remote_code), make_optimizer(model, params))
    if start:
        load_optimizer_state(state.optimizer, source)
    return state


def run_iteration(params: Params, layout: Layout, iteration: int, state: TrainState,
                  reference: PreTrainedModel | None) -> dict[str, Any]:
    started = time.perf_counter()
    metrics: dict[str, Any] = {}
    metrics |= rollout(params, layout, iteration, state.model, state.tokenizer)
    metrics |= reward(params.reward, layout, iteration)
    metrics |= advantage(params.grpo, params.rollout.group_size, layout, iteration)
    metrics |= update(params, layout, iteration, state, reference)
    metrics["seconds/iteration"] = time.perf_counter() - started
    return metrics


def describe(metrics: dict[str, Any]) -> str:
    shown = ["reward", "rewards/accuracy", "kl", "completions/mean_length", "seconds/iteration"]
    return "  ".join(f"{key} {metrics[key]:.4g}" for key in shown if key in metrics)


def train(params: Params, layout: Layout, log: Log = print) -> dict[str, Any]:
    configure_threads(params)
    fingerprint = training_fingerprint(params, layout)
    done = completed_iterations(layout, fingerprint, params.grpo.iterations)
    start = resume_point(layout, done)
    done = done[:start]
    if start:
        log(f"resuming after iteration {start} (its outputs and checkpoint match this run)")
    discard_after(layout, start)
    state = load_train_state(params, layout, start)
    reference = None
    if params.grpo.beta != 0.0:
        reference = load_model(layout.reference, params.model, state.model.device).eval()

    for iteration in range(start + 1, params.grpo.iterations + 1):
        started_from = done[-1]["checkpoint"] if done else fingerprint["reference"]
        metrics = run_iteration(params, layout, iteration, state, reference)
        write_manifest(layout, iteration, fingerprint, started_from, metrics)
        done.append(read_manifest(layout, iteration))
        prune(layout.runs / "checkpoints", params.checkpoints.keep_last)
        summary = write_training_metrics(layout, done)
        log(f"iteration {iteration}/{params.grpo.iterations}: " + describe(summary))

    save_model(state.model, state.tokenizer, layout.policy)
    return write_training_metrics(layout, done)
