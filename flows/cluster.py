"""Scale-out on Ray: the processes the Prefect flow dispatches an iteration's stages to.

    controller: this process, the Prefect flow (order, files, tracking); reward and advantage
    │
    ├── trainer rank 0 … N-1   Ray actors joined in one torch.distributed group (gloo / nccl)
    │     update(i): reference log-probs and mu epochs, each rank on its share of every
    │     minibatch (DDP or FSDP2) → rank 0 writes checkpoint i and update.json, and puts the
    │     new weights in Ray's object store
    ├── rollout worker 0 … M-1  Ray actors, whole prompt groups each
    │     generate(i, its share of the prompts, weights of checkpoint i-1-max_lag) → rows,
    │     which the controller writes to rollouts.parquet in the single process's order
    └── reward scorer 0 … K-1    Ray actors, whole groups each, results in order; each
          with its scoring process (reward models loaded once per run)
    (files: runs/iterations/NNNN/*.parquet as ever; runs/checkpoints/NNNN/ from rank 0)

Rollouts run ahead of the update by `rollout.max_lag` iterations: the rollout of iteration
i + 1 + max_lag is launched as soon as update i has produced its weights, so the workers
generate while the trainers update. Which weights sample which iteration is the schedule's
(`stages.rollout.sampling_checkpoint`), never a race: a lagged run is deterministic and a
resumed one regenerates its look-ahead from the checkpoints on disk.

Failure is loud: every wait on Ray goes through `Cluster.wait`, which turns the first dead or
failed process into one line naming its role and rank and then kills the rest (a trainer
left in a collective with a dead peer would otherwise wait for gloo's timeout).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import pandas as pd
import ray
import torch
from ray.exceptions import RayActorError, RayError, RayTaskError

from stages.model.adapters import save_policy
from stages.records.artifacts import Layout
from stages.records.manifest import checkpoint_path
from stages.config import DistributedConfig, Params, RewardConfig
from stages.model.distributed import Rank, full_state_dict, join_group, uses_ray
from stages.errors import PipelineError, WorkerError, one_line
from stages.evaluate import curve_point
from stages.model.modeling import compile_forward, load_tokenizer, resolve_device
from stages.policy import load_policy, load_reference, load_train_state
from stages.reward import score_rollouts
from stages.rollout import (generate_share, iteration_prompts, sample_iteration, sampling_checkpoint, worker_shares,
                            write_rollouts)
from stages.update import update

COLLECTIVE_TIMEOUT_SECONDS = 600  # a trainer left alone in a collective gives up after this (and is killed before)
CONNECT_SECONDS = 5.0


def logical_cpus(params: Params) -> int:
    """Ray's CPUs for a local instance: one per process we place, so all fit on a 2-core machine."""
    processes = params.reward.workers
    if uses_ray(params):
        processes += params.distributed.trainers + params.distributed.rollout_workers
    return max(processes, os.cpu_count() or 1)


def threads_per_process(params: Params) -> int:
    """`threads`, or this machine's cores split between the processes that compute at once."""
    processes = params.distributed.trainers + params.distributed.rollout_workers
    return params.threads or max(1, (os.cpu_count() or 1) // processes)


def check_reachable(address: str) -> None:
    """An address that does not answer is one line now, not a Ray client retrying for minutes."""
    if address == "auto":
        return  # ray.init finds this machine's cluster or says there is none
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as error:
        raise WorkerError(f"distributed.address: the Ray cluster at {address!r} does not answer "
                          f"({one_line(error.strerror or error)}); start it (`ray start --head`) or set "
                          f"distributed.address: '' for a local instance") from None


@contextmanager
def ray_session(cfg: DistributedConfig, cpus: int) -> Iterator[None]:
    """Ray for the length of a run: a local instance on 127.0.0.1 (started and stopped here), or
    a connection to the cluster at `distributed.address`."""
    previous_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        if cfg.address:
            check_reachable(cfg.address)
            ray.init(address=cfg.address, logging_level="ERROR", log_to_driver=True)
        else:
            # Logical CPUs: one per process, so Ray places them all even on a 2-core machine;
            # threads are split by `threads_per_process`, not by Ray's accounting.
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, _temp_dir=ray_temp_dir(),
                     _node_ip_address="127.0.0.1", logging_level="ERROR", log_to_driver=True)
    except ConnectionError as error:
        raise WorkerError(f"distributed.address: {cfg.address!r}: {one_line(error)}") from None
    finally:
        # ray.init answers SIGTERM with sys.exit; the run's own handler stops at a stage boundary.
        signal.signal(signal.SIGTERM, previous_sigterm)
    try:
        yield
    finally:
        ray.shutdown()


def ray_temp_dir() -> str:
    """Ray's folder for a local instance: `$TMPDIR/ray` as Ray's default, unless that is too long
    for the Unix sockets Ray makes under it (107 bytes, ~70 of them Ray's own
    `/ray/session_<date>_<pid>/sockets/plasma_store`): then /tmp/ray-<uid>."""
    default = os.path.join(tempfile.gettempdir(), "ray")
    return default if len(default) <= 36 else f"/tmp/ray-{os.getuid()}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


@ray.remote
class Trainer:
    """One rank of the trainer group: the policy (its share under FSDP2), the reference, the optimizer."""

    def __init__(self, rank: int, world: int, host: str, port: int, params: Params, layout: Layout, start: int,
                 threads: int) -> None:
        _set_threads(threads)
        self.layout = layout
        device = resolve_device(params)
        if device.type == "cuda":
            torch.cuda.set_device(0)  # Ray gives each trainer one GPU, visible as device 0
        self.rank = join_group(rank, world, host, port, device, COLLECTIVE_TIMEOUT_SECONDS) if world > 1 else Rank()
        self.state = load_train_state(params, layout, start, self.rank)
        self.reference = load_reference(params, layout, self.state)
        if params.compile:
            compile_forward(self.state.model)
            if self.reference is not None and self.reference is not self.state.model:
                compile_forward(self.reference)

    def ready(self) -> bool:
        return True

    def update(self, params: Params, iteration: int, with_weights: bool) -> tuple[dict[str, float], Any]:
        """The update of `iteration`; rank 0's metrics and (if asked) its new weights for the rollout workers."""
        metrics = update(params, self.layout, iteration, self.state, self.reference)
        weights = None
        if with_weights:
            weights = {key: value.detach().cpu() for key, value in
                       full_state_dict(self.state.reader, self.state.model).items()}
        return metrics, (weights if self.rank.rank == 0 else None)


@ray.remote
class RolloutWorker:
    """One rollout worker: the policy's architecture, loaded with whichever weights the schedule names."""

    def __init__(self, params: Params, layout: Layout, threads: int) -> None:
        _set_threads(threads)
        self.layout = layout
        self.model = load_policy(params, layout, 0, resolve_device(params))
        self.tokenizer = load_tokenizer(layout.reference, params.model.trust_remote_code)
        self.checkpoint = 0

    def generate(self, params: Params, iteration: int, share: int, prompts: pd.DataFrame, checkpoint: int,
                 weights: dict[str, torch.Tensor] | None, round: int = 0) -> tuple[pd.DataFrame, float]:
        started = time.perf_counter()
        if checkpoint != self.checkpoint:
            self.model.load_state_dict(weights)
            self.checkpoint = checkpoint
        rows = generate_share(params, self.layout, iteration, prompts, self.model, self.tokenizer, share, round)
        return rows, time.perf_counter() - started


@ray.remote(num_cpus=1)
class RewardScorer:
    """A reward scorer: its share of an iteration's whole groups, scored as in process
    (`stages.reward.score_rollouts`), by a scoring process of its own that lives as long as the
    run — the user's modules imported and any reward or judge model loaded once, not per iteration."""

    def score(self, rollouts: pd.DataFrame, cfg: RewardConfig, group_size: int | None, where: str,
              cwd: str, path: list[str], max_new_tokens: int | None = None) -> pd.DataFrame:
        # The user's reward modules import here as they do in the controller: from its working
        # directory and import path (the scorer may have started before either changed).
        os.chdir(cwd)
        sys.path[:0] = [entry for entry in path if entry not in sys.path]
        return score_rollouts(rollouts, cfg, group_size, where, max_new_tokens)


def _cause(error: BaseException) -> str:
    if isinstance(error, RayActorError):
        why = getattr(error, "error_msg", None) or str(error)
        if "SIGKILL" in why or "killed" in why.lower() or "exited" in why.lower():
            return "died (its process was killed or exited)"
        return f"died: {one_line(why, 160)}"
    cause = getattr(error, "cause", None) or error
    return f"failed: {type(cause).__name__}: {one_line(cause, 200)}"


def wait(refs: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """The results of `{role: ref}`; the first failure raises one line naming its role.

    A user-fixable error inside a process (a PipelineError: bad rewards, out of memory, a
    non-finite loss) is raised as it is, as in a single process. A process that dies is
    named: `trainer rank 1 died …`. When one trainer fails its peers fail soon after (their
    collective loses a member): the one that died is named, not the survivors."""
    by_ref = {ref: role for role, ref in refs.items()}
    pending = list(by_ref)
    deadline = None if timeout is None else time.monotonic() + timeout
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, pending = ray.wait(pending, num_returns=1, timeout=left)
        if not done:
            raise WorkerError(f"{', '.join(by_ref[ref] for ref in pending)}: no answer within {timeout:.0f} s")
        try:
            ray.get(done[0])
        except RayError as error:
            raise _failure(by_ref, done[0], error, pending) from None
    return {role: ray.get(ref) for role, ref in refs.items()}


def _failure(by_ref: dict[Any, str], ref: Any, error: RayError, pending: list[Any]) -> Exception:
    if isinstance(error, RayTaskError) and isinstance(error.cause, PipelineError):
        return error.cause
    if not isinstance(error, RayActorError):  # a peer may have died first: give the others a moment to say so
        for other in ray.wait(pending, num_returns=len(pending), timeout=5.0)[0] if pending else []:
            try:
                ray.get(other)
            except RayActorError as died:
                return WorkerError(f"{by_ref[other]} {_cause(died)}; the same command resumes after the last "
                                   f"complete iteration")
            except RayError:
                continue
    return WorkerError(f"{by_ref[ref]} {_cause(error)}; the same command resumes after the last complete iteration")


class Cluster:
    """The trainer group and the rollout workers of one run, started at its resume point."""

    def __init__(self, params: Params, layout: Layout, start: int) -> None:
        self.params, self.layout, self.max_lag = params, layout, params.rollout.max_lag
        threads = threads_per_process(params)
        d = params.distributed
        cuda = resolve_device(params).type == "cuda"
        host, port = "127.0.0.1", free_port()
        if d.trainers > 1 and d.address:  # rank 0's address, reachable from the other nodes
            host = ray.util.get_node_ip_address()
        gpu = {"num_gpus": 1} if cuda else {}
        self.trainers = [Trainer.options(num_cpus=1, **gpu).remote(
            rank, d.trainers, host, port, params, layout, start, threads) for rank in range(d.trainers)]
        self.workers = [RolloutWorker.options(num_cpus=1, **gpu).remote(params, layout, threads)
                        for _ in range(d.rollout_workers)]
        self.pending: dict[int, tuple[int, dict[str, Any]]] = {}  # iteration -> (sampling checkpoint, refs)
        try:
            wait({f"trainer rank {r}": t.ready.remote() for r, t in enumerate(self.trainers)})
            for iteration in range(start + 1, min(start + 1 + self.max_lag, params.grpo.iterations) + 1):
                checkpoint = sampling_checkpoint(iteration, self.max_lag)
                weights = ray.put(load_policy(params, layout, checkpoint, torch.device("cpu")).state_dict())
                self._launch(iteration, checkpoint, weights)
        except BaseException:
            self.close()
            raise

    def _launch(self, iteration: int, checkpoint: int, weights: Any) -> None:
        prompts = iteration_prompts(self.params, self.layout, iteration)
        refs = {f"rollout worker {share}": worker.generate.remote(self.params, iteration, share, part, checkpoint, weights)
                for share, (worker, part) in enumerate(zip(self.workers, worker_shares(prompts, len(self.workers))))}
        self.pending[iteration] = (checkpoint, refs)

    def rollout(self, params: Params, layout: Layout, iteration: int) -> dict[str, float]:
        """The iteration's rollouts: its first draw, launched ahead; with dynamic sampling, more rounds
        scored here and generated by the workers with the same checkpoint, before the run goes on."""
        started = time.perf_counter()
        checkpoint, first = self.pending.pop(iteration)
        generating, weights = 0.0, None  # the workers' seconds (each round's slowest share); the sampling weights

        def generate(prompts: pd.DataFrame, round: int) -> pd.DataFrame:
            nonlocal generating, weights
            if round == 0:  # the draw `_launch` sent (the same seed makes the same prompts)
                refs = first
            else:  # a worker may hold a later checkpoint by now (max_lag): send the schedule's again
                if weights is None:  # once per iteration, however many rounds
                    weights = ray.put(load_policy(params, layout, checkpoint, torch.device("cpu")).state_dict())
                refs = {f"rollout worker {share}": worker.generate.remote(params, iteration, share, part, checkpoint,
                                                                         weights, round)
                        for share, (worker, part) in enumerate(zip(self.workers,
                                                                   worker_shares(prompts, len(self.workers))))}
            shares = list(wait(refs).values())
            generating += max(seconds for _, seconds in shares)
            return pd.concat([frame for frame, _ in shares], ignore_index=True)

        rows, sampling = sample_iteration(params, layout, iteration, generate)
        metrics = write_rollouts(params, layout, iteration, rows, generating)
        return {**metrics, **sampling, "seconds/rollout_wait": time.perf_counter() - started,
                "rollout/sampled_by": float(checkpoint), "rollout/lag": float(iteration - 1 - checkpoint)}

    def update(self, params: Params, layout: Layout, iteration: int) -> dict[str, float]:
        ahead = iteration + 1 + self.max_lag
        with_weights = ahead <= params.grpo.iterations
        calls = [t.update.options(num_returns=2).remote(params, iteration, with_weights) for t in self.trainers]
        if with_weights:  # the workers start as soon as rank 0's weights exist, while the others finish
            self._launch(ahead, iteration, calls[0][1])
        results = wait({f"trainer rank {rank}": metrics for rank, (metrics, _) in enumerate(calls)})
        return results["trainer rank 0"]

    def evaluate(self, params: Params, layout: Layout, iteration: int) -> dict[str, float]:
        """The held-out metrics of the policy after `iteration`, from its checkpoint on disk (the trainers
        hold it sharded, or busy): the same weights the in-process engine measures in memory."""
        model = load_policy(params, layout, iteration, resolve_device(params))
        tokenizer = load_tokenizer(checkpoint_path(layout, iteration), params.model.trust_remote_code)
        return curve_point(model, tokenizer, params, layout, iteration)

    def save_policy(self, params: Params, layout: Layout) -> None:
        """models/policy from the last checkpoint on disk: the trained weights exactly."""
        last = params.grpo.iterations
        model = load_policy(params, layout, last, torch.device("cpu"))
        save_policy(model, load_tokenizer(checkpoint_path(layout, last), params.model.trust_remote_code), layout.policy)

    def close(self) -> None:
        for actor in [*self.trainers, *self.workers]:
            ray.kill(actor, no_restart=True)


_scorers: dict[str, Any] = {"session": None, "actors": []}  # the RewardScorers of this Ray session


def reward_scorers(workers: int) -> list:
    """The run's `workers` RewardScorer actors, started on first use (0: stop them)."""
    session = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    if _scorers["session"] != session or len(_scorers["actors"]) != workers:
        if _scorers["session"] == session:
            for actor in _scorers["actors"]:
                ray.kill(actor, no_restart=True)
        _scorers.update(session=session, actors=[RewardScorer.remote() for _ in range(workers)])
    return _scorers["actors"]


def score_in_parallel(workers: int):
    """A `stages.reward` scorer spreading whole groups over `workers` Ray actors, results in order."""

    def score(rollouts: pd.DataFrame, cfg: RewardConfig, group_size: int | None, where: str,
              max_new_tokens: int | None = None) -> pd.DataFrame:
        groups = pd.factorize(rollouts["prompt_id"])[0]
        shares = [rollouts.iloc[np.isin(groups, part)] for part in np.array_split(np.arange(groups.max() + 1), workers)
                  if len(part)]
        refs = {f"reward scorer {n}": scorer.score.remote(share, cfg, group_size, where, os.getcwd(), sys.path,
                                                          max_new_tokens)
                for n, (scorer, share) in enumerate(zip(reward_scorers(workers), shares))}
        try:
            scored = wait(refs)
        except Exception:  # a scorer may be dead or mid-call: a retry starts from fresh ones
            reward_scorers(0)
            raise
        return pd.concat(list(scored.values())).loc[rollouts.index]  # the rows' own order

    return score
