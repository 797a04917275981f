"""The deployable pipeline: one Prefect flow run = one DVC experiment = one MLflow run.

A triggered run goes through `dvc exp run --temp`: DVC runs prepare → reference → train →
evaluate in a temporary copy of the repository, never touches the workspace (so `dvc repro`
results stay intact) and records the run as an experiment. Two triggered runs never clobber
each other: each has its own copy. The copy holds the workspace's dvc.lock (`dvc repro` stages
it in git: `core.autostage` in .dvc/config), so DVC checks the unchanged stages' outputs out of
its cache and runs only the stages the overrides change, as `dvc repro` would.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path
from threading import Event, Thread
from typing import Any, Union

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.paths import project_root
from stages.params import load_params

Scalar = Union[str, int, float, bool]
_FAILED_STAGE = re.compile(r"failed to reproduce '([^']+)'")
_RUNNING_STAGE = re.compile(r"Running stage '([^']+)'")


class StageFailed(RuntimeError):
    """A DVC stage failed; the message names it and its last error line."""


def settings(overrides: dict[str, Scalar]) -> list[str]:
    """`key=value` as `dvc exp run -S` (and `grpo --set`) take them: YAML values, booleans lowercase."""
    return [f"{key}={str(value).lower() if isinstance(value, bool) else value}"
            for key, value in sorted(overrides.items())]


def exp_run_command(overrides: dict[str, Scalar], name: str) -> list[str]:
    command = ["dvc", "exp", "run", "--temp", "--name", name]
    for setting in settings(overrides):
        command += ["-S", setting]
    return command


def experiment_name(run_name: str | None) -> str:
    """A valid, unique git ref name: the user's name or the Prefect flow run's."""
    raw = run_name or f"prefect-{flow_run.get_name() or 'run'}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-.") or "prefect-run"


def _terminate(process: subprocess.Popen, grace_seconds: float = 30.0) -> None:
    """SIGTERM DVC and its stage (they share a process group), SIGKILL if they linger."""
    for sig, wait in ((signal.SIGTERM, grace_seconds), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _detach_stdio() -> None:
    """Point stdout/stderr at /dev/null: the worker that read them is gone.

    Writing to its pipe would now fail, and rich (Prefect's console logging) raises
    SystemExit on a broken pipe. Logs still reach the Prefect API.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)


def _stop_when_orphaned(process: subprocess.Popen, launcher: int, finished: Event, orphaned: Event) -> None:
    """If the process that launched this flow run (the Prefect worker) dies, stop DVC.

    A worker killed with SIGKILL cannot report anything; its flow run process lives on,
    re-parented. Stopping the experiment here lets the run end Failed with the running
    stage named, instead of finishing unsupervised or hanging in Running.
    """
    while not finished.wait(0.25):
        if os.getppid() != launcher:
            _detach_stdio()
            orphaned.set()
            _terminate(process)
            return


def _log(logger: Any, line: str) -> None:
    try:
        logger.info(line)
    except SystemExit:  # rich's answer to a broken stdout: the worker died (see _detach_stdio)
        _detach_stdio()


@task(name="dvc-exp-run", cache_policy=NO_CACHE, persist_result=False)
def dvc_exp_run(root: Path, overrides: dict[str, Scalar], name: str, parent_flow_run_id: str | None) -> list[str]:
    """Run the experiment, its output in this run's logs; returns the stages DVC ran (not those it reused)."""
    logger = get_run_logger()
    command = exp_run_command(overrides, name)
    logger.info("running %s in %s", " ".join(command), root)
    env = {**os.environ, "GRPO_RUN_NAME": name, "DVC_NO_ANALYTICS": "1"}
    if parent_flow_run_id:
        env["GRPO_PARENT_FLOW_RUN_ID"] = parent_flow_run_id
    # Its own process group, so DVC and the stage it runs can be stopped together.
    process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, bufsize=1, start_new_session=True)
    finished, orphaned = Event(), Event()
    if os.environ.get("PREFECT__FLOW_RUN_ID"):  # launched by a worker or `serve`, not run from a shell
        Thread(target=_stop_when_orphaned, args=(process, os.getppid(), finished, orphaned), daemon=True).start()
    tail: list[str] = []
    stage, ran = None, []
    assert process.stdout is not None
    try:
        for line in process.stdout:
            line = line.rstrip()
            if line:
                _log(logger, line)
                tail = (tail + [line])[-50:]
                if running := _RUNNING_STAGE.search(line):
                    stage = running.group(1)
                    ran.append(stage)
        process.wait()
    except BaseException:  # cancelled or crashed: never leave DVC running behind us
        _terminate(process)
        raise
    finally:
        finished.set()
    if orphaned.is_set():
        raise StageFailed(f"stage '{stage or 'unknown'}' failed: the Prefect worker running this flow died")
    if process.returncode != 0:
        stage = next((m.group(1) for line in tail for m in [_FAILED_STAGE.search(line)] if m), stage)
        errors = [line for line in tail if line.startswith(("error:", "ERROR"))]
        reason = errors[0] if errors else (tail[-1] if tail else f"exit code {process.returncode}")
        raise StageFailed(f"stage '{stage or 'unknown'}' failed: {reason}")
    logger.info("experiment %s: DVC ran %s; the other stages were unchanged", name, ", ".join(ran) or "no stage")
    return ran


@task(name="check-params", cache_policy=NO_CACHE, persist_result=False)
def check_params(root: Path, overrides: dict[str, Scalar]) -> None:
    """params.yaml with the overrides, validated as every stage will (keys, values, reward paths):
    a mistake fails the run here, in one line naming the key, before DVC starts."""
    load_params(root / "params.yaml", settings(overrides))


@flow(name="grpo-pipeline", persist_result=False)
def grpo_pipeline(overrides: dict[str, Scalar] | None = None, run_name: str | None = None) -> dict[str, Any]:
    """prepare → reference → train → evaluate as a DVC experiment.

    overrides: params.yaml keys to change for this run, e.g. {"grpo.beta": 0.0}.
    run_name: the DVC experiment and MLflow run name (default: the flow run's name).
    """
    root = project_root(Path.cwd())
    name = experiment_name(run_name)
    check_params(root, dict(overrides or {}))
    ran = dvc_exp_run(root, dict(overrides or {}), name, flow_run.get_id())
    return {"experiment": name, "overrides": dict(overrides or {}), "stages_run": ran}
