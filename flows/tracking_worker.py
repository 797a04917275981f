"""The MLflow tracking process of a training run: `python -m flows.tracking_worker ROOT SAMPLES`.

Started by `flows.tracking.Tracker`. Reads one JSON request per line on stdin and answers
each with one JSON line on stdout. After each request it brings the store up to date
(`MlflowRecord.sync`); when the store does not answer, it keeps everything and tries again
at the next request, and says so in its reply (`outage`). At "finish" it keeps trying for the
given seconds before it answers whether the record is complete (`synced`). When stdin closes
before a "finish" (the training process died, even by SIGKILL), it ends the run KILLED.
Signals aimed at the process group (Ctrl-C, DVC or a Prefect worker stopping the stage) are
left to the training process, which answers them with a "finish" request: this process
ignores them so that request still finds it alive.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from flows.server import lowest_cpu_priority

RETRY_SECONDS = 2.0  # between tries of a store that did not answer, while a finished run waits for it


def _quick_quiet_failures() -> None:
    """A remote store that does not answer fails a call in seconds, not after MLflow's ~2 minutes of
    retries: we retry ourselves, at the next request, without holding up anything else. (A locked
    sqlite store still takes MLflow's 20 s busy timeout.) Our one line per outage replaces the
    traceback MLflow logs for every failed database call."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def serve(root: Path, samples_logged: int, requests: TextIO, replies: TextIO) -> None:
    from flows.tracking import MlflowRecord, describe_outage

    record = MlflowRecord(root, samples_logged)
    finished = False

    def attempt() -> str | None:
        """Sync once; the reason it failed, if it did."""
        try:
            record.sync()
        except Exception as error:  # the store's trouble, whatever it is: keep everything, try later
            return describe_outage(error)
        return None

    def answer(reply: dict[str, Any]) -> None:
        notes, record.notes = reply.pop("notes", []) + record.notes, []
        print(json.dumps({**reply, "run_id": record.record.get("mlflow_run_id"), "synced": record.record.get("synced"),
                          "notes": notes}), file=replies, flush=True)

    for line in requests:
        request = json.loads(line)
        op = request["op"]
        if op == "catch_up":  # an earlier run's record: one try, before this run replaces its iterations
            earlier = MlflowRecord(root, samples_logged, request["record"])
            earlier.add(request["entries"])
            try:
                earlier.sync()
                answer({})
            except Exception as error:
                run = request["record"].get("mlflow_run_id") or "not created"
                answer({"notes": [f"the earlier run's record (run {run}) stays incomplete: "
                                  f"{describe_outage(error)}"]})
            continue
        if op == "start":
            record.begin(request["params"], request["fingerprint"], request["prefect_flow_run_id"], request["name"])
        elif op == "log_iterations":
            record.add(request["entries"])
        elif op == "finish":
            record.add(request.get("entries", []))
            record.end(request["status"])
            finished = True
        else:
            answer({"outage": f"unknown request {op!r}"})
            continue
        outage = attempt()
        if op == "finish":
            deadline = time.monotonic() + float(request.get("wait_seconds", 0))
            while outage and time.monotonic() < deadline:
                time.sleep(RETRY_SECONDS)
                outage = attempt()
        answer({"outage": outage})
    if record.record and not finished:  # stdin ended without a "finish": the trainer is gone
        record.end("KILLED")
        attempt()  # if the store is away too, runs/tracking.json says KILLED for `grpo sync`


def main() -> int:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    lowest_cpu_priority()  # MLflow's writes run when training leaves a core idle
    _quick_quiet_failures()
    # Replies get stdout to themselves: anything a library prints goes to stderr instead.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(Path(sys.argv[1]), int(sys.argv[2]), sys.stdin, replies)
    return 0


if __name__ == "__main__":
    sys.exit(main())
