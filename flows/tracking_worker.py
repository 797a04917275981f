"""The MLflow tracking process of a training run: `python -m flows.tracking_worker ROOT SAMPLES`.

Started by `flows.tracking.Tracker`. Reads one JSON request per line on stdin and answers
each with one JSON line on stdout, making the store calls in order. It outlives nothing:
when stdin closes before a "finish" request (the training process died, even by SIGKILL),
it marks the run KILLED and exits. Signals aimed at the process group (Ctrl-C, DVC or a
Prefect worker stopping the stage) are left to the training process, which answers them
with a "finish" request: this process ignores them so that request still finds it alive.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, TextIO

from flows.server import lowest_cpu_priority


def serve(root: Path, samples_logged: int, requests: TextIO, replies: TextIO) -> None:
    from flows.tracking import MlflowRun

    run: MlflowRun | None = None  # None again once finished
    failed = False

    def handle(request: dict[str, Any]) -> dict[str, Any]:
        nonlocal run
        op = request["op"]
        if op == "start":
            run = MlflowRun(root, samples_logged)
            return {"run_id": run.start(request["params"], request["prefect_flow_run_id"], request["name"])}
        if run is None or run.run_id is None:
            raise RuntimeError("no open MLflow run (starting it failed, or it was finished)")
        if op == "log_iterations":
            run.log_iterations([tuple(entry) for entry in request["entries"]])
        elif op == "finish":
            closing, run = run, None
            closing.finish("FAILED" if failed else request["status"])
        else:
            raise ValueError(f"unknown request {op!r}")
        return {"ok": True}

    for line in requests:
        try:
            reply = handle(json.loads(line))
        except Exception as error:  # answered, not raised: the training process decides what fails
            failed = True
            reply = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps(reply), file=replies, flush=True)
    if run is not None and run.run_id is not None:  # stdin ended without a "finish": the trainer is gone
        run.finish("KILLED")


def main() -> int:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    lowest_cpu_priority()  # MLflow's writes run when training leaves a core idle
    # Replies get stdout to themselves: anything a library prints goes to stderr instead.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(Path(sys.argv[1]), int(sys.argv[2]), sys.stdin, replies)
    return 0


if __name__ == "__main__":
    sys.exit(main())
