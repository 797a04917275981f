"""Prefect's temporary API server, booted beside the imports instead of after them.

Without PREFECT_API_URL a Prefect flow boots a temporary server when it starts: it imports
Prefect's server code into this process (~3 s) and then waits for the server process to come
up (~4 s), both before the first iteration. `prefect_api()` starts that same server (the
command Prefect runs, with the settings Prefect passes it) as the first thing `grpo train`
does, so it comes up on another core while torch, transformers and the flow are imported,
and this process never imports the server. With an API URL configured it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def lowest_cpu_priority() -> None:
    """Run this process only on a core nothing else wants (SCHED_IDLE; nice 19 where there is none).

    For the processes beside training (the Prefect server, the MLflow tracking process): their
    bookkeeping then waits for a gap instead of preempting one of torch's threads, which stalls
    the others at the next barrier. Nice 19 alone still takes a timeslice from a busy core:
    paired 60-iteration runs of `grpo train` were 1.4% faster with SCHED_IDLE (0.986, 0.986, 1.000).
    """
    os.nice(19)
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError:  # not allowed here (some containers): nice 19 it is
            pass


def _server_process_setup() -> Callable[[], None]:
    """What the server process does before it starts, prepared here (nothing to import after fork)."""
    libc = ctypes.CDLL(None) if sys.platform.startswith("linux") else None

    def setup() -> None:
        lowest_cpu_priority()  # recording task runs from their events can wait for an idle core
        if libc is not None:  # SIGTERM when `grpo train` dies, even by SIGKILL
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    return setup


class TemporaryServer:
    """`python -m uvicorn … prefect.server.api.server:create_app` on 127.0.0.1, as Prefect runs it."""

    def __init__(self, environment: dict[str, str]) -> None:
        import prefect

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        command = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent),
                   "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                   "--port", str(self.port), "--log-level", "error", "--lifespan", "on"]
        # The environment Prefect gives its own temporary server: no UI, only the services an
        # ephemeral server runs (it records the task runs and events of this flow).
        env = {**os.environ, **environment,
               "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        # Its own session: a Ctrl-C in the terminal reaches the process group of `grpo train`, and
        # the server must outlive it long enough to record the run as Cancelled (it still dies
        # with this process, by PDEATHSIG, and is stopped by `stop`).
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                                        preexec_fn=_server_process_setup(), start_new_session=True)

    def wait_until_healthy(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the temporary Prefect server exited with code {self.process.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"the temporary Prefect server on {self.url} did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextmanager
def prefect_api() -> Iterator[Callable[[], None]]:
    """Within: Prefect talks to the configured API, or to a temporary server started now.

    Yields `ready`: call it before the first Prefect call; it waits until the temporary server
    answers (as long as Prefect itself would), so the caller can go on importing meanwhile.
    """
    from prefect.settings import (PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, PREFECT_UI_URL,
                                  get_current_settings, temporary_settings)

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        yield lambda: None
        return
    server = TemporaryServer(settings.to_environment_variables(exclude_unset=True))
    print(f"prefect: temporary server on {server.url.removesuffix('/api')} "
          "(set PREFECT_API_URL to report to a running server instead)", file=sys.stderr, flush=True)
    try:
        # No UI link in the logs: this server serves no UI, and it stops with the process.
        with temporary_settings(updates={PREFECT_API_URL: server.url, PREFECT_UI_URL: ""}):
            yield partial(server.wait_until_healthy, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    finally:
        drain_prefect_workers()
        server.stop()


def drain_prefect_workers() -> None:
    """Send the logs and events Prefect still queues in the background: the server is about to go."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all()
    EventsWorker.drain_all()
