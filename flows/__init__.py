"""Orchestration: the Prefect flows, MLflow tracking and the CLI over the plain stages."""

import os
from pathlib import Path

from flows.paths import project_root

# Before Prefect is imported anywhere: its database and results live with the project (not
# in the user's home), and nothing phones home. Explicit settings by the user win.
os.environ.setdefault("PREFECT_HOME", str(project_root(Path.cwd()) / ".prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # MLflow reads DO_NOT_TRACK only when it is "true"
# How long a run waits for its temporary Prefect server (ours, or Prefect's own for a flow called
# in-process). Prefect's 20 s is too tight on a small machine: on 2 cores the server took 15-17 s
# to answer when it had to create its database, and a run failed whenever something else was busy.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
