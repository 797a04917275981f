"""When the Prefect API goes away mid-run: training goes on, and the flow run's record catches up.

What we chose, and why. The training is the product; the Prefect server is bookkeeping. So
a run whose API stops answering (a server restarted, killed, or its machine rebooted) keeps
training. Prefect 3 reports task states and logs from background workers that keep what the
server has not confirmed and send it again on reconnecting: measured here, a server down
for iterations 5 to 12 of a 30-iteration run, then restarted, showed all 120 task runs
Completed and every log line afterwards. Nothing in our loop waits on the API.

What Prefect does not handle is a run that ends while the API is still away: its client
retries the final state for minutes, then its exit drains the queued events, ~7 s an event
(a finished 30-iteration run hung for over 12 minutes here). So at the end we wait up to
`GRPO_SERVICES_WAIT_SECONDS` for the API; if it stays away, the run's end is written to
runs/prefect.json, the process says so in one line and exits at once with the run's own
exit code (everything it made is on disk, and MLflow is finished first), and the flow run's
final state is set later, by the next run in this directory or `grpo sync`. Until then
the UI shows the flow run as Running, never Completed for work that did not finish.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime, timezone
from typing import Any

import httpx

from stages.records.artifacts import Layout, read_json, write_json
from stages.errors import ServiceError

PENDING_FILE = "prefect.json"  # under runs/: a flow run's end that the API did not receive


def api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def api_answers(url: str, timeout: float = 2.0) -> bool:
    try:
        return httpx.get(f"{url.rstrip('/')}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for_api(url: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not api_answers(url):
        if time.monotonic() >= deadline:
            return False
        time.sleep(1.0)
    return True


def record_unreported_end(layout: Layout, url: str, flow_run_id: str, state: str, message: str) -> None:
    write_json(layout.runs / PENDING_FILE, {"api_url": url, "flow_run_id": flow_run_id, "state": state,
                                            "message": message,
                                            "ended_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def leave_without_api(url: str, error_line: str | None, exit_code: int) -> None:
    """Exit now, skipping Prefect's minutes of retries and its drain of queued events (see above)."""
    if error_line:
        print(f"error: {error_line}", file=sys.stderr)
    print(f"prefect: the API at {url} has not answered since the run ended; its flow run's end is kept in "
          f"runs/{PENDING_FILE} and recorded by the next run here, or by `grpo sync`", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def report_earlier_end(layout: Layout) -> dict[str, Any] | None:
    """Set the final state of a flow run whose end the API missed (runs/prefect.json), if the API answers."""
    path = layout.runs / PENDING_FILE
    if not path.is_file():
        return None
    pending = read_json(path)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.states import State

    message = f"{pending['message']} (recorded later: the API did not answer when the run ended, {pending['ended_at']})"
    try:
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(pending["flow_run_id"], State(type=StateType[pending["state"]], message=message),
                                      force=True)
    except Exception as error:  # not on this API (another server?), or it went away again: keep the file
        raise ServiceError(f"Prefect: could not record the end of flow run {pending['flow_run_id']} "
                           f"(runs/{PENDING_FILE}) at {api_url()}: {type(error).__name__}: {error}") from None
    path.unlink()
    return pending
