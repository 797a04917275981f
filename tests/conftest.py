"""Shared fixtures: the project's own params.yaml, shrunk so a whole pipeline runs in seconds."""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

# `make test` runs the modules on two pytest-xdist workers at once, so the torch processes of two
# tests share the cores. libgomp's threads spin for a while whenever they wait for work; two
# processes' spinning threads then take the cores from each other's busy ones, and both crawl.
# Passive waiters sleep instead: the same threads, the same split of the work, the same bits.
# Set before torch loads libgomp, and inherited by every process a test starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# In the system's temporary folder, also for a pytest-xdist worker (which inherits the
# controller's TMPDIR below): nested, the paths outgrow the 107 bytes of a Unix socket's name
# that vLLM's and Ray's sockets under TMPDIR need.
_SYSTEM_TMP = os.environ.setdefault("GRPO_TESTS_SYSTEM_TMPDIR", tempfile.gettempdir())
_STATE = tempfile.mkdtemp(prefix="grpo-tests-", dir=_SYSTEM_TMP)
# Every temporary file of the session — ours, pytest's, and those of the servers, workers and
# CLIs the tests start — goes under _STATE, which is removed at exit (registered before
# Prefect's own exit handler, so it runs after it): a CI machine's disk does not fill up run
# after run. `pytest --basetemp DIR` keeps a failing test's files.
os.environ["TMPDIR"] = os.path.join(_STATE, "tmp")
os.mkdir(os.environ["TMPDIR"])
tempfile.tempdir = None  # re-read TMPDIR
atexit.register(shutil.rmtree, _STATE, ignore_errors=True)

# Before prefect/mlflow are imported: keep their state out of the user's home and the repo, and
# apart for each pytest-xdist worker (a worker inherits the controller's environment).
os.environ["PREFECT_HOME"] = os.path.join(_STATE, "prefect")
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{os.path.join(_STATE, 'mlflow.db')}"
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# One inductor cache for the whole session, workers included (set first by the controller): the
# compiled tests compile the same tiny graphs, as a user's second compiled run finds them cached.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_STATE, "inductor"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from flows.server import PR_SET_PDEATHSIG, free_port  # noqa: E402  (after the environment above)

TINY = [
    "data.builtin.train_size=200", "data.builtin.test_size=20",
    "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=64",
    # Enough SFT that sampled completions sometimes have the format: a reward signal to learn from.
    "sft.steps=60", "sft.batch_size=16", "sft.lr=0.01",
    "rollout.prompts_per_iteration=4", "rollout.group_size=4", "rollout.max_new_tokens=24",
    "grpo.iterations=2", "grpo.minibatch_size=8", "grpo.lr=0.001",
    # One draw per iteration: the suite's scale-out tests need it, and its expectations were made
    # so. Dynamic sampling is tested where it is asked for (test_dynamic_sampling, test_resume).
    "rollout.dynamic_sampling.filter=none",
    "eval.max_new_tokens=24",
]


_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


def _dies_with_the_suite() -> None:
    """In a server's process, before it starts: SIGTERM when pytest ends, even by SIGKILL (a session
    fixture's teardown, which stops it, does not run then; it would otherwise serve on, idle)."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start_prefect_server(env: dict[str, str], port: int | None = None) -> tuple[subprocess.Popen, str]:
    """A real `prefect server start` on 127.0.0.1, healthy: (its process, its API URL)."""
    port = port or free_port()
    api = f"http://127.0.0.1:{port}/api"
    # Its own process group, so a test can kill it whole (it serves from a child process).
    log = tempfile.NamedTemporaryFile("w", prefix=f"prefect-server-{port}-", suffix=".log", delete=False)
    server = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=log, stderr=log, start_new_session=True,
                              preexec_fn=_dies_with_the_suite)
    # ~10 s alone; several at once (one per xdist worker, beside a vLLM start-up) took over 90 s.
    deadline = time.time() + 300
    while True:
        try:
            urllib.request.urlopen(f"{api}/health", timeout=2)
            return server, api
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError(f"prefect server did not become healthy: {Path(log.name).read_text()[-2000:]}")
            time.sleep(0.5)


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)  # a clean shutdown
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


def prepare_tiny_project(root: Path, iterations: int, overrides: list[str] = ()) -> Path:
    """params.yaml (tiny, `iterations` GRPO iterations), prompts and reference model: what `train` starts from."""
    import yaml

    from stages.records.artifacts import Layout
    from stages.params import load_params
    from stages.config import set_key
    from stages.prepare import prepare
    from stages.reference import reference

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for override in [*TINY, f"grpo.iterations={iterations}", *overrides]:
        key, _, value = override.partition("=")
        set_key(raw, key, yaml.safe_load(value))
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(root / "params.yaml")
    prepare(params, Layout(root))
    reference(params, Layout(root))
    return root


def train(root: Path, env: dict[str, str], kill_at: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    """`grpo train` on `root` in its own process; with `kill_at` (point, iteration), SIGKILLed there
    (tests/kill_at.py)."""
    command = ["train", "--params", str(root / "params.yaml"), "--root", str(root)]
    prefix = [sys.executable, str(ROOT / "tests" / "kill_at.py"), kill_at[0], str(kill_at[1])] if kill_at else \
        [sys.executable, "-m", "flows.cli"]
    return subprocess.run(prefix + command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def dvc_project(repo: Path, params_file: Path, env: dict[str, str]) -> dict[str, str]:
    """This project's committed files (not tests/, benchmarks/) and `params_file` as a git repo at
    `repo`, ready for `dvc repro`; returns the environment to run it in."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if not name.startswith(("tests/", "benchmarks/")):
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    shutil.copy2(params_file, repo / "params.yaml")
    dvc_env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
               "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
               "GIT_COMMITTER_EMAIL": "t@example.com"}
    for command in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "p"]):
        subprocess.run(command, cwd=repo, env=dvc_env, check=True, capture_output=True)
    return dvc_env


def without_timings(frame_or_dict):
    """Wall-clock seconds are the one thing that differs between identical runs."""
    import pandas as pd

    if isinstance(frame_or_dict, pd.DataFrame):
        return frame_or_dict[[c for c in frame_or_dict.columns if not c.startswith(("seconds/", "rollout/tokens"))]]
    return {k: v for k, v in frame_or_dict.items() if not k.startswith(("seconds/", "rollout/tokens"))}


def outcome(root: Path) -> dict:
    """What a run leaves behind: final weights and the per-iteration metrics."""
    import pandas as pd

    from stages.records.artifacts import Layout, file_digest

    layout = Layout(root)
    return {"policy": file_digest(layout.policy / "model.safetensors"),
            "iterations.csv": without_timings(pd.read_csv(layout.metrics / "iterations.csv")).to_dict("list")}


def clean_env(state: Path) -> dict[str, str]:
    """This environment without the session's Prefect/MLflow settings, with homes under `state`."""
    state.mkdir(parents=True, exist_ok=True)
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "PYTEST_"))}
    environment.update({"PREFECT_HOME": str(state / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                        "MLFLOW_TRACKING_URI": f"sqlite:///{state / 'mlflow.db'}", "DO_NOT_TRACK": "1"})
    return environment


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """A clean environment with one Prefect server for the session's `grpo` runs (one start, not
    one per module): a killed run cannot stop a temporary server of its own. Modules that need
    another environment (a server they stop or restart) define their own `env`."""
    environment = clean_env(tmp_path_factory.mktemp("state"))
    server, api = start_prefect_server(environment)
    yield {**environment, "PREFECT_API_URL": api}
    stop(server)


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY)


@pytest.fixture
def tiny_params(tiny_overrides):
    from stages.params import load_params
    return load_params(ROOT / "params.yaml", tiny_overrides)


# The modules, slowest first (seconds of a serial run, `pytest --durations=0`, rounded): `make test`
# hands whole modules to its workers in this order, so the longest ones start at once instead of
# one of them starting last. A module not listed runs after these, as collected.
SLOWEST_FIRST = {
    "test_vllm.py": 445, "test_faults.py": 410, "test_resume.py": 375, "test_bad_input.py": 315,
    "test_scale_out.py": 295, "test_orchestration.py": 230, "test_compile.py": 125, "test_model_rewards.py": 100,
    "test_tracking.py": 95, "test_dynamic_sampling.py": 95, "test_replay.py": 90, "test_lora.py": 75,
    "test_pipeline.py": 65, "test_prefect_server.py": 50, "test_modeling.py": 30,
}


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: -SLOWEST_FIRST.get(item.path.name, 0))  # stable: each module keeps its order


def pytest_unconfigure(config):
    # Prefect stops its temporary server at interpreter exit and logs it to a stream pytest
    # has already closed; don't let that print a traceback after the test summary.
    import logging

    logging.raiseExceptions = False


@pytest.fixture(scope="session")
def format_reward_model(tmp_path_factory) -> Path:
    """A sequence-classification reward model trained here to prefer well-formed completions."""
    from model_rewards import build_format_reward_model
    return build_format_reward_model(tmp_path_factory.mktemp("models") / "format-rm")


@pytest.fixture(scope="session")
def format_judge(tmp_path_factory) -> Path:
    """A causal LM trained here to answer model_rewards.JUDGE_TEMPLATE with 1 (well formed) or 0."""
    from model_rewards import build_format_judge
    return build_format_judge(tmp_path_factory.mktemp("models") / "format-judge")
