"""MLflow tracking of a training run, against a real sqlite store: what reaches MLflow, and when."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from stages.artifacts import Layout
from stages.config import load_params
from tests.conftest import ROOT


@pytest.fixture
def store(tmp_path, monkeypatch):
    """The default store of a project at tmp_path: sqlite at its root, artifacts under it."""
    from flows.tracking import EXPERIMENT, _mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow = _mlflow(tmp_path)
    try:
        yield mlflow.MlflowClient(), mlflow.get_experiment_by_name(EXPERIMENT)
    finally:
        mlflow.set_tracking_uri(None)


def write_iteration(layout: Layout, iteration: int) -> None:
    """The three parquet files a sample table is read from: two prompts, two completions each."""
    keys = {"prompt_id": ["p0", "p0", "p1", "p1"], "sample": [0, 1, 0, 1]}
    folder = layout.iteration(iteration)
    folder.mkdir(parents=True)
    pd.DataFrame({**keys, "prompt": ["1+1"] * 2 + ["2+2"] * 2,
                  "completion": [f"it{iteration} c{i}" for i in range(4)]}).to_parquet(folder / "rollouts.parquet")
    pd.DataFrame({**keys, "accuracy": [1.0, 0.0, 1.0, 1.0], "reward": [1.2, 0.2, 1.2, 1.2]}).to_parquet(
        folder / "rewards.parquet")
    pd.DataFrame({**keys, "advantage": [0.7, -0.7, 0.0, 0.0]}).to_parquet(folder / "advantages.parquet")


def metrics_of(iteration: int, count: int = 3) -> dict[str, float]:
    return {f"metric/{k}": iteration + k / 10 for k in range(count)}


def run_of(client, experiment):
    (run,) = client.search_runs([experiment.experiment_id])
    return run


def test_buffered_iterations_all_reach_mlflow_at_finish_with_their_steps(tmp_path, store):
    from flows.tracking import Tracker

    client, experiment = store
    params = load_params(ROOT / "params.yaml", ["eval.samples_logged=3"])
    layout = Layout(tmp_path)
    tracker = Tracker(params, layout, run_name="buffered", flush_seconds=3600)
    for iteration in (1, 2):
        write_iteration(layout, iteration)
        tracker.log_iteration(iteration, {**metrics_of(iteration), "note": "not a number"})
    tracker.wait()  # the run exists, the iterations are still buffered
    assert client.get_metric_history(run_of(client, experiment).info.run_id, "metric/0") == []

    tracker.finish()
    run = run_of(client, experiment)
    assert run.info.status == "FINISHED" and run.info.run_name == "buffered"
    history = client.get_metric_history(run.info.run_id, "metric/1")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(1, 1.1), (2, 2.1)]
    assert "note" not in run.data.metrics
    samples = sorted(a.path for a in client.list_artifacts(run.info.run_id, "samples"))
    assert samples == ["samples/iteration_0001.json", "samples/iteration_0002.json"]
    table = json.loads(open(client.download_artifacts(run.info.run_id, samples[1], str(tmp_path / "dl"))).read())
    assert [row["completion"] for row in table] == ["it2 c0", "it2 c1", "it2 c2"]  # the first samples_logged
    assert [(row["reward"], row["advantage"]) for row in table] == [(1.2, 0.7), (0.2, -0.7), (1.2, 0.0)]


def test_a_zero_flush_interval_sends_each_iteration_as_it_is_logged(tmp_path, store):
    from flows.tracking import Tracker

    client, experiment = store
    tracker = Tracker(load_params(ROOT / "params.yaml"), Layout(tmp_path), flush_seconds=0)
    tracker.log_iteration(1, metrics_of(1), samples=False)
    tracker.wait()
    run = run_of(client, experiment)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "metric/2")] == [1]
    tracker.finish()


def test_more_metrics_than_one_mlflow_call_takes_are_split_and_all_logged(tmp_path, store):
    from flows.tracking import MAX_METRICS_PER_CALL, Tracker

    client, experiment = store
    tracker = Tracker(load_params(ROOT / "params.yaml"), Layout(tmp_path), flush_seconds=3600)
    iterations = MAX_METRICS_PER_CALL // 20 + 5  # 20 metrics each: more than one call's worth
    for iteration in range(1, iterations + 1):  # as a resumed run re-logs its done iterations
        tracker.log_iteration(iteration, metrics_of(iteration, count=20), samples=False)
    tracker.finish()
    run = run_of(client, experiment)
    assert len(client.get_metric_history(run.info.run_id, "metric/19")) == iterations


def test_a_failed_store_call_is_raised_on_a_later_call_and_the_run_closes_failed(tmp_path, store):
    from flows.tracking import Tracker, TrackingError

    client, experiment = store
    tracker = Tracker(load_params(ROOT / "params.yaml"), Layout(tmp_path), flush_seconds=0)
    tracker.log_iteration(1, metrics_of(1))  # its sample table's parquet files do not exist
    with pytest.raises(TrackingError, match=r"rollouts\.parquet"):
        tracker.wait()
    tracker.finish()  # as the flow does after a failure: the tracking process records it as FAILED
    assert run_of(client, experiment).info.status == "FAILED"


KILLED_MIDWAY = """
import os, signal, sys
from pathlib import Path
from flows.tracking import Tracker
from stages.artifacts import Layout
from stages.config import load_params
tracker = Tracker(load_params(sys.argv[1]), Layout(Path(sys.argv[2])), run_name="killed", flush_seconds=0)
tracker.log_iteration(1, {"reward": 0.5}, samples=False)
tracker.wait()
os.kill(os.getpid(), signal.SIGKILL)  # no finish(): the training process dies as a SIGKILL leaves it
"""


def test_a_training_process_killed_midway_leaves_its_run_killed_with_what_was_sent(tmp_path, store):
    import subprocess
    import sys
    import time

    client, experiment = store
    subprocess.run([sys.executable, "-c", KILLED_MIDWAY, str(ROOT / "params.yaml"), str(tmp_path)], cwd=ROOT)
    deadline = time.monotonic() + 60
    while (run := run_of(client, experiment)).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.2)  # the tracking process closes the run once it sees its stdin end
    assert run.info.status == "KILLED" and run.info.run_name == "killed"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "reward")] == [0.5]
