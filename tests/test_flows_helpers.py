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
