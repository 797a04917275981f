"""Without PREFECT_API_URL, `grpo train` reports to a temporary Prefect server of its own.

It starts before the flow's imports, on 127.0.0.1 at the lowest CPU priority; every task run
reaches the server's records before it stops; it never outlives the run, not even a run
killed with SIGKILL. With an API URL configured, none is started.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, prepare_tiny_project, start_prefect_server, stop

ITERATIONS = 3


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(f"{url}/health", timeout=2)
        return True
    except OSError:
        return False


def servers_started_by(pid: int) -> list[psutil.Process]:
    return [child for child in psutil.Process(pid).children() if "uvicorn" in child.cmdline()]


def test_a_configured_api_url_is_used_and_no_server_is_started():
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    from flows.server import prefect_api

    configured = "http://127.0.0.1:9/api"
    before = servers_started_by(os.getpid())
    with temporary_settings(updates={PREFECT_API_URL: configured}):
        with prefect_api() as ready:
            ready()
            assert get_current_settings().api.url == configured
            assert servers_started_by(os.getpid()) == before


def test_the_temporary_server_listens_on_localhost_at_the_lowest_priority_and_stops_after():
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    from flows.server import prefect_api

    assert get_current_settings().api.url is None  # conftest leaves Prefect unconfigured
    # Earlier in-process flows may have left Prefect's own temporary server running.
    before = set(servers_started_by(os.getpid()))
    with prefect_api() as ready:
        ready()
        url = get_current_settings().api.url
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/api", url)
        [server] = set(servers_started_by(os.getpid())) - before
        assert server.nice() == 19
        assert "127.0.0.1" in server.cmdline()
        with get_client(sync_client=True) as client:  # Prefect's own client talks to it
            assert client.api_url.host == "127.0.0.1"
            assert client.api_healthcheck() is None
    assert get_current_settings().api.url is None
    assert not server.is_running()
    assert not answers(url)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Prompts, reference model and params.yaml of a tiny run."""
    return prepare_tiny_project(tmp_path_factory.mktemp("project"), ITERATIONS)


def unconfigured_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "PYTEST_"))}
    return {**env, "PREFECT_HOME": str(root / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "DO_NOT_TRACK": "1"}


def train_command(root: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "train", "--params", str(root / "params.yaml"), "--root", str(root),
            *(f"--set={override}" for override in overrides)]


def test_every_task_run_is_recorded_before_the_temporary_server_stops(project):
    env = unconfigured_env(project)
    # Run from the repo root, as `dvc repro` does: pyproject.toml's [tool.prefect] settings apply.
    result = subprocess.run(train_command(project), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"prefect: temporary server on http://127\.0\.0\.1:\d+", result.stderr)
    output = result.stdout + result.stderr
    assert re.search(r"iteration 1/\d+: reward", output)  # one line per iteration...
    assert "Finished in state Completed()" in output  # (the flow's own)
    assert "Task run 'rollout-0001' - Finished in state" not in output  # ...not four more of the tasks'

    # Read the run back through a server started afterwards on the same Prefect database.
    server, api = start_prefect_server(env)
    try:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            [flow_run] = client.read_flow_runs()
            task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    finally:
        stop(server)
    assert flow_run.state.is_completed()
    expected = {f"{stage}-{i:04d}" for i in range(1, ITERATIONS + 1) for stage in ("rollout", "reward", "advantage", "update")}
    assert {run.name for run in task_runs} == expected
    assert all(run.state.is_completed() for run in task_runs)


def test_the_temporary_server_dies_with_a_killed_run(project, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(project, root, ignore=shutil.ignore_patterns("runs", "prefect", "mlflow.db"))
    process = subprocess.Popen(train_command(root, "grpo.iterations=500"), cwd=ROOT, env=unconfigured_env(root),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = next(found.group(1) for line in process.stderr
               if (found := re.search(r"temporary server on (http://127\.0\.0\.1:\d+)", line)))
    [server] = servers_started_by(process.pid)
    deadline = time.monotonic() + 180  # a bound, not a speed: the suite runs beside other tests
    while not answers(f"{url}/api") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert answers(f"{url}/api")

    process.send_signal(signal.SIGKILL)
    process.wait()
    server.wait(timeout=30)  # raises if the server outlives its run
    assert not answers(f"{url}/api")
