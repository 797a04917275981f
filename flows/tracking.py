"""MLflow: one run per pipeline run, in one store at the project root.

Every way of running (`dvc repro`, `dvc exp run --temp`, a Prefect deployment) logs into
the same sqlite store at the repo root, even when DVC runs the stage in a temporary copy
under `.dvc/tmp/exps/`, so all runs can be compared side by side.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from flows.paths import project_root
from stages.artifacts import Layout, read_json, write_json
from stages.config import Params, flatten

EXPERIMENT = os.environ.get("GRPO_MLFLOW_EXPERIMENT", "grpo")
TRACKING_FILE = "tracking.json"  # under runs/: which MLflow run and Prefect flow run this is
FLUSH_SECONDS = 10.0  # iterations reach MLflow in batches at most this far apart (TRL logs every 10 steps)
MAX_METRICS_PER_CALL = 1000  # MLflow's limit for one log_batch


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root(root) / 'mlflow.db'}"


def _git_commit(root: Path) -> str | None:
    baseline = os.environ.get("DVC_EXP_BASELINE_REV")
    if baseline:
        return baseline
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def run_tags(root: Path, prefect_flow_run_id: str | None) -> dict[str, str]:
    tags = {
        "git_commit": _git_commit(root),
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME"),
        "dvc_stage": os.environ.get("DVC_STAGE"),
        "prefect_flow_run_id": prefect_flow_run_id,
        "prefect_parent_flow_run_id": os.environ.get("GRPO_PARENT_FLOW_RUN_ID"),
    }
    return {key: value for key, value in tags.items() if value}


def _mlflow(root: Path):
    import mlflow  # imported late: it takes seconds, and stages never need it

    default_store = "MLFLOW_TRACKING_URI" not in os.environ  # read first: set_tracking_uri sets it
    mlflow.set_tracking_uri(tracking_uri(root))
    if default_store and mlflow.get_experiment_by_name(EXPERIMENT) is None:
        # MLflow would put artifacts in ./mlruns of whoever creates the experiment first: in
        # a DVC --temp copy, that folder is deleted with the copy. Pin it to the project root.
        mlflow.create_experiment(EXPERIMENT, artifact_location=(project_root(root) / "mlruns").as_uri())
    mlflow.set_experiment(EXPERIMENT)
    return mlflow


class MlflowRun:
    """The store calls of one training run, made in order, synchronously: the tracking process's half."""

    def __init__(self, root: Path, samples_logged: int) -> None:
        self.layout = Layout(root)
        self.samples_logged = samples_logged
        self.mlflow = _mlflow(root)
        self.client = self.mlflow.MlflowClient()
        self.run_id: str | None = None

    def start(self, params: dict[str, str], prefect_flow_run_id: str | None, name: str | None) -> str:
        from mlflow.entities import Param

        experiment = self.mlflow.get_experiment_by_name(EXPERIMENT)
        run = self.client.create_run(experiment.experiment_id, run_name=name,
                                     tags=run_tags(self.layout.root, prefect_flow_run_id))
        self.run_id = run.info.run_id
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])
        write_json(self.layout.runs / TRACKING_FILE,
                   {"mlflow_run_id": self.run_id, "prefect_flow_run_id": prefect_flow_run_id})
        return self.run_id

    def log_iterations(self, entries: list[tuple[int, int, dict[str, float], bool]]) -> None:
        """Metrics of (iteration, ms stamp, metrics, with samples) entries, and their sample tables."""
        from mlflow.entities import Metric

        metrics = [Metric(k, v, stamp, iteration)
                   for iteration, stamp, values, _ in entries for k, v in values.items()]
        for start in range(0, len(metrics), MAX_METRICS_PER_CALL):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + MAX_METRICS_PER_CALL])
        with_samples = [iteration for iteration, _, _, samples in entries if samples and self.samples_logged]
        if not with_samples:
            return
        with tempfile.TemporaryDirectory(prefix="grpo-samples-") as folder:
            for iteration in with_samples:
                table = sample_table(self.layout, iteration, self.samples_logged)
                # Not log_table: it indexes every table in one run tag, which overflows MLflow's
                # 8000-character tag limit after ~130 iterations.
                (Path(folder) / f"iteration_{iteration:04d}.json").write_text(
                    table.to_json(orient="records", indent=1, force_ascii=False), encoding="utf-8")
            self.client.log_artifacts(self.run_id, folder, artifact_path="samples")

    def finish(self, status: str) -> None:
        """Close the run; a finished one gets the policy as an artifact."""
        if status == "FINISHED" and self.layout.policy.is_dir():
            self.client.log_artifacts(self.run_id, str(self.layout.policy), artifact_path="policy")
        self.client.set_terminated(self.run_id, status=status)


class TrackingError(RuntimeError):
    """The tracking process could not write to MLflow."""


class Tracker:
    """The MLflow run of one training run: params once, metrics per iteration, samples, model.

    Every store call runs in a separate process (`flows.tracking_worker`), in order, at the
    lowest CPU priority: MLflow's seconds of import and store setup, sqlite and the sample
    tables never take the training process's GIL (as a thread, they cost ~25 ms of every
    iteration), and run on whichever core training leaves idle. Requests go as JSON lines on
    the worker's stdin; each gets one reply line. Iterations are buffered and sent together
    every `flush_seconds` (and at the end): one store transaction for a batch costs about
    what one iteration's costs. The manifests on disk hold every iteration's metrics at once;
    a killed run's MLflow run lacks at most its last `flush_seconds`, and is marked KILLED
    (the worker sees its stdin close). A failed call is raised on the next call here.
    """

    def __init__(self, params: Params, layout: Layout, prefect_flow_run_id: str | None = None,
                 run_name: str | None = None, flush_seconds: float = FLUSH_SECONDS) -> None:
        self.flush_seconds = flush_seconds
        self.run_id: str | None = None
        self._buffer: list[tuple[int, int, dict[str, float], bool]] = []  # (iteration, ms stamp, metrics, samples)
        self._flushed = time.monotonic()
        self._sent = 0
        self._replies: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._answered = 0
        code_root = str(Path(__file__).resolve().parents[1])  # this checkout's flows/, wherever we run
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [code_root, os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flows.tracking_worker", str(layout.root.resolve()),
             str(params.eval.samples_logged)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, encoding="utf-8")
        threading.Thread(target=self._read_replies, name="mlflow-replies", daemon=True).start()
        self._send({"op": "start", "params": {k: str(v)[:6000] for k, v in flatten(params).items()},
                    "prefect_flow_run_id": prefect_flow_run_id,
                    "name": run_name or os.environ.get("GRPO_RUN_NAME") or os.environ.get("DVC_EXP_NAME")})

    def _read_replies(self) -> None:
        for line in self.process.stdout:
            self._replies.put(json.loads(line))
        self._replies.put(None)  # the worker is gone

    def _send(self, request: dict[str, Any]) -> None:
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            raise TrackingError(f"the MLflow tracking process exited (code {self.process.wait()})") from None
        self._sent += 1

    def _collect(self, wait: bool) -> None:
        """Take in the replies so far (with `wait`: all of them), raising the first error among them."""
        errors = self._take_replies(wait)
        if errors:
            raise errors[0]

    def _take_replies(self, wait: bool) -> list[TrackingError]:
        errors = []
        while self._answered < self._sent:
            try:
                reply = self._replies.get(block=wait)
            except queue.Empty:
                break
            if reply is None:
                self._replies.put(None)  # keep the end in view for later calls
                errors.append(TrackingError(f"the MLflow tracking process exited (code {self.process.wait()})"))
                break
            self._answered += 1
            self.run_id = reply.get("run_id", self.run_id)
            if "error" in reply:
                errors.append(TrackingError(f"MLflow: {reply['error']}"))
        return errors

    def log_iteration(self, iteration: int, metrics: dict[str, Any], samples: bool = True) -> None:
        """Queue one iteration's metrics (and its sample completions) for the next flush."""
        # TRL's metric names ("rewards/accuracy") are valid MLflow names as they are.
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self._buffer.append((iteration, int(time.time() * 1000), numeric, samples))
        if time.monotonic() - self._flushed >= self.flush_seconds:
            self.flush()

    def _send_buffer(self) -> None:
        if self._buffer:
            self._send({"op": "log_iterations", "entries": self._buffer})
            self._buffer = []

    def flush(self) -> None:
        """Send everything buffered to the tracking process now."""
        self._send_buffer()
        self._flushed = time.monotonic()
        self._collect(wait=False)

    def wait(self) -> None:
        """Return once MLflow holds everything sent so far (not what is still buffered here)."""
        self._collect(wait=True)

    def finish(self, status: str = "FINISHED") -> None:
        """Send what is buffered, close the run (with the policy, when it finished), and wait for it."""
        errors: list[TrackingError] = []
        try:
            self._send_buffer()
            # After an earlier failure, the worker closes the run as FAILED whatever `status` says.
            self._send({"op": "finish", "status": status})
        except TrackingError as error:  # the worker is gone: nothing more to send
            errors.append(error)
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.close()
        self.process.wait()
        errors += self._take_replies(wait=True)
        if errors and status == "FINISHED":
            raise errors[0]


def log_evaluation(layout: Layout, metrics: dict[str, float]) -> str | None:
    """Add the held-out metrics to the training run that produced this policy."""
    tracking = layout.runs / TRACKING_FILE
    if not tracking.is_file():
        return None
    run_id = read_json(tracking)["mlflow_run_id"]
    mlflow = _mlflow(layout.root)
    client = mlflow.MlflowClient()
    from mlflow.entities import Metric

    stamp = int(pd.Timestamp.now().timestamp() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"eval/{k}", float(v), stamp, 0) for k, v in metrics.items()])
    return run_id


def sample_table(layout: Layout, iteration: int, count: int) -> pd.DataFrame:
    """The first `count` completions of an iteration, with their rewards and advantage."""
    folder = layout.iteration(iteration)

    def read(name: str, columns: list[str] | None = None) -> pd.DataFrame:
        return pq.read_table(folder / name, columns=columns).to_pandas()  # pyarrow direct: a third of pandas' cost

    rollouts = read("rollouts.parquet", ["prompt_id", "sample", "prompt", "completion"]).head(count)
    table = rollouts.merge(read("rewards.parquet"), on=["prompt_id", "sample"])
    table = table.merge(read("advantages.parquet", ["prompt_id", "sample", "advantage"]), on=["prompt_id", "sample"])
    table.insert(0, "iteration", iteration)
    return table
