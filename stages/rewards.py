"""Reward functions: a registry of named, batched scorers with TRL's calling convention.

A reward function is `fn(prompts, completions, **columns) -> list[float | None]`: one score
per completion, `None` to abstain. `columns` carries `answer`, `prompt_id`, `sample` and
`target_language`, so a TRL reward function works here unchanged. Users add their own by a
dotted path (`reward.custom: ["mypkg.rewards:my_reward"]`).
"""

from __future__ import annotations

import importlib
import logging
import re
import threading
import unicodedata
from functools import lru_cache
from typing import Callable, Optional, Sequence

from stages.errors import ConfigError, one_line
from stages.languages import SCRIPTS

RewardFn = Callable[..., Sequence[Optional[float]]]
REGISTRY: dict[str, RewardFn] = {}

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)


def reward(name: str) -> Callable[[RewardFn], RewardFn]:
    def register(fn: RewardFn) -> RewardFn:
        REGISTRY[name] = fn
        return fn
    return register


def extract_answer(completion: str) -> str:
    """The last `<answer>…</answer>` span, or the whole completion when there is none."""
    spans = _ANSWER.findall(completion)
    return (spans[-1] if spans else completion).strip()


def extract_reasoning(completion: str) -> str:
    spans = _THINK.findall(completion)
    return "".join(spans) if spans else _ANSWER.sub("", completion)


# math-verify's timeouts are SIGALRM alarms, which only the main thread can set: rewards are
# scored on the main thread of the scoring process (stages/scoring.py), where each parse and
# comparison gets MATH_VERIFY_SECONDS (a timed-out answer counts as wrong, not as a hang), and
# reward.timeout_seconds bounds the whole call. Elsewhere (a thread) there is no alarm;
# inputs are capped in length either way. math-verify warns on every call without one.
logging.getLogger("math_verify").setLevel(logging.ERROR)
MATH_VERIFY_SECONDS = 5


def _alarm_seconds() -> int | None:
    return MATH_VERIFY_SECONDS if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=65536)
def _parsed(text: str) -> tuple:
    # Late: math-verify (and sympy under it) takes most of a second to import, and every CLI
    # command imports this module to check `reward` params, even one that scores nothing.
    from math_verify import parse

    return tuple(parse(text[:512], parsing_timeout=_alarm_seconds()))


@lru_cache(maxsize=65536)
def answers_match(gold: str, predicted: str) -> bool:
    from math_verify import verify

    gold_parsed = _parsed(gold)
    if not gold_parsed:  # not mathematical: an exact match is all we can ask
        return gold.strip() == predicted.strip()
    predicted_parsed = _parsed(predicted)
    return bool(predicted_parsed) and verify(list(gold_parsed), list(predicted_parsed),
                                             timeout_seconds=_alarm_seconds())


@reward("accuracy")
def accuracy(prompts, completions, answer, **_) -> list[float]:
    """1 when the answer (inside `<answer>` if present) equals the gold one, checked by math-verify."""
    return [float(answers_match(str(gold), extract_answer(c))) for c, gold in zip(completions, answer)]


@reward("format")
def format_reward(prompts, completions, **_) -> list[float]:
    """1 for exactly `<think>…</think><answer>…</answer>`, surrounding whitespace allowed."""
    return [float(_FORMAT.fullmatch(c) is not None) for c in completions]


def script_share(text: str, scripts: set[str]) -> float:
    """Share of the letters (and combining marks) in `text` written in one of `scripts`.

    Digits, spaces and punctuation belong to no language and are not counted; a text with
    no letters at all cannot be in the wrong language and scores 1.
    """
    letters = [ch for ch in text if unicodedata.category(ch)[0] in "LM"]
    if not letters:
        return 1.0
    in_script = sum(unicodedata.name(ch, "").split(" ")[0] in scripts for ch in letters)
    return in_script / len(letters)


@reward("language")
def language(prompts, completions, target_language, **_) -> list[float]:
    """Share of the reasoning written in the target language's script (DeepSeek-R1's consistency reward)."""
    languages = [target_language] * len(completions) if isinstance(target_language, str) else target_language
    return [script_share(extract_reasoning(c), SCRIPTS[lang]) for c, lang in zip(completions, languages)]


def import_reward(dotted: str) -> RewardFn:
    """`package.module:function` (or `package.module.function`) → the function."""
    module_name, sep, attr = dotted.partition(":")
    if not sep:
        module_name, _, attr = dotted.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"reward.custom: {dotted!r} is not 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except Exception as error:  # the user's module runs on import: any error is theirs to see
        raise ConfigError(f"reward.custom: cannot import {dotted!r}: "
                          f"{type(error).__name__}: {one_line(error)}") from None
    if not callable(fn):
        raise ConfigError(f"reward.custom: {dotted!r} is not callable")
    return fn


def resolve(weights: dict[str, float], custom: list[str]) -> dict[str, RewardFn]:
    """The reward components of a run, by name: built-ins plus the user's, each with a weight."""
    available = dict(REGISTRY)
    for dotted in custom:
        name = dotted.replace(":", ".").rsplit(".", 1)[-1]
        if name in available:  # a second function of that name would silently replace the first
            raise ConfigError(f"reward.custom: {dotted!r} is named {name!r}, like another reward; rename it")
        available[name] = import_reward(dotted)
    for name in weights:
        if name not in available:
            raise ConfigError(f"reward.weights.{name}: no such reward (known: {', '.join(sorted(available))})")
    for name in set(available) - set(REGISTRY):
        if name not in weights:
            raise ConfigError(f"reward.custom: {name!r} has no weight in reward.weights")
    return {name: available[name] for name in weights}
