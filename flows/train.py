"""The GRPO loop as a Prefect flow: one task per stage, four per iteration.

    grpo-train
      rollout-0001 → reward-0001 → advantage-0001 → update-0001
      rollout-0002 → ...

With `eval.every: N`, an `evaluate-NNNN` task after every Nth update (and `evaluate-0000` before
the first) measures the policy on the held-out prompts; its `eval/*` metrics are part of the
iteration's (iteration 1's manifest keeps the one before it, as `before`).

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
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Cancelled, State
from prefect.utilities.annotations import quote
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from flows.outages import api_url, leave_without_api, record_unreported_end, report_earlier_end, wait_for_api
from flows.signals import Interrupted, StopAtBoundary
from flows.tracking import Tracker, services_wait_seconds
from stages.advantage import advantage
from stages.records.artifacts import Layout
from stages.model.adapters import save_policy
from stages.model.checkpoints import prune
from stages.config import Params
from stages.errors import PipelineError, StoppedError
from stages.evaluate import curve_point
from stages.records.manifest import (completed_iterations, discard_after, read_manifest, recover_set_aside, redoing,
                             resume_point, training_fingerprint, write_manifest)
from stages.model.modeling import compile_forward, configure_threads
from stages.model.distributed import needs_ray, uses_ray
from stages.policy import load_reference, load_train_state
from stages.records.report import metric_rows, write_training_metrics
from stages.reward import check_model_inputs, reward
from stages.rollout import rollout
from stages.update import TrainState, update
from stages.model.vllm_engine import VllmEngine
from stages.model.vllm_server import vllm_engine


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


class NoTracebackForUserErrors(logging.Filter):
    """Prefect logs a failed task's and flow's exception with its traceback; for an error the user
    can fix (a PipelineError, a stop they asked for), the one line naming the culprit is all there
    is to say, in the console and in the UI. Other exceptions keep their traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (PipelineError, Interrupted)):
            record.exc_info, record.exc_text = None, None
        return True


@contextmanager
def readable_logs() -> Iterator[None]:
    """Within (around a call of `train`, so that the flow's own end is covered): Prefect's run logs
    without a completed task's line or a user error's traceback."""
    filters = [(logging.getLogger("prefect.task_runs"), QuietCompletedTasks()),
               (logging.getLogger("prefect.task_runs"), NoTracebackForUserErrors()),
               (logging.getLogger("prefect.flow_runs"), NoTracebackForUserErrors())]
    for logger, log_filter in filters:
        logger.addFilter(log_filter)
    try:
        yield
    finally:
        for logger, log_filter in filters:
            logger.removeFilter(log_filter)


# Tasks hold models and optimizers: nothing to cache or persist, and results stay in memory.
STAGE = dict(cache_policy=NO_CACHE, persist_result=False)


@dataclass
class InProcess:
    """Where the stages run with every `distributed` default: the policy, its reference and the
    optimizer in this process. `flows.cluster.Cluster` is the same two calls on Ray."""

    state: TrainState
    reference: PreTrainedModel | None
    vllm: VllmEngine | None = None  # rollout.engine: vllm: the servers that sample, fed the checkpoints as files

    def rollout(self, params: Params, layout: Layout, iteration: int) -> dict[str, Any]:
        return rollout(params, layout, iteration, self.state.model, self.state.tokenizer, engine=self.vllm)

    def update(self, params: Params, layout: Layout, iteration: int) -> dict[str, Any]:
        return update(params, layout, iteration, self.state, self.reference)

    def evaluate(self, params: Params, layout: Layout, iteration: int) -> dict[str, float]:
        """The held-out metrics of the policy after `iteration`: the one in memory."""
        return curve_point(self.state.model, self.state.tokenizer, params, layout, iteration)

    def save_policy(self, params: Params, layout: Layout) -> None:
        save_policy(self.state.model, self.state.tokenizer, layout.policy)


@task(name="rollout", task_run_name="rollout-{iteration:04d}", retries=2, retry_delay_seconds=1,
      retry_condition_fn=transient, **STAGE)
def rollout_task(params: Params, layout: Layout, iteration: int, engine: Any) -> dict[str, Any]:
    return engine.rollout(params, layout, iteration)


@task(name="reward", task_run_name="reward-{iteration:04d}", retries=2, retry_delay_seconds=1,
      retry_condition_fn=transient, **STAGE)
def reward_task(params: Params, layout: Layout, iteration: int) -> dict[str, Any]:
    if params.reward.workers:
        from flows.cluster import score_in_parallel
        return reward(params.reward, layout, iteration, params.rollout.group_size,
                      score_in_parallel(params.reward.workers), params.rollout.max_new_tokens)
    return reward(params.reward, layout, iteration, params.rollout.group_size,
                  max_new_tokens=params.rollout.max_new_tokens)


@task(name="advantage", task_run_name="advantage-{iteration:04d}", **STAGE)
def advantage_task(params: Params, layout: Layout, iteration: int) -> dict[str, Any]:
    return advantage(params.grpo, params.rollout.group_size, layout, iteration)


@task(name="update", task_run_name="update-{iteration:04d}", **STAGE)  # no retries: it steps the optimizer
def update_task(params: Params, layout: Layout, iteration: int, engine: Any) -> dict[str, Any]:
    return engine.update(params, layout, iteration)


@task(name="evaluate", task_run_name="evaluate-{iteration:04d}", retries=2, retry_delay_seconds=1,
      retry_condition_fn=transient, **STAGE)
def evaluate_task(params: Params, layout: Layout, iteration: int, engine: Any) -> dict[str, Any]:
    return engine.evaluate(params, layout, iteration)


def evaluates_after(params: Params, iteration: int) -> bool:
    """Whether the policy after `iteration` is measured on the held-out prompts (eval.every)."""
    return bool(params.eval.every) and iteration % params.eval.every == 0


def run_iteration(params: Params, layout: Layout, iteration: int, engine: Any, stops: StopAtBoundary) -> dict[str, Any]:
    started = time.perf_counter()
    evaluates = evaluates_after(params, iteration)
    # quote(): Prefect otherwise walks every field of these objects on each task call, looking
    # for futures to resolve (~1 ms a task); they hold none, and arrive unwrapped.
    params, layout, engine = quote(params), quote(layout), quote(engine)
    metrics: dict[str, Any] = {}
    metrics |= rollout_task(params, layout, iteration, engine)
    stops.check(f"rollout-{iteration:04d}")
    metrics |= reward_task(params, layout, iteration)
    stops.check(f"reward-{iteration:04d}")
    metrics |= advantage_task(params, layout, iteration)
    stops.check(f"advantage-{iteration:04d}")
    metrics |= update_task(params, layout, iteration, engine)
    metrics["seconds/iteration"] = time.perf_counter() - started  # the training's time: evaluating is apart
    if evaluates:
        metrics |= evaluate_task(params, layout, iteration, engine)
    return metrics


def describe(metrics: dict[str, Any]) -> str:
    shown = ["reward", "rewards/accuracy", "kl", "completions/mean_length", "eval/accuracy", "seconds/iteration"]
    return "  ".join(f"{key} {metrics[key]:.4g}" for key in shown if key in metrics)


@flow(name="grpo-train", validate_parameters=False, persist_result=False)
def train(params: Params, layout: Layout, run_name: str | None = None) -> dict[str, Any]:
    """The GRPO loop. A SIGINT or SIGTERM stops it between two stages: the flow run ends
    Cancelled (its MLflow run KILLED), and calling it raises the `StoppedError` saying so.
    If the Prefect API is away when it ends, see `flows.outages`."""
    try:
        with StopAtBoundary() as stops:
            outcome, done = train_iterations(params, layout, run_name, stops)
    except StoppedError as stopped:
        outcome, done = Cancelled(message=str(stopped), data=stopped), []
    except Interrupted as interrupted:  # the second signal: stopped mid-stage
        stopped = StoppedError(f"stopped at once by {interrupted}; the iteration it was in is redone by the same "
                               f"command", interrupted.signal_number)
        outcome, done = Cancelled(message=str(stopped), data=stopped), []
    except BaseException as error:  # noqa: BLE001 - re-raised below, once the API is known to answer
        outcome, done = error, []
    end_without_api_if_away(layout, outcome)
    if isinstance(outcome, BaseException):
        raise outcome
    if done:  # a blocking API call: only once the API is known to answer
        create_table_artifact([{"iteration": m["iteration"], **{k: round(float(v), 4) for k, v in m["metrics"].items()}}
                               for m in done], key="grpo-iterations", description="Metrics per GRPO iteration")
    return outcome


def end_without_api_if_away(layout: Layout, outcome: Any) -> None:
    """Return if the Prefect API answers (now, or within `services_wait_seconds()`); otherwise keep
    the run's end in runs/prefect.json and exit the process with its exit code (`flows.outages`)."""
    url = api_url()
    if url is None or wait_for_api(url, services_wait_seconds()):
        return
    if isinstance(outcome, State):  # Cancelled, carrying the StoppedError
        state, message, code, line = "CANCELLED", outcome.message, 128 + outcome.data.signal_number, outcome.message
    elif isinstance(outcome, BaseException):
        line = str(outcome) if isinstance(outcome, PipelineError) else f"{type(outcome).__name__}: {outcome}"
        state, message, code = "FAILED", line, 1
    else:
        state, message, code, line = "COMPLETED", "all iterations done; models/policy saved", 0, None
    record_unreported_end(layout, url, flow_run.get_id(), state, message)
    leave_without_api(url, line, code)


def train_iterations(params: Params, layout: Layout, run_name: str | None,
                     stops: StopAtBoundary) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The iterations from the resume point on: (train.json's summary, the done iterations' manifests)."""
    logger = get_run_logger()
    configure_threads(params)
    recover_set_aside(layout)  # a run killed while redoing an iteration
    fingerprint = training_fingerprint(params, layout)
    done = completed_iterations(layout, fingerprint, params.grpo.iterations)
    start = resume_point(layout, done)
    done = done[:start]
    if start:
        logger.info("resuming after iteration %d (its outputs and checkpoint match this run)", start)
    check_model_inputs(params.reward, layout, params.rollout.max_new_tokens)
    with stage_engine(params, layout, start, logger) as engine:
        stops.check("loading the models")
        return run_from(params, layout, run_name, stops, fingerprint, start, done, engine)


@contextmanager
def stage_engine(params: Params, layout: Layout, start: int, logger: Any) -> Iterator[Any]:
    """Where rollout and update run from iteration `start` on: this process (every `distributed`
    default), or the processes `flows.cluster` places on Ray. Ray is imported only when used."""
    if not needs_ray(params):
        with sampling_engine(params, layout, logger) as vllm:
            yield in_process(params, layout, start, logger, vllm)
        return
    from flows.cluster import Cluster, logical_cpus, ray_session

    with ray_session(params.distributed, logical_cpus(params)):
        if not uses_ray(params):  # only the reward scorers are Ray's
            with sampling_engine(params, layout, logger) as vllm:
                yield in_process(params, layout, start, logger, vllm)
            return
        d = params.distributed
        logger.info("on Ray: %d trainer(s) (%s), %d rollout worker(s), max_lag %d, %d reward worker(s)",
                    d.trainers, d.strategy, d.rollout_workers, params.rollout.max_lag, params.reward.workers)
        cluster = Cluster(params, layout, start)
        try:
            yield cluster
        finally:
            cluster.close()


@contextmanager
def sampling_engine(params: Params, layout: Layout, logger: Any) -> Iterator[VllmEngine | None]:
    """The vLLM servers of `rollout.engine: vllm` for the length of the run (one started here, or the
    user's `rollout.vllm.urls`); None for the native engine, which samples with the trainer's model."""
    if params.rollout.engine != "vllm":
        yield None
        return
    if not params.rollout.vllm.urls:
        logger.info("starting a vLLM server (rollout.engine: vllm); it takes ~1 min on CPU")
    with vllm_engine(params, layout) as engine:
        logger.info("sampling with vLLM at %s", ", ".join(server.url for server in engine.servers))
        yield engine


def in_process(params: Params, layout: Layout, start: int, logger: Any, vllm: VllmEngine | None = None) -> InProcess:
    state = load_train_state(params, layout, start)
    reference = load_reference(params, layout, state)
    if params.compile:
        separate = reference is not None and reference is not state.model
        logger.info("compiling the forward of the policy%s (compile: true): the first iterations take longer",
                    " and the reference" if separate else "")
        compile_forward(state.model)
        if separate:
            compile_forward(reference)
    return InProcess(state, reference, vllm)


def run_from(params: Params, layout: Layout, run_name: str | None, stops: StopAtBoundary, fingerprint: dict[str, str],
             start: int, done: list[dict[str, Any]], engine: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    logger = get_run_logger()

    try:
        if earlier := report_earlier_end(layout):
            logger.info("recorded the end of flow run %s (%s), which the Prefect API missed",
                        earlier["flow_run_id"], earlier["state"])
    except Exception as error:  # bookkeeping: say it and go on
        logger.warning("could not record the end of an earlier flow run (runs/prefect.json): %s", error)
    tracker = Tracker(params, layout, fingerprint, prefect_flow_run_id=flow_run.get_id(), run_name=run_name,
                      warn=logger.warning)
    for iteration, metrics in metric_rows(done):  # a resumed run still shows the whole curve
        tracker.log_iteration(iteration, metrics, samples=False)
    try:
        for iteration in tqdm(range(start + 1, params.grpo.iterations + 1), desc="grpo", unit="iteration",
                              initial=start, total=params.grpo.iterations, disable=None):
            started_from = done[-1]["checkpoint"] if done else fingerprint["reference"]
            # Until this iteration's manifest is written, whatever its folders held before is kept aside.
            with redoing(layout, iteration):
                before = None
                if iteration == 1 and params.eval.every:  # the curve's first point: the policy before any update
                    before = evaluate_task(quote(params), quote(layout), 0, quote(engine))
                    tracker.log_iteration(0, before, samples=False)
                metrics = run_iteration(params, layout, iteration, engine, stops)
                write_manifest(layout, iteration, fingerprint, started_from, metrics, before)
            done.append(read_manifest(layout, iteration))
            # A resumed lagged run samples its look-ahead from the last max_lag + 1 checkpoints.
            keep = max(params.checkpoints.keep_last, params.rollout.max_lag + 1)
            prune(layout.runs / "checkpoints", keep, newest=iteration)
            summary = write_training_metrics(layout, done)
            tracker.log_iteration(iteration, metrics)
            logger.info("iteration %d/%d: %s", iteration, params.grpo.iterations, describe(summary))
            if metrics.get("rollout/groups_short"):  # dynamic sampling ran out of rounds
                logger.warning("iteration %d: %d of %d groups had no signal after %d sampling rounds "
                               "(rollout.dynamic_sampling.max_rounds); trained with them", iteration,
                               metrics["rollout/groups_short"], params.rollout.prompts_per_iteration,
                               metrics["rollout/rounds"])
            if iteration < params.grpo.iterations:
                stops.check(f"iteration {iteration}")
        discard_after(layout, params.grpo.iterations)  # what an earlier, longer run left past this one's end
        engine.save_policy(params, layout)
        summary = write_training_metrics(layout, done)
    except (StoppedError, Interrupted):
        tracker.finish("KILLED")
        raise
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    return summary, done
