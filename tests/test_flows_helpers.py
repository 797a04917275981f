"""Small pure helpers of the orchestration layer."""

import os
import subprocess
import sys

from flows.paths import project_root
from flows.pipeline import exp_run_command


def test_a_dvc_temporary_copy_belongs_to_the_repository_around_it(tmp_path):
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc123"
    copy.mkdir(parents=True)
    assert project_root(copy) == tmp_path.resolve()
    assert project_root(tmp_path) == tmp_path.resolve()


def test_overrides_become_dvc_set_params_in_a_stable_order():
    command = exp_run_command({"grpo.beta": 0.0, "device": "cpu", "model.trust_remote_code": False}, "beta0")
    assert command == ["dvc", "exp", "run", "--temp", "--name", "beta0", "-S", "device=cpu",
                       "-S", "grpo.beta=0.0", "-S", "model.trust_remote_code=false"]


def test_a_run_started_in_a_dvc_temporary_copy_keeps_its_artifacts_in_the_project(tmp_path, monkeypatch):
    from flows.tracking import EXPERIMENT, _mlflow

    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc123"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)  # where DVC runs the stage, and where MLflow would put ./mlruns
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    mlflow = _mlflow(copy)
    try:
        assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
        location = mlflow.get_experiment_by_name(EXPERIMENT).artifact_location
        assert location == (tmp_path.resolve() / "mlruns").as_uri()
    finally:
        mlflow.set_tracking_uri(None)


def startup_timeout(environment: dict[str, str]) -> str:
    probe = ("import flows; from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as t; "
             "print(t.value())")
    return subprocess.run([sys.executable, "-c", probe], env=environment, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_a_temporary_prefect_server_gets_two_minutes_to_start_unless_the_user_says_otherwise():
    environment = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    assert float(startup_timeout(environment)) == 120  # Prefect's own default, 20 s, was seen to run out
    assert float(startup_timeout({**environment, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "7"})) == 7
