"""params.yaml is the contract: every key validated, every mistake named."""

import pytest

from stages.config import flatten
from stages.params import load_params
from stages.errors import ConfigError

from conftest import ROOT

PARAMS = ROOT / "params.yaml"


def test_the_project_params_load_and_spell_the_documented_keys():
    params = load_params(PARAMS)
    keys = set(flatten(params))
    for key in ["seed", "device", "data.source", "model.path", "model.trust_remote_code",
                "rollout.group_size", "rollout.prompts_per_iteration", "rollout.temperature",
                "rollout.top_p", "rollout.max_new_tokens", "reward.weights.accuracy",
                "reward.target_language", "reward.custom", "grpo.iterations", "grpo.mu", "grpo.lr",
                "grpo.beta", "grpo.eps_low", "grpo.eps_high", "grpo.scale_rewards", "grpo.loss_agg",
                "grpo.max_grad_norm", "checkpoints.keep_last"]:
        assert key in keys


def test_overrides_are_parsed_as_yaml_values():
    params = load_params(PARAMS, ["grpo.beta=0", "reward.custom=[stages.rewards.rules:script_share]",
                                  "reward.weights.script_share=0.5", "model.path=/x"])
    assert params.grpo.beta == 0.0
    assert params.reward.custom == ["stages.rewards.rules:script_share"]
    assert params.reward.weights["script_share"] == 0.5
    assert params.model.path == "/x"


@pytest.mark.parametrize("override, message", [
    ("grpo.betta=0.1", "grpo.betta: unknown key"),
    ("rollout.group_size=1", "rollout.group_size: Input should be greater than or equal to 2"),
    ("grpo.eps_low=0", "grpo.eps_low: Input should be greater than 0"),
    ("grpo.beta=-0.1", "grpo.beta: Input should be greater than or equal to 0"),
    ("grpo.lr=0", "grpo.lr: Input should be greater than 0"),
    ("grpo.loss_agg=mean", "grpo.loss_agg: Input should be 'grpo', 'bnpo', 'dapo' or 'dr_grpo'"),
    ("grpo.kl_estimator=k4", "grpo.kl_estimator: Input should be 'k1', 'k2' or 'k3'"),
    ("grpo.importance_level=prompt", "grpo.importance_level: Input should be 'token' or 'sequence'"),
    ("grpo.policy_loss=reinforce", "grpo.policy_loss: Input should be 'ppo' or 'cispo'"),
    ("grpo.clip_ratio_c=1", "grpo.clip_ratio_c: must be greater than 1 (got 1.0)"),
    ("grpo.clip_ratio_c=0.5", "grpo.clip_ratio_c: must be greater than 1 (got 0.5)"),
    ("grpo.clip_ratio_c=yes", "grpo.clip_ratio_c: expected a number, got true"),
    ("grpo.delta=-2", "grpo.delta: must be greater than 1 (got -2.0)"),
    ("grpo.delta=1", "grpo.delta: must be greater than 1 (got 1.0)"),
    ("grpo.mask_truncated_completions=sometimes", "grpo.mask_truncated_completions: Input should be a valid boolean"),
    ("grpo.scale_rewards=max", "grpo.scale_rewards: Input should be 'group', 'batch' or 'none'"),
    ("grpo.minibatch_size=100", "grpo.minibatch_size=100 must divide"),
    ("grpo.minibatches=prompts", "grpo.minibatches: Input should be 'groups' or 'completions'"),
    ("rollout.top_p=1.5", "rollout.top_p: Input should be less than or equal to 1"),
    ("reward.target_language=xx", "reward.target_language: unknown language 'xx'"),
    ("reward.overlong_buffer=0", "reward.overlong_buffer: Input should be greater than or equal to 1"),
    ("data.builtin.english_share=1.5", "data.builtin.english_share: Input should be less than or equal to 1"),
    ("device=tpu", "device: Input should be 'auto', 'cpu' or 'cuda'"),
    ("compile=sometimes", "compile: Input should be a valid boolean"),
    ("grpo.iterations=many", "grpo.iterations: Input should be a valid integer"),
    ("rollout.engine=sglang", "rollout.engine: Input should be 'native' or 'vllm'"),
    ("rollout.vllm.urls=['localhost:8000']", "rollout.vllm.urls: 'localhost:8000' is not a server address"),
    ("rollout.vllm.tis_cap=2", "rollout.vllm: tis_cap needs logprobs: trainer"),
    ("rollout.vllm.tis_cap=0.5", "rollout.vllm.tis_cap: Input should be greater than or equal to 1"),
    ("rollout.vllm.logprobs=server", "rollout.vllm.logprobs: Input should be 'engine' or 'trainer'"),
    ("rollout.vllm.kv_cache_gib=0", "rollout.vllm.kv_cache_gib: Input should be greater than or equal to 1"),
])
def test_a_bad_value_is_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as error:
        load_params(PARAMS, [override])
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_an_overlong_buffer_past_the_budget_is_refused_only_where_the_overlong_reward_is_weighted():
    with pytest.raises(ConfigError, match=r"^params: reward.overlong_buffer=33 exceeds rollout.max_new_tokens=32$"):
        load_params(PARAMS, ["reward.overlong_buffer=33", "reward.weights.overlong=1.0"])
    assert load_params(PARAMS, ["reward.overlong_buffer=33"]).reward.overlong_buffer == 33


def test_the_ratio_bounds_of_ppo_are_refused_with_cispo_and_null_turns_them_off():
    for key in ("clip_ratio_c", "delta"):
        with pytest.raises(ConfigError) as error:
            load_params(PARAMS, ["grpo.policy_loss=cispo", f"grpo.{key}=3"])
        assert str(error.value).startswith(f"params: grpo: {key} applies to policy_loss ppo only")
        assert "\n" not in str(error.value)
    params = load_params(PARAMS, ["grpo.clip_ratio_c=3", "grpo.delta=4"])
    assert (params.grpo.clip_ratio_c, params.grpo.delta) == (3.0, 4.0)
    params = load_params(PARAMS, ["grpo.policy_loss=cispo", "grpo.clip_ratio_c=null"])
    assert params.grpo.clip_ratio_c is None


def test_builtin_th_is_a_builtin_task_whose_size_is_checked_on_load():
    assert load_params(PARAMS, ["data.source=builtin-th"]).data.source == "builtin-th"
    with pytest.raises(ConfigError, match="rollout.prompts_per_iteration=16 exceeds data.builtin.train_size=10"):
        load_params(PARAMS, ["data.source=builtin-th", "data.builtin.train_size=10"])


def test_a_missing_key_and_a_missing_file_are_named(tmp_path):
    partial = tmp_path / "params.yaml"
    partial.write_text(PARAMS.read_text().replace("seed: 0\n", ""))
    with pytest.raises(ConfigError, match="seed: missing key"):
        load_params(partial)
    with pytest.raises(ConfigError, match="file not found"):
        load_params(tmp_path / "nope.yaml")


def test_the_vllm_engine_refuses_the_process_layouts_it_does_not_serve():
    base = ["rollout.engine=vllm", "rollout.dynamic_sampling.filter=none"]
    for override in ("distributed.trainers=2", "distributed.rollout_workers=2"):
        with pytest.raises(ConfigError, match=r"rollout.engine: vllm generates in the vLLM servers \(several: "
                                              r"rollout.vllm.urls\)"):
            load_params(PARAMS, [*base, override])
    with pytest.raises(ConfigError, match="model.lora.r=600: vLLM serves adapters of rank 512 at most"):
        load_params(PARAMS, [*base, "model.lora.r=600"])
    assert load_params(PARAMS, [*base, "rollout.max_lag=1"]).rollout.max_lag == 1  # sampled ahead by the schedule


def test_where_the_vllm_servers_run_is_not_part_of_what_an_iteration_computes(tmp_path):
    from stages.records.artifacts import Layout
    from stages.records.manifest import training_fingerprint

    layout = Layout(tmp_path)
    layout.reference.mkdir(parents=True)
    layout.prompts.mkdir(parents=True)

    def fingerprint(*overrides: str) -> str:
        return training_fingerprint(load_params(PARAMS, list(overrides)), layout)["params"]

    vllm = fingerprint("rollout.engine=vllm")
    assert fingerprint() != vllm
    assert fingerprint("rollout.vllm.logprobs=trainer") == fingerprint()  # the native engine ignores the section
    assert fingerprint("rollout.engine=vllm", "rollout.vllm.urls=['http://127.0.0.1:9']", "rollout.vllm.threads=1",
                       "rollout.vllm.port=8001", "rollout.vllm.kv_cache_gib=4") == vllm
    assert fingerprint("rollout.engine=vllm", "rollout.vllm.logprobs=trainer") != vllm
