"""MLflow: one run per training run, in one store at the project root, kept complete from disk.

Every way of running (`dvc repro`, `dvc exp run --temp`, a Prefect deployment) logs into
the same sqlite store at the repo root, even when DVC runs the stage in a temporary copy
under `.dvc/tmp/exps/`, so all runs can be compared side by side.

The store is bookkeeping, and training never waits for it or dies of it. A remote tracking
server that restarts, or a sqlite database locked by `mlflow ui` or another run, only
delays the record: the tracking process keeps what the store refused and writes it when
the store answers again. What it still holds when the run ends (after waiting
`GRPO_SERVICES_WAIT_SECONDS`) is not lost either: `runs/tracking.json` says which MLflow
run this is and what it should hold, the manifests hold every iteration's metrics, and
`grpo sync` (or the next run in this directory) writes whatever the store lacks. Each
iteration is written in one call, with an `iteration` metric, and a sync first asks the
store which iterations it has: nothing is logged twice.
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
from typing import Any, Callable

import pandas as pd
import pyarrow.parquet as pq

from flows.paths import project_root
from stages.records.artifacts import Layout, read_json, write_json
from stages.config import Params, flatten
from stages.errors import DiskFullError, ServiceError
from stages.records.manifest import completed_iterations
from stages.records.report import metric_rows

EXPERIMENT = os.environ.get("GRPO_MLFLOW_EXPERIMENT", "grpo")
TRACKING_FILE = "tracking.json"  # under runs/: which MLflow run this is, and what it should hold
FLUSH_SECONDS = 10.0  # iterations reach MLflow in batches at most this far apart (TRL logs every 10 steps)
MAX_METRICS_PER_CALL = 1000  # MLflow's limit for one log_batch
MARKER = "iteration"  # logged with every iteration's metrics: which iterations the store has


def services_wait_seconds() -> float:
    """How long a finished run waits for the Prefect API or the MLflow store to answer before it leaves
    the rest of its record to `grpo sync`: long enough for a server to restart."""
    return float(os.environ.get("GRPO_SERVICES_WAIT_SECONDS", "30"))


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


def run_tags(root: Path, prefect_flow_run_id: str | None, sweep: str = "") -> dict[str, str]:
    tags = {
        "sweep": sweep,
        "git_commit": _git_commit(root),
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME"),
        "dvc_stage": os.environ.get("DVC_STAGE"),
        "prefect_flow_run_id": prefect_flow_run_id,
        "prefect_parent_flow_run_id": os.environ.get("GRPO_PARENT_FLOW_RUN_ID"),
    }
    return {key: value for key, value in tags.items() if value}


def _mlflow(root: Path):
    import mlflow  # imported late: it takes seconds, and stages never need it
    from mlflow.exceptions import MlflowException

    default_store = "MLFLOW_TRACKING_URI" not in os.environ  # read first: set_tracking_uri sets it
    mlflow.set_tracking_uri(tracking_uri(root))
    if default_store and mlflow.get_experiment_by_name(EXPERIMENT) is None:
        # MLflow would put artifacts in ./mlruns of whoever creates the experiment first: in
        # a DVC --temp copy, that folder is deleted with the copy. Pin it to the project root.
        try:
            mlflow.create_experiment(EXPERIMENT, artifact_location=(project_root(root) / "mlruns").as_uri())
        except MlflowException:  # two runs at once on a new store (a sweep's queue workers)
            if mlflow.get_experiment_by_name(EXPERIMENT) is None:  # not a concurrent run's creation: a real error
                raise
    mlflow.set_experiment(EXPERIMENT)
    return mlflow


def read_record(layout: Layout) -> dict[str, Any] | None:
    try:
        return read_json(layout.runs / TRACKING_FILE)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def manifest_entries(layout: Layout, record: dict[str, Any]) -> list[list]:
    """The done iterations of the run `record` describes, as (iteration, ms stamp, metrics, samples) entries."""
    entries = []
    for iteration, metrics in metric_rows(completed_iterations(layout, record["fingerprint"], 10**6)):
        stamp = int((layout.iteration(max(iteration, 1)) / "manifest.json").stat().st_mtime * 1000)
        entries.append([iteration, stamp, numeric(metrics), iteration > 0])
    return entries


def mlflow_params(params: Params) -> dict[str, str]:
    return {k: str(v)[:6000] for k, v in flatten(params).items()}  # MLflow's limit for a param value


def continues(record: dict[str, Any], uri: str, params: dict[str, str], fingerprint: dict[str, str]) -> bool:
    """Whether a run with these params continues the MLflow run on record (a resume) rather than starting one."""
    return bool(record.get("mlflow_run_id") and record.get("tracking_uri") == uri
                and record.get("params") == params and record.get("fingerprint") == fingerprint)


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    # TRL's metric names ("rewards/accuracy") are valid MLflow names as they are.
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


class MlflowRecord:
    """A training run's MLflow run, as runs/tracking.json describes it, brought up to date by `sync`.

    Runs in the tracking process during training, and in `grpo sync` afterwards. `sync`
    raises whatever the store raises; nothing is dropped, so it can simply be called again.
    """

    def __init__(self, root: Path, samples_logged: int, record: dict[str, Any] | None = None) -> None:
        self.layout = Layout(root)
        self.samples_logged = samples_logged
        self.record = record or {}
        self.pending: dict[int, tuple[int, dict[str, float], bool]] = {}  # iteration -> (stamp, metrics, samples)
        self.in_store: set[int] | None = None  # iterations the store holds, once asked
        self.samples_in_store: set[int] | None = None
        self.notes: list[str] = []  # what went missing on our side (not the store's), to be said once
        self._client = None

    def begin(self, params: dict[str, str], fingerprint: dict[str, str], prefect_flow_run_id: str | None,
              name: str | None) -> None:
        """A new run, or the continuation (a resume) of the one on record when its params are the same."""
        uri = tracking_uri(self.layout.root)
        previous = read_record(self.layout) or {}
        same = continues(previous, uri, params, fingerprint)
        self.record = {
            "mlflow_run_id": previous["mlflow_run_id"] if same else None,
            "tracking_uri": uri, "experiment": EXPERIMENT,
            "name": previous.get("name") if same else name,
            "tags": run_tags(self.layout.root, prefect_flow_run_id, params.get("tracking.sweep", "")),
            "params": params, "fingerprint": fingerprint, "prefect_flow_run_id": prefect_flow_run_id,
            "status": "RUNNING", "synced": False,
        }
        self.save()

    def add(self, entries: list[list]) -> None:
        for iteration, stamp, metrics, samples in entries:
            self.pending[int(iteration)] = (int(stamp), metrics, bool(samples))

    def end(self, status: str) -> None:
        self.record.update(status=status, synced=False)
        self.save()

    def save(self) -> None:
        try:
            write_json(self.layout.runs / TRACKING_FILE, self.record)
        except DiskFullError as error:  # the record stays in memory; the full disk is the trainer's to report
            self.notes.append(f"runs/{TRACKING_FILE} not updated: {error}")

    def client(self):
        if self._client is None:
            self._client = _mlflow(self.layout.root).MlflowClient()
        return self._client

    def sync(self) -> None:
        """Write whatever the store lacks: the run, its params, iterations, samples, its end."""
        client = self.client()
        run_id = self.record.get("mlflow_run_id")
        if run_id is None:
            from mlflow.entities import Param

            experiment = client.get_experiment_by_name(self.record.get("experiment", EXPERIMENT))
            run_id = client.create_run(experiment.experiment_id, run_name=self.record["name"],
                                       tags=self.record["tags"]).info.run_id
            client.log_batch(run_id, params=[Param(k, v) for k, v in self.record["params"].items()])
            self.record["mlflow_run_id"] = run_id
            self.save()
            self.in_store, self.samples_in_store = set(), set()
        if self.in_store is None:  # a run on record, continued: ask what the store has
            self.in_store = {m.step for m in client.get_metric_history(run_id, MARKER)}
            self.samples_in_store = {int(a.path[-9:-5]) for a in client.list_artifacts(run_id, "samples")}
            if self.record["status"] == "RUNNING" and client.get_run(run_id).info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
        self._log_iterations(client, run_id)
        if self.record["status"] == "FINISHED":
            self._log_evaluation(client, run_id)  # evaluate may have found the store away, after the run's end
        if self.record["status"] != "RUNNING" and not self.record["synced"]:
            if self.record["status"] == "FINISHED" and self.layout.policy.is_dir() \
                    and not client.list_artifacts(run_id, "policy"):
                client.log_artifacts(run_id, str(self.layout.policy), artifact_path="policy")
            client.set_terminated(run_id, status=self.record["status"])
            self.record["synced"] = True
            self.save()

    def _log_iterations(self, client, run_id: str) -> None:
        from mlflow.entities import Metric

        for iteration in sorted(self.pending):
            stamp, metrics, _ = self.pending[iteration]
            if iteration not in self.in_store:  # one call an iteration: it is in the store whole, or not at all
                batch = [Metric(k, v, stamp, iteration) for k, v in {**metrics, MARKER: iteration}.items()]
                for start in range(0, len(batch), MAX_METRICS_PER_CALL):
                    client.log_batch(run_id, metrics=batch[start:start + MAX_METRICS_PER_CALL])
                self.in_store.add(iteration)
        wanted = sorted(i for i, (_, _, samples) in self.pending.items()
                        if samples and self.samples_logged and i not in self.samples_in_store)
        if wanted:
            with tempfile.TemporaryDirectory(prefix="grpo-samples-") as folder:
                for iteration in wanted:
                    try:
                        table = sample_table(self.layout, iteration, self.samples_logged)
                    except Exception as error:  # an iteration's files gone: its samples only are missing
                        self.notes.append(f"no sample table for iteration {iteration}: {type(error).__name__}")
                        continue
                    # Not log_table: it indexes every table in one run tag, which overflows MLflow's
                    # 8000-character tag limit after ~130 iterations.
                    (Path(folder) / f"iteration_{iteration:04d}.json").write_text(
                        table.to_json(orient="records", indent=1, force_ascii=False), encoding="utf-8")
                client.log_artifacts(run_id, folder, artifact_path="samples")
            self.samples_in_store.update(wanted)
        self.pending.clear()

    def _log_evaluation(self, client, run_id: str) -> None:
        """metrics/eval.json, if it is of this run's policy (written after it) and not in the store yet."""
        evaluation, policy = self.layout.metrics / "eval.json", self.layout.policy / "config.json"
        if not (evaluation.is_file() and policy.is_file()) or evaluation.stat().st_mtime < policy.stat().st_mtime:
            return
        if not any(key.startswith("eval/") for key in client.get_run(run_id).data.metrics):
            log_evaluation_metrics(client, run_id, read_json(evaluation))


def describe_outage(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:160]}"


class Tracker:
    """The MLflow run of one training run: params once, metrics per iteration, samples, model.

    Every store call runs in a separate process (`flows.tracking_worker`), in order, at the
    lowest CPU priority: MLflow's seconds of import and store setup, sqlite and the sample
    tables never take the training process's GIL (as a thread, they cost ~25 ms of every
    iteration), and run on whichever core training leaves idle. Requests go as JSON lines on
    the worker's stdin; each gets one reply line. Iterations are buffered and sent together
    every `flush_seconds` (and at the end): one store transaction for a batch costs about
    what one iteration's costs. A killed run's MLflow run lacks at most its last
    `flush_seconds`, and is marked KILLED (the worker sees its stdin close).

    Nothing here raises because of the store: its trouble is reported through `warn`, once
    when it starts and once at the end if the record is still incomplete.
    """

    def __init__(self, params: Params, layout: Layout, fingerprint: dict[str, str],
                 prefect_flow_run_id: str | None = None, run_name: str | None = None,
                 flush_seconds: float = FLUSH_SECONDS,
                 warn: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> None:
        self.flush_seconds = flush_seconds
        self.warn = warn
        self.uri = tracking_uri(layout.root)
        self.run_id: str | None = None
        self.synced = False
        self._buffer: list[list] = []  # (iteration, ms stamp, metrics, samples)
        self._flushed = time.monotonic()
        self._sent = 0
        self._replies: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._answered = 0
        self._outage: str | None = None
        code_root = str(Path(__file__).resolve().parents[1])  # this checkout's flows/, wherever we run
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [code_root, os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flows.tracking_worker", str(layout.root.resolve()),
             str(params.eval.samples_logged)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, encoding="utf-8")
        threading.Thread(target=self._read_replies, name="mlflow-replies", daemon=True).start()
        previous, logged_params = read_record(layout), mlflow_params(params)
        if (previous and not previous.get("synced", True)
                and not continues(previous, self.uri, logged_params, fingerprint)):
            # An earlier, different run whose record the store never completed: its iterations are
            # still on disk, not for long (this run replaces them). Read them now, send them first.
            self._send({"op": "catch_up", "record": previous, "entries": [
                entry[:3] + [False] for entry in manifest_entries(layout, previous)]})
        self._send({"op": "start", "params": logged_params,
                    "fingerprint": fingerprint, "prefect_flow_run_id": prefect_flow_run_id,
                    "name": run_name or os.environ.get("GRPO_RUN_NAME") or os.environ.get("DVC_EXP_NAME")})

    def _read_replies(self) -> None:
        for line in self.process.stdout:
            self._replies.put(json.loads(line))
        self._replies.put(None)  # the worker is gone

    def _send(self, request: dict[str, Any]) -> None:
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            self._sent += 1
        except (BrokenPipeError, ValueError):
            self._note(f"the tracking process exited (code {self.process.poll()})")

    def _note(self, outage: str | None) -> None:
        """Say once when logging stops (the store does not answer, mostly), and once when it resumes."""
        if outage and not self._outage:
            self.warn(f"MLflow: logging to {self.uri} paused ({outage}); training goes on, and what it logs "
                      f"is kept until it can be written")
        elif self._outage and not outage:
            self.warn("MLflow: logging resumed; the iterations it missed are logged")
        self._outage = outage

    def _take_replies(self, wait: bool) -> None:
        while self._answered < self._sent:
            try:
                reply = self._replies.get(block=wait)
            except queue.Empty:
                return
            if reply is None:
                self._replies.put(None)  # keep the end in view for later calls
                self._note(f"the tracking process exited (code {self.process.wait()})")
                return
            self._answered += 1
            self.run_id = reply.get("run_id", self.run_id)
            self.synced = reply.get("synced", self.synced)
            for line in reply.get("notes", []):
                self.warn(f"MLflow: {line}")
            self._note(reply.get("outage"))

    def log_iteration(self, iteration: int, metrics: dict[str, Any], samples: bool = True) -> None:
        """Queue one iteration's metrics (and its sample completions) for the next flush."""
        self._buffer.append([iteration, int(time.time() * 1000), numeric(metrics), samples])
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
        self._take_replies(wait=False)

    @property
    def unanswered(self) -> int:
        """Requests the tracking process has not answered yet (it answers each once the store has it)."""
        self._take_replies(wait=False)
        return self._sent - self._answered

    def wait(self) -> None:
        """Return once the tracking process has answered everything sent so far."""
        self._take_replies(wait=True)

    def finish(self, status: str = "FINISHED") -> None:
        """Send what is buffered, close the run (with the policy, when it finished), and wait for the
        tracking process: it tries the store for `services_wait_seconds()` before leaving the rest to
        `grpo sync`."""
        # One request, so that a store that does not answer is tried once for both.
        self._send({"op": "finish", "entries": self._buffer, "status": status,
                    "wait_seconds": services_wait_seconds()})
        self._buffer = []
        with contextlib.suppress(BrokenPipeError, ValueError):
            self.process.stdin.close()
        self._take_replies(wait=True)
        self.process.wait()
        if not self.synced:
            self.warn(f"MLflow: the run's record in {self.uri} is not complete ({self._outage or 'see above'}); "
                      f"everything is on disk: `grpo sync` completes it when the store answers "
                      f"(the next run in this directory does too)")


def complete_record(layout: Layout, samples_logged: int) -> dict[str, Any]:
    """`grpo sync`: write to the store whatever the run on record (runs/tracking.json) lacks, from the manifests."""
    record = read_record(layout)
    if not record:
        return {}
    if record["tracking_uri"] != tracking_uri(layout.root):
        raise ServiceError(f"runs/{TRACKING_FILE}: the run is recorded in the MLflow store {record['tracking_uri']}, "
                           f"but MLFLOW_TRACKING_URI points at {tracking_uri(layout.root)}: set it to the former")
    if record["status"] == "RUNNING":  # `grpo sync` holds the run lock: no run is going on here
        record.update(status="KILLED", synced=False)
    mlflow_record = MlflowRecord(layout.root, samples_logged, record)
    mlflow_record.add(manifest_entries(layout, record))
    try:
        mlflow_record.sync()
    except Exception as error:  # the store is away (still): nothing was lost, try again later
        raise ServiceError(f"MLflow: the store at {record['tracking_uri']} does not answer "
                           f"({describe_outage(error)}); nothing was lost: run `grpo sync` again later") from None
    return {"mlflow_run_id": record["mlflow_run_id"], "mlflow_status": record["status"],
            "iterations_in_mlflow": len(mlflow_record.in_store)}


def log_evaluation_metrics(client, run_id: str, metrics: dict[str, float]) -> None:
    from mlflow.entities import Metric

    stamp = int(pd.Timestamp.now().timestamp() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"eval/{k}", float(v), stamp, 0) for k, v in metrics.items()])


def log_evaluation(layout: Layout, metrics: dict[str, float],
                   warn: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> str | None:
    """Add the held-out metrics to the training run that produced this policy, if the store answers
    (if not, `grpo sync` adds them from metrics/eval.json later)."""
    record = read_record(layout)
    if not record or not record.get("mlflow_run_id"):
        return None
    try:
        log_evaluation_metrics(_mlflow(layout.root).MlflowClient(), record["mlflow_run_id"], metrics)
    except Exception as error:  # the store is bookkeeping: the evaluation is in metrics/eval.json
        warn(f"MLflow: the evaluation was not logged ({describe_outage(error)}); `grpo sync` logs it "
             f"from metrics/eval.json when the store answers")
        return None
    return record["mlflow_run_id"]


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
