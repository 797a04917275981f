"""The GRPO loop as a Prefect flow: one task per stage, four per iteration.

    grpo-train
      rollout-0001 → reward-0001 → advantage-0001 → update-0001
      rollout-0002 → ...

The stages are plain functions from `stages/`; this module owns the order, retries, the
resume point, logging and MLflow tracking. Resuming is decided from the manifests on
disk, so a re-run after any crash picks up after the last complete iteration.

Why tasks and not a sub-flow per iteration: Prefect 3 reports a task's states as events
(about 3 ms a task here), while a sub-flow makes a dozen blocking API round trips (0.26 s
for an empty one, measured), a quarter of a default iteration. The task names carry the
iteration, so the run still reads iteration by iteration in the UI.
"""

from __future__ import annotations

import logging
import shutil
import time
from typing import Any

import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.utilities.annotations import quote
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from flows.tracking import Tracker
from stages.advantage import advantage
from stages.artifacts import Layout
from stages.checkpoints import load_optimizer_state, prune
from stages.config import Params
from stages.errors import PipelineError
from stages.manifest import (checkpoint_path, completed_iterations, read_manifest, resume_point,
                             training_fingerprint, write_manifest)
from stages.modeling import compile_forward, configure_threads, load_model, load_tokenizer, resolve_device, save_model
from stages.report import write_training_metrics
from stages.reward import reward
from stages.rollout import rollout
from stages.update import TrainState, make_optimizer, update


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry crashes of the machinery, never a mistake in the user's input (it would fail again)."""
    try:
        state.result()
    except PipelineError:
        return False
    except Exception:
        return True
    return False


class QuietCompletedTasks(logging.Filter):
    """Drop Prefect's "Finished in state Completed()" line of each stage task.

    Four per iteration, beside our one line per iteration: the UI shows every task run's state
    anyway, and each line costs ~2 ms of the training thread (formatted for the console and
    queued for the API). A failed task's line is logged at ERROR and still goes through.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO and record.getMessage().startswith("Finished in state"))


# Tasks hold models and optimizers: nothing to cache or persist, and results stay in memory.
STAGE = dict(cache_policy=NO_CACHE, persist_result=False)


@task(name="rollout", task_run_name="rollout-{iteration:04d}", retries=2, retry_delay_seconds=1,
      retry_condition_fn=transient, **STAGE)
def rollout_task(params: Params, layout: Layout, iteration: int, state: TrainState) -> dict[str, Any]:
    return rollout(params, layout, iteration, state.model, state.tokenizer)


@task(name="reward", task_run_name="reward-{iteration:04d}", retries=2, retry_delay_seconds=1,
      retry_condition_fn=transient, **STAGE)
def reward_task(params: Params, layout: Layout, iteration: int) -> dict[str, Any]:
    return reward(params.reward, layout, iteration, params.rollout.group_size)


@task(name="advantage", task_run_name="advantage-{iteration:04d}", **STAGE)
def advantage_task(params: Params, layout: Layout, iteration: int) -> dict[str, Any]:
    return advantage(params.grpo, params.rollout.group_size, layout, iteration)


@task(name="update", task_run_name="update-{iteration:04d}", **STAGE)  # no retries: it steps the optimizer
def update_task(params: Params, layout: Layout, iteration: int, state: TrainState,
                reference: PreTrainedModel | None) -> dict[str, Any]:
    return update(params, layout, iteration, state, reference)


def run_iteration(params: Params, layout: Layout, iteration: int, state: TrainState,
                  reference: PreTrainedModel | None) -> dict[str, Any]:
    started = time.perf_counter()
    # quote(): Prefect otherwise walks every field of these objects on each task call, looking
    # for futures to resolve (~1 ms a task); they hold none, and arrive unwrapped.
    params, layout, state, reference = quote(params), quote(layout), quote(state), quote(reference)
    metrics: dict[str, Any] = {}
    metrics |= rollout_task(params, layout, iteration, state)
    metrics |= reward_task(params, layout, iteration)
    metrics |= advantage_task(params, layout, iteration)
    metrics |= update_task(params, layout, iteration, state, reference)
    metrics["seconds/iteration"] = time.perf_counter() - started
    return metrics


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


def describe(metrics: dict[str, Any]) -> str:
    shown = ["reward", "rewards/accuracy", "kl", "completions/mean_length", "seconds/iteration"]
    return "  ".join(f"{key} {metrics[key]:.4g}" for key in shown if key in metrics)


@flow(name="grpo-train", validate_parameters=False, persist_result=False)
def train(params: Params, layout: Layout, run_name: str | None = None) -> dict[str, Any]:
    task_logs, quiet = logging.getLogger("prefect.task_runs"), QuietCompletedTasks()
    task_logs.addFilter(quiet)
    try:
        return train_iterations(params, layout, run_name)
    finally:
        task_logs.removeFilter(quiet)


def train_iterations(params: Params, layout: Layout, run_name: str | None) -> dict[str, Any]:
    logger = get_run_logger()
    configure_threads(params)
    fingerprint = training_fingerprint(params, layout)
    done = completed_iterations(layout, fingerprint, params.grpo.iterations)
    start = resume_point(layout, done)
    done = done[:start]
    if start:
        logger.info("resuming after iteration %d (its outputs and checkpoint match this run)", start)
    discard_after(layout, start)
    state = load_train_state(params, layout, start)
    reference = None
    if params.grpo.beta != 0.0:
        reference = load_model(layout.reference, params.model, state.model.device).eval()
    if params.compile:
        logger.info("compiling the forward of the policy%s (compile: true): the first iterations take longer",
                    " and the reference" if reference is not None else "")
        for model in (state.model, reference):
            if model is not None:
                compile_forward(model)

    tracker = Tracker(params, layout, prefect_flow_run_id=flow_run.get_id(), run_name=run_name)
    for manifest in done:  # a resumed run still shows the whole curve
        tracker.log_iteration(manifest["iteration"], manifest["metrics"], samples=False)
    try:
        for iteration in tqdm(range(start + 1, params.grpo.iterations + 1), desc="grpo", unit="iteration",
                              initial=start, total=params.grpo.iterations, disable=None):
            started_from = done[-1]["checkpoint"] if done else fingerprint["reference"]
            metrics = run_iteration(params, layout, iteration, state, reference)
            write_manifest(layout, iteration, fingerprint, started_from, metrics)
            done.append(read_manifest(layout, iteration))
            prune(layout.runs / "checkpoints", params.checkpoints.keep_last)
            summary = write_training_metrics(layout, done)
            tracker.log_iteration(iteration, metrics)
            logger.info("iteration %d/%d: %s", iteration, params.grpo.iterations, describe(summary))
        save_model(state.model, state.tokenizer, layout.policy)
        summary = write_training_metrics(layout, done)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    if done:
        create_table_artifact([{"iteration": m["iteration"], **{k: round(float(v), 4) for k, v in m["metrics"].items()}}
                               for m in done], key="grpo-iterations", description="Metrics per GRPO iteration")
    return summary
