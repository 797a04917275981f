"""Rewards from models: a trained reward model, or an LLM judge, as reward components.

Both are reward functions like the rules in `stages.rewards.rules` — `fn(prompts, completions,
**columns) -> scores` — so they run where every reward runs (the scoring process, or the
`reward.workers` scorers), under `reward.timeout_seconds`, and land in rewards.parquet as a
column of their own; advantages, replay and rescore do not know the difference.

    reward.models.NAME   a sequence-classification model (`AutoModelForSequenceClassification`,
                         one label): the prompt and completion as a conversation through its
                         own chat template (as TRL does), scored in batches; the score is its logit
    reward.judges.NAME   a causal LM, local or behind an OpenAI-compatible server (the rollout's
                         vLLM service, or the user's): a template filled with the prompt,
                         completion and answer, answered greedily, its reply parsed into a number

A model is loaded on its first call and kept for the life of the process: once per run (per
reward worker), never per iteration. torch and transformers are imported then, not before:
a run without model rewards does not pay for them in its scoring process.

Everything a model reward can refuse is refused before any rollout: `check_model_rewards`
reads the directories' JSON (at params load), `check_prompts_fit` tokenizes the prompts and
asks the servers (when the run starts).
"""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from stages.config import JudgeSpec, RewardModelSpec
from stages.errors import ConfigError, ModelError, one_line

ENDPOINT_SECONDS = 5.0  # a judge server that does not answer /models in this time is reported down
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


# ---- what is refused at params load: the directories, read as JSON (no torch) ------------------

def _config(path: Path, key: str) -> dict:
    """The directory's config.json, after the checks every model directory gets."""
    if not path.is_dir():
        raise ConfigError(f"{key}: {path} is not a directory")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{key}: {path} has no config.json: not a Hugging Face model directory")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.glob("*.bin"))
        raise ConfigError(f"{key}: {path} has " + (f"only pickle weights ({pickles[0]}), which are never loaded; "
                                                   f"convert them to safetensors" if pickles
                                                   else "no *.safetensors weights"))
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"{key}: {path} has no tokenizer files")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{key}: {path}/config.json is unreadable: {one_line(error)}") from None
    if config.get("auto_map"):
        raise ConfigError(f"{key}: {path} needs remote code, which a reward model may not run")
    return config


def model_path(path: str) -> Path:
    """A reward model's directory: a relative path is from the working directory (DVC's: the project)."""
    return Path(path).expanduser()


def _architecture(config: dict, suffix: str, key: str, path: str, what: str) -> None:
    """Refuse a directory whose architecture does not end in `suffix` (what the component loads it as)."""
    architectures = config.get("architectures") or []
    if not any(a.endswith(suffix) for a in architectures):
        raise ConfigError(f"{key}: {path} is a {', '.join(architectures) or 'model of no architecture'}, not {what} "
                          f"(…{suffix})")


def check_reward_model(name: str, spec: RewardModelSpec) -> None:
    """A directory of a sequence-classification model with one output (a scalar score)."""
    key = f"reward.models.{name}"
    config = _config(model_path(spec.path), key)
    _architecture(config, "ForSequenceClassification", key, spec.path, "a sequence-classification reward model")
    labels = config.get("num_labels") or len(config.get("id2label") or {}) or 2  # transformers' default is 2
    if labels != 1:
        raise ConfigError(f"{key}: {spec.path} has a head of {labels} labels; a reward model has one (a scalar "
                          f"score: num_labels=1)")


def check_judge(name: str, spec: JudgeSpec) -> None:
    if spec.model:
        key = f"reward.judges.{name}.model"
        _architecture(_config(model_path(spec.model), key), "ForCausalLM", key, spec.model,
                      "a causal language model that can reply")


def check_model_rewards(models: dict[str, RewardModelSpec], judges: dict[str, JudgeSpec]) -> None:
    for name, spec in models.items():
        check_reward_model(name, spec)
    for name, spec in judges.items():
        check_judge(name, spec)


# ---- loading (in the scoring process, once) ----------------------------------------------------

_LOCK = threading.Lock()


def _device(choice: str):
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise ModelError("a reward model asks for device cuda, and there is no CUDA device")
    return torch.device("cuda" if choice == "auto" and torch.cuda.is_available() else
                        "cpu" if choice == "auto" else choice)


@lru_cache(maxsize=None)
def load(kind: str, path: str, device: str, key: str) -> tuple[Any, Any]:
    """(model, tokenizer) of a reward model (`kind` classifier) or a judge (`causal`), loaded once
    per process: bf16 on CUDA, fp32 on CPU, in eval mode; safetensors only, no remote code."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its "Loading weights" bar, once per scorer, is noise in a run's log

    where = model_path(path)
    target = _device(device)
    auto = AutoModelForSequenceClassification if kind == "classifier" else AutoModelForCausalLM
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        model = auto.from_pretrained(where, dtype=torch.bfloat16 if target.type == "cuda" else torch.float32,
                                     use_safetensors=True)
    except Exception as error:  # corrupt weights or config that passed the JSON checks
        raise ModelError(f"{key}: {path} does not load: {type(error).__name__}: {one_line(error)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # A classifier scores the last token that is not padding: it must know which id pads.
    model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "right" if kind == "classifier" else "left"  # a judge continues the prompt
    return model.to(target).eval(), tokenizer


def context_of(model_or_config: Any) -> int | None:
    config = getattr(model_or_config, "config", model_or_config)
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    return get("max_position_embeddings") or get("n_positions") or None


def conversation(tokenizer: Any, prompt: str, completion: str) -> str:
    """What a reward model reads: the exchange through its own chat template, as TRL gives it;
    without a template, the prompt, a newline and the completion (the policy's own plain form)."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": completion}], tokenize=False)
    return f"{prompt}\n{completion}"


def question(tokenizer: Any, text: str, chat: bool = True) -> str:
    """What a local judge continues: the filled template as a user turn, ready for its reply
    (as plain text and a newline without a chat template, or with `chat` false)."""
    if chat and tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return f"{text}\n"


def _encode(tokenizer: Any, texts: list[str], key: str, limit: int | None):
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not tokenizer.chat_template)
    longest = int(batch["attention_mask"].sum(-1).max())
    if limit is not None and longest > limit:
        raise ValueError(f"{key}: {longest} tokens do not fit the model's context of {limit}")
    return batch


# ---- the components ----------------------------------------------------------------------------

def group_batches(prompt_ids: Sequence[Any], batch_size: int) -> list[range]:
    """Consecutive rows in batches of at most `batch_size` that never mix two prompt groups.

    A score's last bits depend on what it was batched with (the padding, the kernels' blocking),
    and reward workers each take whole groups: batches made within a group are the same in
    process and on any number of workers, so the rewards are too (and a rescore's)."""
    batches, start = [], 0
    for end in range(1, len(prompt_ids) + 1):
        if end == len(prompt_ids) or prompt_ids[end] != prompt_ids[start] or end - start == batch_size:
            batches.append(range(start, end))
            start = end
    return batches


class RewardModel:
    """`reward.models.NAME` as a reward function: each completion's scalar score (the head's logit)."""

    def __init__(self, name: str, spec: RewardModelSpec) -> None:
        self.name, self.spec = name, spec

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], prompt_id: Sequence[Any] | None = None,
                 **_: Any) -> list[float]:
        import torch

        key = f"reward.models.{self.name}"
        with _LOCK:
            model, tokenizer = load("classifier", self.spec.path, self.spec.device, key)
        texts = [conversation(tokenizer, p, c) for p, c in zip(prompts, completions)]
        scores: list[float] = []
        groups = list(prompt_id) if prompt_id is not None else [None] * len(texts)  # None: one group
        for rows in group_batches(groups, self.spec.batch_size):
            batch = _encode(tokenizer, [texts[row] for row in rows], key, context_of(model))
            with torch.inference_mode():
                logits = model(**batch.to(model.device)).logits
            scores += logits[:, 0].float().tolist()
        return scores


class Judge:
    """`reward.judges.NAME` as a reward function: the judge's reply to each filled template, parsed."""

    def __init__(self, name: str, spec: JudgeSpec) -> None:
        self.name, self.spec = name, spec
        self.pattern = re.compile(spec.parse)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], answer: Sequence[Any] = (),
                 **_: Any) -> list[float | None]:
        answers = list(answer) or [""] * len(prompts)
        texts = [self.spec.template.format(prompt=p, completion=c, answer=a)
                 for p, c, a in zip(prompts, completions, answers)]
        replies = self._ask_server(texts) if self.spec.url else self._ask_model(texts)
        return [self.score(reply) for reply in replies]

    def score(self, reply: str) -> float | None:
        found = self.pattern.search(reply)
        if found is not None:
            try:
                return float(found.group(1) if self.pattern.groups else found.group(0))
            except ValueError:
                pass
        if self.spec.unparsed == "abstain":
            return None
        raise ValueError(f"judge {self.name!r} replied {one_line(repr(reply), 80)}, in which reward.judges."
                         f"{self.name}.parse finds no number (or set unparsed: abstain)")

    def _ask_model(self, texts: list[str]) -> list[str]:
        import torch

        key = f"reward.judges.{self.name}.model"
        with _LOCK:
            model, tokenizer = load("causal", self.spec.model, self.spec.device, key)
        limit = context_of(model)
        replies: list[str] = []
        for start in range(0, len(texts), self.spec.batch_size):
            batch = _encode(tokenizer, [question(tokenizer, t, self.spec.chat)
                                        for t in texts[start:start + self.spec.batch_size]],
                            key, limit and limit - self.spec.max_new_tokens)
            with torch.inference_mode():
                out = model.generate(**batch.to(model.device), do_sample=False, max_new_tokens=self.spec.max_new_tokens,
                                     pad_token_id=tokenizer.pad_token_id)
            replies += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return replies

    def _ask_server(self, texts: list[str]) -> list[str]:
        import httpx

        name = self.spec.served_model or served_models(self.spec.url, self.name)[0]

        def ask(text: str) -> str:
            body = {"model": name, "temperature": 0.0, "max_tokens": self.spec.max_new_tokens, "seed": self.spec.seed}
            if self.spec.chat:  # the server applies the model's chat template
                route, body["messages"] = "chat/completions", [{"role": "user", "content": text}]
            else:  # what a local judge without a chat template reads
                route, body["prompt"] = "completions", f"{text}\n"
            try:
                response = httpx.post(f"{self.spec.url}/{route}", json=body, timeout=None)
            except httpx.HTTPError as error:
                raise ConnectionError(f"the judge server at {self.spec.url} does not answer: {one_line(error)}") from None
            if response.status_code != 200:
                from stages.model.vllm_engine import server_error

                raise ValueError(f"the judge server at {self.spec.url} refused the request "
                                 f"({response.status_code}): {server_error(response)}")
            choice = response.json()["choices"][0]
            return (choice["message"]["content"] if self.spec.chat else choice["text"]) or ""

        with ThreadPoolExecutor(self.spec.batch_size) as pool:  # the server batches what is in flight
            return list(pool.map(ask, texts))


def served_models(url: str, name: str) -> list[str]:
    """The models an OpenAI-compatible server lists, or one line saying it does not answer."""
    import httpx

    try:
        response = httpx.get(f"{url}/models", timeout=ENDPOINT_SECONDS)
        response.raise_for_status()
        served = [entry["id"] for entry in response.json()["data"]]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"reward.judges.{name}.url: the server at {url} does not answer as an OpenAI-compatible "
                          f"API ({one_line(error)}); start it or fix the url") from None
    if not served:
        raise ConfigError(f"reward.judges.{name}.url: the server at {url} serves no model")
    return served


def model_rewards(models: dict[str, RewardModelSpec], judges: dict[str, JudgeSpec]) -> dict[str, Any]:
    """The reward functions of `reward.models` and `reward.judges`, by name; nothing loaded yet."""
    return {**{name: RewardModel(name, spec) for name, spec in models.items()},
            **{name: Judge(name, spec) for name, spec in judges.items()}}


def warm_up(models: dict[str, RewardModelSpec], judges: dict[str, JudgeSpec]) -> None:
    """Load every local model now (the scoring process's start-up, not a reward's deadline)."""
    for name, spec in models.items():
        load("classifier", spec.path, spec.device, f"reward.models.{name}")
    for name, spec in judges.items():
        if spec.model:
            load("causal", spec.model, spec.device, f"reward.judges.{name}.model")


# ---- what is refused when the run starts, before any rollout -----------------------------------

def check_prompts_fit(models: dict[str, RewardModelSpec], judges: dict[str, JudgeSpec], prompts: Sequence[str],
                      answers: Sequence[Any], max_new_tokens: int) -> None:
    """Every judge server answers (and serves `served_model`), and every local model's context holds
    the longest prompt (in its template) plus rollout.max_new_tokens of completion (and a judge's reply).

    Only tokenizers are loaded here; a completion is counted as max_new_tokens of the model's
    own tokens, the usual case (a model whose tokens are shorter is caught, row named, when scored).
    """
    from transformers import AutoTokenizer

    for name, spec in judges.items():
        if spec.url:
            served = served_models(spec.url, name)
            if spec.served_model and spec.served_model not in served:
                raise ConfigError(f"reward.judges.{name}.served_model: {spec.served_model!r} is not served at "
                                  f"{spec.url} (it serves {', '.join(served)})")
    sources = [(f"reward.models.{n}", s.path, 0, lambda t, p, a: conversation(t, p, "")) for n, s in models.items()]
    sources += [(f"reward.judges.{n}.model", s.model, s.max_new_tokens,
                 lambda t, p, a, s=s: question(t, s.template.format(prompt=p, completion="", answer=a), s.chat))
                for n, s in judges.items() if s.model]
    for key, path, reply, text in sources:
        tokenizer = AutoTokenizer.from_pretrained(model_path(path))
        limit = context_of(json.loads((model_path(path) / "config.json").read_text()))
        if limit is None:
            continue
        lengths = [len(tokenizer(text(tokenizer, p, a), add_special_tokens=not tokenizer.chat_template)["input_ids"])
                   for p, a in zip(prompts, answers)]
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        needed = lengths[longest] + max_new_tokens + reply
        if needed > limit:
            raise ConfigError(f"{key}: {path} holds {limit} tokens, and prompt row {longest} with "
                              f"rollout.max_new_tokens={max_new_tokens} of completion needs {needed}: lower "
                              f"rollout.max_new_tokens or use a model with a longer context")
