"""The three ways a user drives the pipeline, with the real tools: `dvc repro`, a Prefect
deployment triggered on a real server, and MLflow runs compared by the `compare` command."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TINY, start_prefect_server, stop

BIN = Path(sys.executable).parent


def _run(command, cwd, env, timeout=600, check=True):
    env = {**env, "PWD": str(cwd)}  # as a shell would set it: prefect.yaml reads {{ $PWD }}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{command} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def _tiny_params(source: Path) -> str:
    raw = yaml.safe_load(source.read_text())
    from stages.config import set_key

    for override in TINY:
        key, _, value = override.partition("=")
        set_key(raw, key, yaml.safe_load(value))
    return yaml.safe_dump(raw, sort_keys=False)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    state = tmp_path_factory.mktemp("state")
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith(("PREFECT_", "MLFLOW_", "DVC_", "GRPO_", "PYTEST_"))}
    environment.update({
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_HOME": str(state / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "DVC_NO_ANALYTICS": "1",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
    })
    return environment


@pytest.fixture(scope="module")
def repo(tmp_path_factory, env):
    """A git + DVC copy of this project (its working tree, as a user would clone it) on a tiny config."""
    target = tmp_path_factory.mktemp("repo")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    (target / "params.yaml").write_text(_tiny_params(ROOT / "params.yaml"))
    _run(["git", "init", "-q", "-b", "main"], target, env)
    _run(["git", "add", "-A"], target, env)
    _run(["git", "commit", "-q", "-m", "tiny"], target, env)
    return target


def _mlflow_runs(repo: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("grpo")
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def _stages_run(output: str) -> list[str]:
    return [stage for stage in ("prepare", "reference", "train", "evaluate") if f"Running stage '{stage}'" in output]


def test_dvc_repro_runs_the_dag_once_and_reruns_only_what_a_grpo_knob_touches(repo, env):
    first = _run(["dvc", "repro"], repo, env)
    assert _stages_run(first.stdout) == ["prepare", "reference", "train", "evaluate"]
    # Staged in git (core.autostage), so that an experiment's temporary copy starts from it (below).
    assert "dvc.lock" in _run(["git", "diff", "--cached", "--name-only"], repo, env).stdout.split()
    metrics = json.loads((repo / "metrics" / "eval.json").read_text())
    assert 0 <= metrics["policy_accuracy"] <= 1

    again = _run(["dvc", "repro"], repo, env)
    assert _stages_run(again.stdout) == []

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["grpo"]["lr"] = 0.002
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = _run(["dvc", "repro"], repo, env)
    assert _stages_run(changed.stdout) == ["train", "evaluate"]
    diff = _run(["dvc", "params", "diff", "--json"], repo, env)
    assert json.loads(diff.stdout)["params.yaml"]["grpo.lr"]["new"] == 0.002

    client, runs = _mlflow_runs(repo)  # the default store: sqlite at the repo root
    assert len(runs) == 2
    latest = runs[-1]
    assert latest.data.params["grpo.lr"] == "0.002"
    history = client.get_metric_history(latest.info.run_id, "reward")
    assert sorted(m.step for m in history) == [1, 2]
    assert "eval/policy_accuracy" in latest.data.metrics
    assert latest.data.tags["git_commit"]
    assert client.list_artifacts(latest.info.run_id, "policy")  # the final model
    assert client.list_artifacts(latest.info.run_id, "samples")  # completions per iteration

    _run(["git", "checkout", "params.yaml"], repo, env)


def _queue_settled(repo: Path, env: dict[str, str]) -> str | None:
    status = _run(["dvc", "queue", "status"], repo, env).stdout
    busy = any(word in status for word in (" Queued", " Running")) or "0 active" not in status
    return None if busy else status


def test_a_queued_sweep_runs_each_experiment_once_grouped_in_mlflow(repo, env, tmp_path):
    """DVC's grid syntax, queued and run by two queue workers at once: a DVC experiment per point,
    each reusing the workspace's prepare and reference, one MLflow run each under one sweep tag with
    its held-out curve, and `grpo compare --sweep` over them. (Two points, one per worker: a 2x2
    grid is the same machinery twice over.)"""
    grid = ["-S", "tracking.sweep=beta", "-S", "eval.every=1",
            "-S", "threads=1",  # two runs at once on two cores: one thread each (README, "Sweeps")
            "-S", "grpo.beta=0.0,0.02", "-S", "grpo.lr=0.003"]
    _run(["dvc", "exp", "run", "--queue", *grid], repo, env)
    _run(["dvc", "queue", "start", "-j", "2"], repo, env)
    status = _wait_for(lambda: _queue_settled(repo, env), 900, "the queued sweep to finish")

    shown = json.loads(_run(["dvc", "exp", "show", "--json"], repo, env).stdout)
    swept = {e["name"]: e["revs"][0]["data"] for commit in shown for e in commit.get("experiments") or []
             if e["revs"][0]["data"]["params"]["params.yaml"]["data"].get("tracking", {}).get("sweep") == "beta"}
    assert len(swept) == 2, status
    grid_points = {(d["params"]["params.yaml"]["data"]["grpo"]["beta"], d["params"]["params.yaml"]["data"]["grpo"]["lr"])
                   for d in swept.values()}
    assert grid_points == {(0.0, 0.003), (0.02, 0.003)}
    for name, data in swept.items():
        assert 0 <= data["metrics"]["metrics/eval.json"]["data"]["policy_accuracy"] <= 1
        assert _stages_run(_run(["dvc", "queue", "logs", name], repo, env).stdout) == ["train", "evaluate"], name

    client, runs = _mlflow_runs(repo)
    grouped = [r for r in runs if r.data.tags.get("sweep") == "beta"]
    assert sorted(r.info.run_name for r in grouped) == sorted(swept)  # one MLflow run per experiment
    for run in grouped:
        assert run.info.status == "FINISHED"
        held_out = client.get_metric_history(run.info.run_id, "eval/accuracy")
        assert sorted(m.step for m in held_out) == [0, 1, 2]  # before training, then every iteration
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "reward")) == [1, 2]

    figure = tmp_path / "sweep.png"
    compared = _run([str(BIN / "python"), "-m", "flows.cli", "compare", "--sweep", "beta", "--plot", str(figure)],
                    repo, env)
    assert all(name in compared.stdout for name in swept)
    assert "grpo.beta" in compared.stdout and "grpo.lr" not in compared.stdout  # only what differs
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dvc_exp_run_refuses_a_bad_value_before_dvc_touches_an_output(repo, env, tmp_path):
    """`dvc exp run` in the workspace: DVC writes the -S value into params.yaml and runs the changed
    stages there. With every output persisted, the stage's refusal comes before anything is lost.
    (In a copy: a failed workspace experiment leaves DVC state the deployment tests must not meet.)"""
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy, symlinks=True)

    def outputs():
        return {p.relative_to(copy): p.read_bytes() for folder in ("models", "metrics", "data")
                for p in sorted((copy / folder).rglob("*")) if p.is_file()}

    before = outputs()
    assert before  # a finished run is there (the test above)
    refused = _run(["dvc", "exp", "run", "-S", "grpo.beta=-0.1"], copy, env, check=False)
    assert refused.returncode != 0
    assert "error: params: grpo.beta: Input should be greater than or equal to 0" in refused.stdout + refused.stderr
    assert outputs() == before


class Worker:
    """`prefect worker start` for the project's work pool, as a user runs it."""

    def __init__(self, repo: Path, env: dict[str, str]) -> None:
        self.repo, self.env = repo, env
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "grpo-local"],
                                        cwd=self.repo, env=self.env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        stop(self.process)


@pytest.fixture(scope="module")
def prefect_server(env, repo):
    server, api = start_prefect_server(env)
    client_env = {**env, "PREFECT_API_URL": api}
    _run([str(BIN / "prefect"), "work-pool", "create", "grpo-local", "--type", "process"], repo, client_env)
    _run([str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "grpo"], repo, client_env)
    worker = Worker(repo, client_env)
    yield api, client_env, worker
    worker.stop()
    stop(server)


def _trigger(api: str, parameters: dict, timeout: float = 600):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}):
        return run_deployment("grpo-pipeline/grpo", parameters=parameters, timeout=timeout, poll_interval=1)


def _read_flow_run(api: str, flow_run_id):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def query():
        async with get_client() as client:
            return await client.read_flow_run(flow_run_id)

    with temporary_settings(updates={PREFECT_API_URL: api}):
        return asyncio.run(query())


def _task_run_names(api: str, flow_run_id) -> list[str]:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def query():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    with temporary_settings(updates={PREFECT_API_URL: api}):
        return sorted(run.name for run in asyncio.run(query()))


def _log_lines(api: str, flow_run_id) -> list[str]:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def query():  # the last 200: a run logs every line of DVC's output
        async with get_client() as client:
            return await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                          limit=200, sort=LogSort.TIMESTAMP_DESC)

    with temporary_settings(updates={PREFECT_API_URL: api}):
        return [log.message for log in asyncio.run(query())]


def _wait_for(condition, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if result := condition():
            return result
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _flow_runs_tagged(api: str, tag: str):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def query():
        async with get_client() as client:
            return await client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])))

    with temporary_settings(updates={PREFECT_API_URL: api}):
        return asyncio.run(query())


def test_a_triggered_deployment_is_a_dvc_experiment_and_an_mlflow_run(repo, prefect_server, env):
    api, _, _ = prefect_server
    before = (repo / "metrics" / "eval.json").read_bytes() if (repo / "metrics" / "eval.json").exists() else None

    run = _trigger(api, {"overrides": {"grpo.beta": 0.0}, "run_name": "beta-zero"})
    assert run.state.is_completed(), run.state
    # prepare and reference (the SFT) came from the workspace's `dvc repro`, through the cache.
    said = _wait_for(lambda: next((line for line in _log_lines(api, run.id) if "DVC ran" in line), None), 30,
                     "the run's log to say which stages DVC ran")
    assert said.startswith("experiment beta-zero: DVC ran check, train, evaluate;"), said  # check: params.yaml whole

    client, runs = _mlflow_runs(repo)
    triggered = [r for r in runs if r.info.run_name == "beta-zero"]
    assert len(triggered) == 1
    mlflow_run = triggered[0]
    assert mlflow_run.data.params["grpo.beta"] == "0.0"
    assert sorted(m.step for m in client.get_metric_history(mlflow_run.info.run_id, "rewards/accuracy")) == [1, 2]
    assert mlflow_run.data.tags["dvc_exp_name"] == "beta-zero"
    assert mlflow_run.data.tags["prefect_parent_flow_run_id"] == str(run.id)

    # The train stage's flow reported to the same server, linked to the triggering run.
    children = _flow_runs_tagged(api, f"triggered-by:{run.id}")
    assert children and all(c.state.is_completed() for c in children)
    (train,) = children
    assert mlflow_run.data.tags["prefect_flow_run_id"] == str(train.id)
    # One task per stage and iteration, named so the run reads iteration by iteration.
    stages = ("rollout", "reward", "advantage", "update")
    def all_task_runs():  # task states arrive as events: the server records them a moment later
        names = _task_run_names(api, train.id)
        return names if len(names) == 8 else None

    names = _wait_for(all_task_runs, 60, "the train flow's task runs")
    assert names == sorted(f"{stage}-{i:04d}" for stage in stages for i in (1, 2))

    # A DVC experiment, and the workspace untouched.
    experiments = _run(["dvc", "exp", "show", "--json"], repo, env).stdout
    assert "beta-zero" in experiments
    after = (repo / "metrics" / "eval.json").read_bytes() if (repo / "metrics" / "eval.json").exists() else None
    assert after == before


def test_a_failing_stage_fails_the_run_and_names_the_stage(repo, prefect_server):
    api, _, _ = prefect_server
    run = _trigger(api, {"overrides": {"data.source": "missing.jsonl"}, "run_name": "broken"})
    assert run.state.is_failed()
    assert "stage 'prepare' failed" in run.state.message or "stage 'prepare' failed" in str(run.state.result(raise_on_failure=False))


def test_a_bad_override_fails_the_run_in_one_line_before_dvc_starts(repo, prefect_server, env):
    api, _, _ = prefect_server
    run = _trigger(api, {"overrides": {"grpo.beta": -0.1}, "run_name": "negative-beta"})
    assert run.state.is_failed()
    assert "params: grpo.beta: Input should be greater than or equal to 0" in run.state.message
    assert "negative-beta" not in _run(["dvc", "exp", "list", "--name-only"], repo, env).stdout


def test_compare_shows_the_differing_param_and_writes_curves(repo, prefect_server, env):
    _, runs = _mlflow_runs(repo)
    assert len(runs) >= 2
    result = _run([str(BIN / "python"), "-m", "flows.cli", "compare", runs[0].info.run_id, "beta-zero"], repo, env)
    assert "grpo.beta" in result.stdout
    assert "grpo.lr" not in result.stdout  # the same in both runs
    assert "rewards/accuracy" in result.stdout
    png = repo / "metrics" / "compare.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_killing_the_worker_fails_the_run_and_names_the_running_stage(repo, prefect_server, env):
    api, _, worker = prefect_server
    run = _trigger(api, {"overrides": {"grpo.iterations": 400}, "run_name": "worker-killed"}, timeout=0)

    def training():  # the train stage's flow, a few iterations in
        runs = _flow_runs_tagged(api, f"triggered-by:{run.id}")
        return runs if runs and len(_task_run_names(api, runs[0].id)) >= 8 else None

    (train,) = _wait_for(training, 300, "the train stage to get going")
    worker.kill()  # SIGKILL: the worker gets no chance to report anything
    try:
        final = _wait_for(lambda: (r := _read_flow_run(api, run.id)).state.is_final() and r, 120,
                          "the triggered run to reach a final state")
    finally:
        worker.start()  # for whatever runs next

    assert final.state.is_failed(), final.state
    assert "stage 'train' failed" in final.state.message and "worker" in final.state.message
    # The stage was stopped, not left running unsupervised, and nothing claims to be done.
    train = _read_flow_run(api, train.id)
    assert train.state.is_cancelled(), train.state  # SIGTERM: stopped between two stages
    assert "worker-killed" not in _run(["dvc", "exp", "list", "--name-only"], repo, env).stdout
    client, runs = _mlflow_runs(repo)
    (mlflow_run,) = [r for r in runs if r.info.run_name == "worker-killed"]
    assert client.get_run(mlflow_run.info.run_id).info.status == "KILLED"  # stopped by SIGTERM, between stages
