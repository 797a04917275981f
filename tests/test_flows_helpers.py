"""Small pure helpers of the orchestration layer."""


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
