"""The run's configuration: `params.yaml` validated into typed, frozen models.

`params.yaml` is the single source of defaults; these models only say what a valid value
is. Unknown keys are errors, so a typo never silently falls back to a default. Reading the
file (overrides, and the rewards it names resolved) is `stages.params`.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from stages.errors import ConfigError

# The Unicode script (the first word of a character's name) each target language is written in:
# `reward.target_language`'s values, and what the `language` reward counts.
SCRIPTS = {
    "en": {"LATIN"}, "fr": {"LATIN"}, "de": {"LATIN"}, "es": {"LATIN"}, "it": {"LATIN"},
    "pt": {"LATIN"}, "id": {"LATIN"}, "vi": {"LATIN"}, "tr": {"LATIN"},
    "th": {"THAI"}, "zh": {"CJK"}, "ja": {"CJK", "HIRAGANA", "KATAKANA"}, "ko": {"HANGUL"},
    "ru": {"CYRILLIC"}, "uk": {"CYRILLIC"}, "ar": {"ARABIC"}, "fa": {"ARABIC"},
    "hi": {"DEVANAGARI"}, "el": {"GREEK"}, "he": {"HEBREW"},
}

# `data.source` values naming a built-in task, and the language each asks its prompts in.
BUILTIN_SOURCES = {"builtin": "en", "builtin-th": "th"}


class Section(BaseModel):
    # NaN and inf pass `gt=0` checks (inf > 0) or poison every later number: refuse them here.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # YAML reads yes/no/on/off as booleans, and pydantic would quietly take them as 1 and 0.
        if isinstance(value, bool) and cls.model_fields[info.field_name].annotation in (int, float, float | None):
            raise ValueError(f"expected a number, got {str(value).lower()}")
        return value


class BuiltinTask(Section):
    train_size: int = Field(gt=0)
    test_size: int = Field(gt=0)
    min_operand: int = Field(ge=0)
    max_operand: int = Field(gt=0)
    slip_rate: float = Field(ge=0, le=1)  # share of SFT demonstrations with the answer's digits reversed
    english_share: float = Field(ge=0, le=1)  # builtin-th: share of demonstrations reasoning in English

    @model_validator(mode="after")
    def _operands_ordered(self) -> BuiltinTask:
        if self.max_operand <= self.min_operand:
            raise ValueError("max_operand must be greater than min_operand")
        return self


class DataConfig(Section):
    source: str = Field(min_length=1)  # "builtin", "builtin-th" or a path to a Parquet/JSONL file
    test_fraction: float = Field(gt=0, lt=1)  # held-out share of a user's file
    system_prompt: str  # a system message before every prompt (through the chat template); empty: none
    builtin: BuiltinTask


class TinyModel(Section):
    hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    max_position_embeddings: int = Field(gt=0)


class LoraSection(Section):
    r: int = Field(ge=0)  # 0: full fine-tuning
    alpha: float = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    target_modules: tuple[str, ...] = Field(min_length=1)


class ModelConfig(Section):
    path: str  # empty: build and SFT the tiny model
    trust_remote_code: bool
    gradient_checkpointing: bool  # the policy's layers recompute their activations in the backward
    lora: LoraSection
    tiny: TinyModel


class SFTConfig(Section):
    steps: int = Field(ge=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    warmup_steps: int = Field(ge=0)


class DynamicSampling(Section):
    # zero_std: set aside groups whose completions' total rewards are all exactly equal and draw
    # more prompts, in seeded rounds, until the iteration holds prompts_per_iteration groups with
    # a signal or max_rounds rounds are spent (stages/rewards/dynamic_sampling.py). none: one draw.
    filter: Literal["none", "zero_std"]
    max_rounds: int = Field(ge=1)


class VllmConfig(Section):
    """`rollout.engine: vllm`: where the vLLM servers are and how the trainer treats their log-probs."""

    # Servers the user runs ("http://host:port"), each taking whole prompt groups; [] = the run
    # starts one on 127.0.0.1 from `python` and stops it at its end.
    urls: list[str]
    python: str  # the vLLM environment's interpreter; "" = .venv-vllm/bin/python in the project (`make vllm`)
    port: int = Field(ge=0, le=65535)  # the started server's port; 0 = a free one
    threads: int = Field(ge=0)  # the started server's CPU threads; 0 = one per core
    max_model_len: int = Field(ge=0)  # the started server's context (prompt + completion); 0 = the model's
    kv_cache_gib: int = Field(ge=1)  # CPU: the KV cache's memory (VLLM_CPU_KVCACHE_SPACE, whole GiB)
    gpu_memory_utilization: float = Field(gt=0, le=1)  # CUDA: vLLM's share of the GPU (it shares it with the trainer)
    startup_timeout_seconds: float = Field(gt=0)
    # The ratio's pi_old: `engine`, the server's sampling log-probs; `trainer`, the trainer's own
    # log-probs of the same tokens before the update (verl's recompute; bf16 engines differ).
    logprobs: Literal["engine", "trainer"]
    # Truncated importance sampling: each token's policy-gradient term weighed by
    # min(pi_trainer / pi_engine, tis_cap) (verl's rollout correction, TRL's vLLM IS); null = off.
    tis_cap: float | None = Field(ge=1)  # below 1 it would shrink tokens the engine and trainer agree on

    @field_validator("urls")
    @classmethod
    def _http_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not re.fullmatch(r"https?://[A-Za-z0-9_.\-\[\]:]+(:[0-9]{1,5})?/?", url):
                raise ValueError(f"{url!r} is not a server address: use 'http://host:port'")
        return [url.rstrip("/") for url in urls]

    @model_validator(mode="after")
    def _tis_corrects_the_trainer_ratio(self) -> VllmConfig:
        if self.tis_cap is not None and self.logprobs != "trainer":
            raise ValueError("tis_cap needs logprobs: trainer (the ratio then starts from the trainer's "
                             "log-probs, and the capped weight pi_trainer / pi_engine corrects for the engine's)")
        return self


class RolloutConfig(Section):
    # native: the project's own decode loop in the training process (the default: fastest for
    # small models); vllm: a vLLM service of its own (rollout.vllm)
    engine: Literal["native", "vllm"]
    group_size: int = Field(ge=2)  # G: a group of one has no relative advantage
    prompts_per_iteration: int = Field(gt=0)
    temperature: float = Field(gt=0)
    top_p: float = Field(gt=0, le=1)
    max_new_tokens: int = Field(gt=0)
    # Iteration i is sampled by the policy after iteration i - 1 - max_lag: generation runs
    # that far ahead of the update. 0 = on-policy, today's loop.
    max_lag: int = Field(ge=0)
    dynamic_sampling: DynamicSampling
    vllm: VllmConfig


class RewardModelSpec(Section):
    """`reward.models.NAME`: a sequence-classification reward model (one scalar per completion)."""

    path: str = Field(min_length=1)  # a local Hugging Face directory; a relative path is from the working directory
    batch_size: int = Field(default=16, ge=1)  # completions per forward
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when there is one (bf16 there, fp32 on CPU)

    @model_validator(mode="before")
    @classmethod
    def _a_path_alone(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value  # `helpful: path/to/rm`


JUDGE_FIELDS = ("prompt", "completion", "answer")


class JudgeSpec(Section):
    """`reward.judges.NAME`: an LLM asked to grade each completion, its reply parsed into a number."""

    model: str = ""  # a local causal LM directory; or
    url: str = ""  # an OpenAI-compatible server's API, e.g. http://127.0.0.1:8000/v1 (a vLLM server)
    served_model: str = ""  # the model's name at `url`; "" = the first the server lists
    # true: the question as a user turn through the model's chat template (a server's /chat/completions);
    # false: the filled template and a newline as plain text (/completions), for a model without one
    chat: bool = True
    template: str = Field(min_length=1)  # the question, with {prompt} and {completion}, and {answer} if it helps
    parse: str = r"-?\d+(?:\.\d+)?"  # a regex: the score is its first match in the reply (group 1 if it has one)
    unparsed: Literal["error", "abstain"] = "error"  # a reply without a score: stop the run naming it, or None
    max_new_tokens: int = Field(default=8, ge=1)  # the reply's length; greedy decoding
    batch_size: int = Field(default=8, ge=1)  # completions judged at once (a forward, or requests in flight)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = Field(default=0, ge=0)  # sent with every request: a server that samples anyway is repeatable

    @field_validator("template")
    @classmethod
    def _known_fields(cls, template: str) -> str:
        import string

        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        except ValueError as error:
            raise ValueError(f"template is not a format string: {error} (write {{{{ and }}}} for braces)") from None
        unknown = fields - set(JUDGE_FIELDS)
        if unknown:
            raise ValueError(f"template has {{{sorted(unknown)[0]}}}: its fields are {{prompt}}, {{completion}}, "
                             f"{{answer}}")
        missing = [name for name in ("prompt", "completion") if name not in fields]
        if missing:
            raise ValueError(f"template has no {{{missing[0]}}}: the judge must see the prompt and the completion")
        return template

    @field_validator("parse")
    @classmethod
    def _a_regex_with_at_most_one_group(cls, parse: str) -> str:
        try:
            groups = re.compile(parse).groups
        except re.error as error:
            raise ValueError(f"parse is not a regular expression: {error}") from None
        if groups > 1:
            raise ValueError(f"parse has {groups} groups: the score is the whole match or its one group")
        return parse

    @model_validator(mode="after")
    def _one_source(self) -> JudgeSpec:
        if bool(self.model) == bool(self.url):
            raise ValueError("set one of model (a local directory) and url (an OpenAI-compatible server)")
        if self.url and not re.fullmatch(r"https?://[A-Za-z0-9_.\-\[\]:]+(:[0-9]{1,5})?(/[^\s]*)?", self.url):
            raise ValueError(f"url {self.url!r} is not a server address: use 'http://host:port/v1'")
        return self


class RewardConfig(Section):
    weights: dict[str, float] = Field(min_length=1)
    target_language: str
    custom: list[str]  # "package.module:function"
    # Empty unless asked for: a params.yaml written before these keys existed still loads.
    models: dict[str, RewardModelSpec] = {}  # reward models by component name, each weighted in `weights`
    judges: dict[str, JudgeSpec] = {}  # LLM judges by component name, each weighted in `weights`
    timeout_seconds: float = Field(gt=0)  # per call of one reward function on one iteration's completions
    workers: int = Field(ge=0)  # Ray workers scoring an iteration's groups in parallel; 0 = in this process
    overlong_buffer: int = Field(ge=1)  # `overlong`: tokens before rollout.max_new_tokens where its penalty ramps

    @field_validator("target_language")
    @classmethod
    def _known_language(cls, value: str) -> str:
        if value not in SCRIPTS:
            raise ValueError(f"unknown language {value!r} (known: {', '.join(sorted(SCRIPTS))})")
        return value


class DistributedConfig(Section):
    # "": a local Ray instance, started and stopped by the run; "auto": the cluster `ray start`
    # made on this machine; "ray://host:port" (Ray Client) or "host:port" (its GCS): a cluster.
    address: str = Field(pattern=r"^(|auto|(ray://)?[A-Za-z0-9_.\-\[\]:]+:[0-9]{1,5})$")
    trainers: int = Field(ge=1)  # processes in the update's torch.distributed group
    strategy: Literal["ddp", "fsdp"]  # ddp: a full replica per trainer; fsdp: FSDP2-sharded parameters
    rollout_workers: int = Field(ge=1)  # processes that generate, each whole prompt groups

    @field_validator("address", mode="before")
    @classmethod
    def _address_shape(cls, value: Any) -> Any:
        if isinstance(value, str) and value and value != "auto" and ":" not in value.removeprefix("ray://"):
            raise ValueError(f"{value!r} is not an address: use '' (a local Ray instance), 'auto', "
                             f"'ray://host:port' or 'host:port'")
        return value


class GRPOConfig(Section):
    iterations: int = Field(ge=0)
    mu: int = Field(ge=1)
    minibatch_size: int = Field(gt=0)  # completions per optimizer step
    micro_batch_size: int = Field(ge=0)  # completions per forward/backward within a step; 0 = the whole minibatch
    # How each pass cuts the completions into minibatches: `completions` shuffles them one by
    # one (as TRL does); `groups` keeps a prompt's G completions together, groups shuffled
    # each pass (as verl does), which shares each prompt's forward but sees fewer prompts per step.
    minibatches: Literal["groups", "completions"]
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    beta: float = Field(ge=0)
    eps_low: float = Field(gt=0, lt=1)
    eps_high: float = Field(gt=0)
    scale_rewards: Literal["group", "batch", "none"]
    loss_agg: Literal["grpo", "bnpo", "dapo", "dr_grpo"]
    max_grad_norm: float = Field(gt=0)
    kl_estimator: Literal["k1", "k2", "k3"]  # Schulman's estimators of the KL to the reference
    clip_ratio_c: float | None  # verl's dual clip: a negative advantage's loss is at most -A * clip_ratio_c; None: off
    delta: float | None  # TRL's two-sided GRPO: the unclipped ratio capped at delta; None: off
    importance_level: Literal["token", "sequence"]  # sequence: GSPO's one ratio per completion
    policy_loss: Literal["ppo", "cispo"]  # cispo: the clipped ratio as a constant weight on A * logp
    mask_truncated_completions: bool  # completions with finish_reason "length" carry no loss

    @field_validator("clip_ratio_c", "delta")
    @classmethod
    def _a_ratio_bound_above_one(cls, value: float | None, info: ValidationInfo) -> float | None:
        # verl asserts clip_ratio_c > 1. TRL does not check delta, but a delta <= 1 caps the
        # on-policy ratio 1 itself: a positive advantage would then get no gradient at all.
        if value is not None and value <= 1:
            raise ValueError(f"must be greater than 1 (got {value}): it bounds the ratio pi/pi_old, "
                             f"which is 1 on-policy; null turns it off")
        return value

    @model_validator(mode="after")
    def _ratio_bounds_need_ppo(self) -> GRPOConfig:
        for key in ("clip_ratio_c", "delta"):
            if self.policy_loss != "ppo" and getattr(self, key) is not None:
                raise ValueError(f"{key} applies to policy_loss ppo only (cispo clips its weight to "
                                 f"[1 - eps_low, 1 + eps_high]); set it to null")
        return self


class EvalConfig(Section):
    max_new_tokens: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    samples_logged: int = Field(ge=0)  # completions per iteration kept as examples
    every: int = Field(ge=0)  # held-out metrics of the policy every N iterations and before the first; 0 = at the end only
    samples: int = Field(ge=0)  # with every: k sampled completions per held-out prompt (pass@k, mean@k); 0 = greedy only


class CheckpointConfig(Section):
    keep_last: int = Field(ge=1)


SWEEP_NAME = r"^[\w.:@+=/-]*$"  # tracking.sweep, and what `grpo compare --sweep` accepts


class TrackingConfig(Section):
    # The MLflow tag `sweep` grouping a sweep's runs ("" = none): a name that reads in a filter string.
    sweep: str = Field(max_length=250, pattern=SWEEP_NAME)


class Params(Section):
    seed: int = Field(ge=0)
    device: Literal["auto", "cpu", "cuda"]
    threads: int = Field(ge=0)  # torch intra-op threads; 0 = one per core
    compile: bool  # torch.compile the policy's and reference's forward during training
    precision: Literal["auto", "fp32", "bf16"]  # the forwards' autocast: auto = bf16 on CUDA, fp32 on CPU
    data: DataConfig
    model: ModelConfig
    sft: SFTConfig
    rollout: RolloutConfig
    reward: RewardConfig
    grpo: GRPOConfig
    distributed: DistributedConfig
    eval: EvalConfig
    checkpoints: CheckpointConfig
    tracking: TrackingConfig

    @model_validator(mode="after")
    def _minibatches_tile_the_batch(self) -> Params:
        completions = self.rollout.prompts_per_iteration * self.rollout.group_size
        if completions % self.grpo.minibatch_size:
            raise ValueError(
                f"grpo.minibatch_size={self.grpo.minibatch_size} must divide "
                f"rollout.prompts_per_iteration * rollout.group_size = {completions}"
            )
        micro = self.grpo.micro_batch_size
        if micro and self.grpo.minibatch_size % micro:
            raise ValueError(f"grpo.micro_batch_size={micro} must divide grpo.minibatch_size={self.grpo.minibatch_size}")
        return self

    @model_validator(mode="after")
    def _work_divides_among_processes(self) -> Params:
        trainers, workers = self.distributed.trainers, self.distributed.rollout_workers
        if self.grpo.minibatch_size % trainers:
            raise ValueError(f"grpo.minibatch_size={self.grpo.minibatch_size} must be divisible by "
                             f"distributed.trainers={trainers}: each trainer takes an equal share of every minibatch")
        micro, share = self.grpo.micro_batch_size, self.grpo.minibatch_size // trainers
        if micro and share % micro:
            raise ValueError(f"grpo.micro_batch_size={micro} must divide each trainer's share of a minibatch, "
                             f"grpo.minibatch_size / distributed.trainers = {share}")
        if self.rollout.prompts_per_iteration < workers:
            raise ValueError(f"distributed.rollout_workers={workers} exceeds rollout.prompts_per_iteration="
                             f"{self.rollout.prompts_per_iteration}: each worker generates whole prompt groups")
        if self.rollout.engine == "vllm" and (workers > 1 or trainers > 1):
            raise ValueError("rollout.engine: vllm generates in the vLLM servers (several: rollout.vllm.urls), so it "
                             "needs distributed.rollout_workers 1 and, for now, distributed.trainers 1")
        if self.rollout.engine == "vllm" and self.model.lora.r > 512:
            raise ValueError(f"model.lora.r={self.model.lora.r}: vLLM serves adapters of rank 512 at most")
        if self.rollout.max_lag > self.grpo.iterations:
            raise ValueError(f"rollout.max_lag={self.rollout.max_lag} exceeds grpo.iterations={self.grpo.iterations}")
        return self

    @model_validator(mode="after")
    def _enough_prompts_for_an_iteration(self) -> Params:
        # A user's file is only counted by `prepare`; the built-in task's size is known here.
        if self.data.source in BUILTIN_SOURCES and self.rollout.prompts_per_iteration > self.data.builtin.train_size:
            raise ValueError(
                f"rollout.prompts_per_iteration={self.rollout.prompts_per_iteration} exceeds "
                f"data.builtin.train_size={self.data.builtin.train_size}"
            )
        return self

    @model_validator(mode="after")
    def _overlong_buffer_fits(self) -> Params:
        # Only where the `overlong` reward is used: the buffer means nothing to a run without it.
        if "overlong" in self.reward.weights and self.reward.overlong_buffer > self.rollout.max_new_tokens:
            raise ValueError(f"reward.overlong_buffer={self.reward.overlong_buffer} exceeds "
                             f"rollout.max_new_tokens={self.rollout.max_new_tokens}")
        return self


def set_key(raw: dict[str, Any], dotted_key: str, value: Any) -> None:
    """Apply one `a.b.c=value` override, as `dvc exp run -S` does; unknown keys fail later."""
    *parents, leaf = dotted_key.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"params: {dotted_key}: {part} is not a section")
        node = child
    node[leaf] = value


def flatten(params: Params) -> dict[str, Any]:
    """`{"grpo.beta": 0.04, ...}`: the form MLflow and `dvc exp show` use."""

    def walk(node: Any, prefix: str) -> dict[str, Any]:
        if isinstance(node, dict) and node:
            out: dict[str, Any] = {}
            for key, value in node.items():
                out.update(walk(value, f"{prefix}{key}."))
            return out
        return {prefix[:-1]: node}

    return walk(params.model_dump(mode="json"), "")
