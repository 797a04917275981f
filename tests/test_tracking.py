"""MLflow tracking of a training run, against a real sqlite store: what reaches MLflow, and when,
and that a store that is locked or away delays the record without stopping training or losing
or doubling anything."""

from __future__ import annotations

import json
import sqlite3
import time

import pandas as pd
import pytest

from stages.records.artifacts import Layout
from stages.params import load_params
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
    (folder / "update.json").write_text("{}")


def metrics_of(iteration: int, count: int = 3) -> dict[str, float]:
    return {f"metric/{k}": iteration + k / 10 for k in range(count)}


def run_of(client, experiment):
    (run,) = client.search_runs([experiment.experiment_id])
    return run


FINGERPRINT = {"params": "p", "reference": "r", "train_prompts": "t"}


def tracker_for(tmp_path, flush_seconds, overrides=(), warn=None, **kwargs):
    from flows.tracking import Tracker

    return Tracker(load_params(ROOT / "params.yaml", list(overrides)), Layout(tmp_path), FINGERPRINT,
                   flush_seconds=flush_seconds, **({"warn": warn} if warn else {}), **kwargs)


def steps_of(client, run, key="metric/0"):
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


def test_buffered_iterations_all_reach_mlflow_at_finish_with_their_steps(tmp_path, store):
    client, experiment = store
    layout = Layout(tmp_path)
    tracker = tracker_for(tmp_path, 3600, ["eval.samples_logged=3"], run_name="buffered")
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
    client, experiment = store
    tracker = tracker_for(tmp_path, 0)
    tracker.log_iteration(1, metrics_of(1), samples=False)
    tracker.wait()
    run = run_of(client, experiment)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "metric/2")] == [1]
    tracker.finish()


def test_more_metrics_than_one_mlflow_call_takes_are_split_and_all_logged(tmp_path, store):
    from flows.tracking import MAX_METRICS_PER_CALL

    client, experiment = store
    tracker = tracker_for(tmp_path, 3600)
    iterations = MAX_METRICS_PER_CALL // 20 + 5  # 20 metrics each: more than one call's worth
    for iteration in range(1, iterations + 1):  # as a resumed run re-logs its done iterations
        tracker.log_iteration(iteration, metrics_of(iteration, count=20), samples=False)
    tracker.finish()
    run = run_of(client, experiment)
    assert len(client.get_metric_history(run.info.run_id, "metric/19")) == iterations


def test_an_iteration_whose_files_are_gone_loses_only_its_samples(tmp_path, store):
    client, experiment = store
    warnings = []
    tracker = tracker_for(tmp_path, 0, warn=warnings.append)
    tracker.log_iteration(1, metrics_of(1))  # its sample table's parquet files do not exist
    tracker.finish()
    run = run_of(client, experiment)
    assert run.info.status == "FINISHED" and steps_of(client, run) == [1]
    assert client.list_artifacts(run.info.run_id, "samples") == []
    assert any("no sample table for iteration 1: FileNotFoundError" in line for line in warnings)


def test_a_locked_store_delays_the_record_but_not_training_and_nothing_is_logged_twice(tmp_path, store):
    """As when `mlflow ui` or another run holds the sqlite database: MLflow gives up after 20 s."""
    client, experiment = store
    layout, warnings = Layout(tmp_path), []
    tracker = tracker_for(tmp_path, 0, warn=warnings.append)
    tracker.wait()  # the run exists
    holder = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    for iteration in (1, 2, 3):
        write_iteration(layout, iteration)
        tracker.log_iteration(iteration, metrics_of(iteration))
        # Training never waits for the store: the call returned while the store still holds this
        # iteration back (the tracking process answers once MLflow gives up, after 20 s).
        assert tracker.unanswered > 0
    deadline = time.monotonic() + 180  # a bound, not a speed: the suite runs beside other tests
    while not any("logging to" in line and "paused" in line for line in warnings) and time.monotonic() < deadline:
        tracker.flush()
        time.sleep(0.5)
    assert any("paused" in line and "database is locked" in line for line in warnings), warnings
    holder.execute("COMMIT")
    holder.close()
    write_iteration(layout, 4)
    tracker.log_iteration(4, metrics_of(4))
    tracker.finish()
    run = run_of(client, experiment)
    assert run.info.status == "FINISHED"
    assert steps_of(client, run) == [1, 2, 3, 4]  # each once
    assert len(client.list_artifacts(run.info.run_id, "samples")) == 4
    assert any("logging resumed" in line for line in warnings)


def test_a_resumed_run_continues_its_mlflow_run_and_logs_nothing_twice(tmp_path, store):
    client, experiment = store
    first = tracker_for(tmp_path, 3600)
    for iteration in (1, 2):
        first.log_iteration(iteration, metrics_of(iteration), samples=False)
    first.finish("KILLED")
    again = tracker_for(tmp_path, 3600)  # same params and fingerprint: the same training run
    for iteration in (1, 2, 3):  # as train() re-logs the done iterations, then goes on
        again.log_iteration(iteration, metrics_of(iteration), samples=False)
    again.finish()
    run = run_of(client, experiment)  # one run, not two
    assert run.info.status == "FINISHED" and steps_of(client, run) == [1, 2, 3]


def test_a_store_away_at_the_end_is_completed_by_grpo_sync_from_the_manifests(tmp_path, store, monkeypatch):
    """The record a finished run could not write is rebuilt from runs/: manifests, samples, the end."""
    from flows.cli import sync_step
    from stages.records.manifest import write_manifest

    client, experiment = store
    monkeypatch.setenv("GRPO_SERVICES_WAIT_SECONDS", "0")
    layout, warnings = Layout(tmp_path), []
    tracker = tracker_for(tmp_path, 3600, warn=warnings.append)
    tracker.wait()
    holder = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # from here to the end of the run
    for iteration in (1, 2):
        write_iteration(layout, iteration)
        layout.checkpoint(iteration).mkdir(parents=True)
        write_manifest(layout, iteration, FINGERPRINT,
                       "r" if iteration == 1 else json.loads((layout.iteration(1) / "manifest.json").read_text())[
                           "checkpoint"], metrics_of(iteration))
        tracker.log_iteration(iteration, metrics_of(iteration))
    tracker.finish()
    assert any("grpo sync" in line for line in warnings)
    holder.execute("COMMIT")
    holder.close()
    assert steps_of(client, run_of(client, experiment)) == []

    params = load_params(ROOT / "params.yaml")
    synced = sync_step(params, layout)
    assert synced["iterations_in_mlflow"] == 2
    sync_step(params, layout)  # again: nothing twice
    run = run_of(client, experiment)
    assert run.info.status == "FINISHED" and steps_of(client, run) == [1, 2]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "metric/1")] in ([1.1, 2.1], [2.1, 1.1])
    assert len(client.list_artifacts(run.info.run_id, "samples")) == 2


KILLED_MIDWAY = """
import os, signal, sys
from pathlib import Path
from flows.tracking import Tracker
from stages.records.artifacts import Layout
from stages.params import load_params
fingerprint = {"params": "p", "reference": "r", "train_prompts": "t"}
tracker = Tracker(load_params(sys.argv[1]), Layout(Path(sys.argv[2])), fingerprint, run_name="killed", flush_seconds=0)
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
    deadline = time.monotonic() + 180  # a bound, not a speed: the suite runs beside other tests
    while (run := run_of(client, experiment)).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.2)  # the tracking process closes the run once it sees its stdin end
    assert run.info.status == "KILLED" and run.info.run_name == "killed"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "reward")] == [0.5]
