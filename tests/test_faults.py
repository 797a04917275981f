"""The faults a long run meets that are nobody's input, injected for real into `grpo train`.

The Prefect server and the MLflow tracking server go away and come back (real servers, killed
and restarted on their ports); a reward function hangs; the disk fills up (a real tmpfs, or
the process's file-size limit); Ctrl-C and `kill` arrive; a second run starts in the same
directory. For each: the training either goes on to exactly the uninterrupted result, or
stops in one line and the same command resumes to it; nothing on disk is half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, clean_env, outcome, prepare_tiny_project, start_prefect_server, stop
from flows.server import free_port
from stages.records.artifacts import Layout, tree_digest

ITERATIONS = 6
HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
def env(state):
    """A Prefect server for the tests that do not stop theirs, and an MLflow sqlite store."""
    environment = clean_env(state)
    server, api = start_prefect_server(environment)
    yield {**environment, "PREFECT_API_URL": api}
    stop(server)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_tiny_project(tmp_path_factory.mktemp("prepared"), ITERATIONS)


@pytest.fixture(scope="module")
def uninterrupted(prepared, env, tmp_path_factory):
    root = workspace(prepared, tmp_path_factory.mktemp("runs"), "uninterrupted")
    code, _, err = finish(start(root, env))
    assert code == 0, err[-3000:]
    return root


def workspace(prepared: Path, parent: Path, name: str) -> Path:
    shutil.copytree(prepared, parent / name)
    return parent / name


def start(root: Path, env: dict[str, str], *args: str, command: str = "train", wrapper: list[str] = (),
          logs_in: Path | None = None) -> subprocess.Popen:
    """`grpo train` in its own process group, as a terminal runs it (so Ctrl-C reaches all of it)."""
    logs = (logs_in or root.parent) / f"{root.name}.{command}.{time.monotonic_ns()}"
    prefix = [sys.executable, *wrapper] if wrapper else [sys.executable, "-m", "flows.cli"]
    process = subprocess.Popen([*prefix, command, "--params", str(root / "params.yaml"), "--root", str(root), *args],
                               cwd=ROOT, env=env, stdout=open(f"{logs}.out", "w"), stderr=open(f"{logs}.err", "w"),
                               start_new_session=True)
    process.logs = logs
    return process


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    code = process.wait(timeout=timeout)
    return code, Path(f"{process.logs}.out").read_text(), Path(f"{process.logs}.err").read_text()


def wait_until(condition, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def kill(server: subprocess.Popen) -> None:
    """SIGKILL a server and the processes it serves from (it runs in a process group of its own)."""
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()


def done(root: Path, iteration: int) -> bool:
    return (Layout(root).iteration(iteration) / "manifest.json").is_file()


def error_line(stderr: str) -> str:
    """The CLI's last word: one line, `error: ...`."""
    return stderr.strip().splitlines()[-1]


def intact(root: Path) -> None:
    """Every iteration with a manifest still hashes to it, and none without one is in the record."""
    layout = Layout(root)
    for folder in sorted((layout.runs / "iterations").glob("[0-9]" * 4)):
        manifest = folder / "manifest.json"
        if manifest.is_file():
            for name, digest in json.loads(manifest.read_text())["outputs"].items():
                assert tree_digest(folder / name) == digest, f"{folder / name} changed"
    for path in layout.runs.rglob("*.tmp"):
        raise AssertionError(f"a temporary file was left behind: {path}")


def flow_run(api: str, root: Path) -> dict:
    """The Prefect flow run of the last `grpo train` in `root`, as the server has it."""
    flow_run_id = json.loads((Layout(root).runs / "tracking.json").read_text())["prefect_flow_run_id"]
    return httpx.get(f"{api}/flow_runs/{flow_run_id}", timeout=10).json()


def mlflow_run(root: Path, uri: str):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = json.loads((Layout(root).runs / "tracking.json").read_text())["mlflow_run_id"]
    return client, client.get_run(run_id)


# ----------------------------------------------------------------------------- Prefect


def test_a_prefect_server_restarted_mid_run_catches_up_and_training_never_stops(prepared, uninterrupted, state,
                                                                               tmp_path):
    environment = {**clean_env(tmp_path / "own"), "MLFLOW_TRACKING_URI": f"sqlite:///{state / 'mlflow.db'}"}
    port = free_port()
    server, api = start_prefect_server(environment, port)
    root = workspace(prepared, tmp_path, "restarted")
    run = start(root, {**environment, "PREFECT_API_URL": api})
    wait_until(lambda: done(root, 2), what="iteration 2")
    kill(server)  # gone, as when its machine reboots
    wait_until(lambda: done(root, 4), what="iteration 4 without the server")
    run.send_signal(signal.SIGSTOP)  # the restart takes seconds; the run would finish before it
    try:
        server, _ = start_prefect_server(environment, port)
    finally:
        run.send_signal(signal.SIGCONT)
    try:
        code, _, err = finish(run)
        assert code == 0, err[-3000:]
        assert outcome(root) == outcome(uninterrupted)
        wait_until(lambda: flow_run(api, root)["state_type"] == "COMPLETED", 60, "the flow run's end")
        # Task states the server missed are sent again by Prefect's client once it reconnects.
        filter_ = {"flow_runs": {"id": {"any_": [flow_run(api, root)["id"]]}}, "limit": 200}

        def recorded() -> list[str]:
            return [t["state_type"] for t in httpx.post(f"{api}/task_runs/filter", json=filter_, timeout=10).json()]
        wait_until(lambda: recorded() == ["COMPLETED"] * 4 * ITERATIONS, 60, "every task run Completed")
    finally:
        stop(server)


def test_a_prefect_api_away_at_the_end_leaves_at_once_and_grpo_sync_records_the_end(prepared, uninterrupted,
                                                                                    state, tmp_path):
    environment = {**clean_env(tmp_path / "own"), "MLFLOW_TRACKING_URI": f"sqlite:///{state / 'mlflow.db'}",
                   "GRPO_SERVICES_WAIT_SECONDS": "3"}
    port = free_port()
    server, api = start_prefect_server(environment, port)
    root = workspace(prepared, tmp_path, "away")
    run = start(root, {**environment, "PREFECT_API_URL": api})
    wait_until(lambda: done(root, 2), what="iteration 2")
    kill(server)
    code, _, err = finish(run, timeout=120)  # Prefect alone retries, then drains its queue, for many minutes
    assert code == 0, err[-3000:]
    assert f"prefect: the API at {api} has not answered since the run ended" in error_line(err)
    assert outcome(root) == outcome(uninterrupted)
    pending = json.loads((Layout(root).runs / "prefect.json").read_text())
    assert pending["state"] == "COMPLETED"

    server, _ = start_prefect_server(environment, port)
    try:
        assert flow_run(api, root)["state_type"] == "RUNNING"  # never Completed for what it did not see
        code, out, err = finish(start(root, {**environment, "PREFECT_API_URL": api}, command="sync"))
        assert code == 0, err[-3000:]
        ended = flow_run(api, root)
        assert ended["state_type"] == "COMPLETED" and "recorded later" in ended["state"]["message"]
        assert not (Layout(root).runs / "prefect.json").exists()
    finally:
        stop(server)


def test_a_prefect_api_that_does_not_answer_at_the_start_is_one_line_before_any_work(prepared, env, tmp_path):
    root = workspace(prepared, tmp_path, "no-api")
    code, _, err = finish(start(root, {**env, "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}))
    assert code == 1
    assert "error: the Prefect API at http://127.0.0.1:" in err and "does not answer" in error_line(err)
    assert not (Layout(root).runs / "iterations").exists()


# ----------------------------------------------------------------------------- MLflow


def start_mlflow_server(state: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1", "--backend-store-uri", f"sqlite:///{state / 'remote.db'}",
                               "--artifacts-destination", (state / "remote-artifacts").as_uri()],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_until(lambda: _answers(f"http://127.0.0.1:{port}/health"), 90, "the MLflow server")
    return server


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_remote_mlflow_server_down_mid_run_gets_the_whole_record_once_when_it_is_back(prepared, uninterrupted, env,
                                                                                       tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port)
    root = workspace(prepared, tmp_path, "mlflow-down")
    run = start(root, {**env, "MLFLOW_TRACKING_URI": uri})
    wait_until(lambda: done(root, 2), what="iteration 2")
    kill(server)
    wait_until(lambda: done(root, 4), what="iteration 4 without the store")
    run.send_signal(signal.SIGSTOP)
    try:
        server = start_mlflow_server(tmp_path, port)
    finally:
        run.send_signal(signal.SIGCONT)
    try:
        code, _, err = finish(run)
        assert code == 0, err[-3000:]
        assert err.count(f"MLflow: logging to {uri} paused") == 1  # said once, when it went
        assert outcome(root) == outcome(uninterrupted)
        client, record = mlflow_run(root, uri)
        assert record.info.status == "FINISHED"
        history = client.get_metric_history(record.info.run_id, "reward")
        assert sorted(m.step for m in history) == list(range(1, ITERATIONS + 1))  # each once
        assert len(client.list_artifacts(record.info.run_id, "samples")) == ITERATIONS
        assert client.list_artifacts(record.info.run_id, "policy")
    finally:
        kill(server)


# ----------------------------------------------------------------------------- a reward that hangs

HANGING = '''
def forever(prompts, completions, **_):
    while True:  # a pure-Python loop: only a process of its own can be stopped
        pass
'''


def test_a_reward_that_hangs_stops_the_run_naming_it_and_the_previous_run_is_kept(uninterrupted, env, tmp_path):
    root = tmp_path / "hangs"
    shutil.copytree(uninterrupted, root)
    (root / "hanging.py").write_text(HANGING)
    before = {path: tree_digest(root / path) for path in ("data", "models", "metrics")}
    started = time.monotonic()
    code, _, err = finish(start(root, {**env, "PYTHONPATH": str(root)}, "--set", "reward.custom=[hanging:forever]",
                                "--set", "reward.weights.forever=1", "--set", "reward.timeout_seconds=3"))
    assert code == 1 and time.monotonic() - started < 120
    line = error_line(err)
    assert line.startswith("error: ") and "runs/iterations/0001/rollouts.parquet: reward 'forever' did not return " \
                                          "within reward.timeout_seconds=3 on the 16 completions of prompt_id " in line
    assert not (Layout(root).iteration(1) / "rewards.parquet").exists()  # nothing half-written
    assert {path: tree_digest(root / path) for path in ("data", "models", "metrics")} == before

    # The previous run's iteration 1, set aside while the new one was tried, is back on the next run.
    code, _, err = finish(start(root, env))
    assert code == 0, err[-3000:]
    assert f"resuming after iteration {ITERATIONS}" in err
    intact(root)
    assert outcome(root) == outcome(uninterrupted)


# ----------------------------------------------------------------------------- a full disk


def mount_tmpfs(path: Path, megabytes: int) -> bool:
    path.mkdir(parents=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def fill(disk: Path) -> Path:
    """Write a file until the filesystem has not a byte left."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    for size in (1 << 20, 4096, 1):
        while True:
            try:
                os.write(fd, b"\0" * size)
            except OSError:
                break
    os.close(fd)
    return filler


def test_a_full_disk_stops_the_run_in_one_line_and_the_same_command_resumes(prepared, uninterrupted, env, tmp_path):
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, 64):
        pytest.skip("this machine does not let the test mount a tmpfs (the file-size limit test covers the writes)")
    try:
        root = workspace(prepared, disk, "project")
        run = start(root, env, logs_in=tmp_path)  # the terminal's output is not on the full disk
        wait_until(lambda: done(root, 2), what="iteration 2")
        filler = fill(disk)
        code, _, err = finish(run)
        assert code == 1, err[-3000:]
        line = error_line(err)
        assert line.startswith(f"error: {root}/") and ": No space left on device writing " in line, line
        assert " free on its filesystem); nothing was replaced" in line
        intact(root)
        stopped_at = min(i for i in range(1, ITERATIONS + 1) if not done(root, i))
        assert stopped_at >= 3
        filler.unlink()
        code, _, err = finish(start(root, env, logs_in=tmp_path))
        assert code == 0, err[-3000:]
        assert f"resuming after iteration {stopped_at - 1}" in err
        assert outcome(root) == outcome(uninterrupted)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_file_size_limit_hit_by_a_checkpoint_is_one_line_and_the_same_command_resumes(prepared, uninterrupted, env,
                                                                                        tmp_path):
    """`ulimit -f` set as iteration 3's update begins: its checkpoint cannot be written."""
    root = workspace(prepared, tmp_path, "fsize")
    limited = subprocess.run([sys.executable, str(HERE / "kill_at.py"), "fsize", "3", "train", "--params",
                              str(root / "params.yaml"), "--root", str(root)],  # to pipes: the limit is on files
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert limited.returncode == 1, limited.stderr[-3000:]
    line = error_line(limited.stderr)
    assert line.startswith(f"error: {root}/runs/checkpoints/0003: File too large writing ") and " kB (" in line, line
    assert "nothing was replaced: free some space and run the same command to resume" in line
    intact(root)
    assert not done(root, 3) and not Layout(root).checkpoint(3).exists()
    code, _, err = finish(start(root, env))
    assert code == 0, err[-3000:]
    assert "resuming after iteration 2" in err
    assert outcome(root) == outcome(uninterrupted)


def test_an_allocation_that_fails_is_one_line_naming_the_knob_and_a_smaller_micro_batch_resumes(
        prepared, uninterrupted, env, tmp_path):
    """A real failed allocation: the address space capped at what is mapped while iteration 3's
    reference log-probs are computed (glibc asked to map every block of 4 kB or more, so none
    comes from memory freed earlier). The micro-batch size is memory, not maths: the run resumes
    after iteration 2 under a smaller one (its later steps round differently, within float error)."""
    root = workspace(prepared, tmp_path, "memory")
    starved = subprocess.run([sys.executable, str(HERE / "kill_at.py"), "memory", "3", "train", "--params",
                              str(root / "params.yaml"), "--root", str(root)], cwd=ROOT,
                             env={**env, "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4096"},
                             capture_output=True, text=True, timeout=300)
    assert starved.returncode == 1, starved.stderr[-3000:]
    line = error_line(starved.stderr)
    assert line.startswith("error: out of memory in the reference log-probs of iteration 3 (8 completions at a "
                           "time of up to "), line
    assert line.endswith("lower grpo.micro_batch_size (now 8; the same maths: the run resumes) or "
                         "rollout.max_new_tokens"), line
    intact(root)
    assert not done(root, 3) and not Layout(root).checkpoint(3).exists()
    code, _, err = finish(start(root, env, "--set", "grpo.micro_batch_size=4"))
    assert code == 0, err[-3000:]
    assert "resuming after iteration 2" in err
    assert outcome(root)["iterations.csv"]["iteration"] == outcome(uninterrupted)["iterations.csv"]["iteration"]


# ----------------------------------------------------------------------------- Ctrl-C and kill


def test_ctrl_c_stops_at_the_next_stage_a_second_signal_at_once_and_the_same_command_resumes(
        prepared, uninterrupted, env, tmp_path):
    root = workspace(prepared, tmp_path, "signals")
    run = start(root, env)
    wait_until(lambda: done(root, 2), what="iteration 2")
    os.killpg(run.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends: the whole process group
    code, _, err = finish(run, timeout=60)
    assert code == 128 + signal.SIGINT, err[-3000:]
    line = error_line(err)
    assert line.startswith("error: stopped by SIGINT after ") and "run the same command to resume" in line, line
    intact(root)
    assert mlflow_run(root, env["MLFLOW_TRACKING_URI"])[1].info.status == "KILLED"
    wait_until(lambda: flow_run(env["PREFECT_API_URL"], root)["state_type"] == "CANCELLED", 30, "Cancelled")

    run = start(root, env)  # the same command, stopped again further on: `kill`, twice
    wait_until(lambda: done(root, 4), what="iteration 4")
    run.send_signal(signal.SIGTERM)
    run.send_signal(signal.SIGTERM)
    code, _, err = finish(run, timeout=60)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert error_line(err).startswith("error: stopped ") and "SIGTERM" in error_line(err)
    intact(root)
    assert mlflow_run(root, env["MLFLOW_TRACKING_URI"])[1].info.status == "KILLED"

    code, _, err = finish(start(root, env))
    assert code == 0, err[-3000:]
    assert outcome(root) == outcome(uninterrupted)


# ----------------------------------------------------------------------------- two runs, one directory


def test_a_second_run_in_the_same_directory_is_refused_naming_the_holder_until_the_holder_dies(
        prepared, uninterrupted, env, tmp_path):
    root = workspace(prepared, tmp_path, "shared")
    first = start(root, env)
    wait_until(lambda: done(root, 1), what="iteration 1")
    started = time.monotonic()
    code, _, err = finish(start(root, env))
    assert code == 1 and time.monotonic() - started < 60
    assert err.strip().splitlines() == [
        f"error: {root}/runs is in use by another run: pid {first.pid} on host {socket.gethostname()} "
        f"(grpo train, since {json.loads((root / 'runs' / '.lock').read_text())['since']}); "
        f"wait for it to end or stop it, then run this again"]
    os.killpg(first.pid, signal.SIGKILL)  # the holder dies without a word
    first.wait()
    assert json.loads((root / "runs" / ".lock").read_text())["pid"] == first.pid  # still names the dead holder
    code, _, err = finish(start(root, env))  # taken over, not refused forever
    assert code == 0, err[-3000:]
    assert outcome(root) == outcome(uninterrupted)  # one run's iterations, not two interleaved
