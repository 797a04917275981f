"""Reward functions: a registry of named, batched scorers with TRL's calling convention.

A reward function is `fn(prompts, completions, **columns) -> list[float | None]`: one score
per completion, `None` to abstain. `columns` carries `answer`, `prompt_id`, `sample`,
`completion_length` (tokens, eos included), and the run's `target_language`, `max_new_tokens`
(rollout.max_new_tokens) and `overlong_buffer`, so a TRL reward function works here unchanged.
Users add their own by a dotted path (`reward.custom: ["mypkg.rewards:my_reward"]`).
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
from stages.config import SCRIPTS

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
# scored on the main thread of the scoring process (stages/rewards/scoring.py), where each parse and
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


# Partial credit for an answer with no digits that spells the right number in Thai number words
# (the seed's "แปด", eight, for 1 + 7): the right value, but not in the digits the task asks for,
# so it ranks below a right answer in digits (1.0) and above a wrong one (0.0).
SPELLED_CREDIT = 0.7

THAI_DIGITS = {"ศูนย์": 0, "หนึ่ง": 1, "สอง": 2, "สาม": 3, "สี่": 4, "ห้า": 5, "หก": 6, "เจ็ด": 7, "แปด": 8, "เก้า": 9}
THAI_PLACES = {"สิบ": 10, "ร้อย": 100, "พัน": 1000, "หมื่น": 10_000, "แสน": 100_000}
# ยี่ is two before สิบ only (ยี่สิบ, 20); เอ็ด is a units 1 after a higher place (สิบเอ็ด, 11); ล้าน is a million.
_THAI_WORD = re.compile("|".join(sorted([*THAI_DIGITS, *THAI_PLACES, "ยี่", "เอ็ด", "ล้าน"], key=len, reverse=True)))
_INTEGER = re.compile(r"[+-]?\d+")


def _thai_below_million(words: list[str], after_higher: bool) -> int | None:
    """0..999,999 from its words in Thai order: each place at most once, largest first, then the units."""
    total, last_place, i = 0, 10 ** 6, 0
    while i < len(words):
        word, following = words[i], words[i + 1] if i + 1 < len(words) else None
        if word == "ยี่":  # only as ยี่สิบ
            coefficient, place, i = 2, THAI_PLACES["สิบ"] if following == "สิบ" else None, i + 2
        elif word in THAI_PLACES:  # a bare place: one of it (ร้อยสาม, 103; สิบ, 10)
            coefficient, place, i = 1, THAI_PLACES[word], i + 1
        elif word in THAI_DIGITS and following in THAI_PLACES:
            coefficient, place, i = THAI_DIGITS[word], THAI_PLACES[following], i + 2
            if place == 10 and coefficient in (1, 2):  # สิบ and ยี่สิบ, never หนึ่งสิบ or สองสิบ
                return None
        else:  # the units: the last word
            if i != len(words) - 1:
                return None
            if word == "เอ็ด":
                if last_place == 10 ** 6 and not after_higher:  # nothing before it: a 1 alone is หนึ่ง
                    return None
            elif word not in THAI_DIGITS or word == "ศูนย์" or (word == "หนึ่ง" and last_place == 10):
                return None  # ศูนย์ only alone; 11 is สิบเอ็ด, not สิบหนึ่ง
            return total + (1 if word == "เอ็ด" else THAI_DIGITS[word])
        if place is None or coefficient == 0 or place >= last_place:
            return None
        total, last_place = total + coefficient * place, place
    return total


def thai_number(text: str) -> int | None:
    """The integer `text` spells in Thai number words, or None: แปด 8, สิบเอ็ด 11, ยี่สิบสาม 23,
    ร้อยสาม 103, หนึ่งร้อยสามสิบสาม 133, สองพันห้าร้อยเอ็ด 2501, สามล้าน 3,000,000, ลบห้า -5.

    Written as Thai writes numbers: no spaces between the words, places largest first, each
    once. Anything else in `text` (another word, a digit, punctuation) makes it not a number.
    """
    text = unicodedata.normalize("NFC", text.strip())
    sign = -1 if text.startswith("ลบ") else 1  # "minus"
    text = text.removeprefix("ลบ")
    words, position = [], 0
    for match in _THAI_WORD.finditer(text):
        if match.start() != position:
            return None
        words.append(match.group())
        position = match.end()
    if not words or position != len(text):
        return None
    if words == ["ศูนย์"]:
        return 0
    groups = " ".join(words).split("ล้าน")  # millions: X ล้าน Y, X itself may hold ล้าน (ล้านล้าน, 10^12)
    value = 0
    for k, group in enumerate(groups):
        part = group.split()
        if not part:
            read = 1 if k == 0 and len(groups) > 1 else 0  # ล้าน alone: one million
        else:
            read = _thai_below_million(part, after_higher=k > 0)
            if read is None:
                return None
        value = value * 10 ** 6 + read
    return sign * value


def spelled_value(answer: str) -> int | None:
    """The number a digit-free answer spells in Thai words: its last whitespace-separated word
    (trimmed of punctuation) that reads as one (`thai_number`). None if the answer has a digit."""
    if any(unicodedata.category(ch) == "Nd" for ch in answer):
        return None
    for word in reversed(answer.split()):
        value = thai_number(word.strip(".,!?;:\"'()"))
        if value is not None:
            return value
    return None


def answer_score(gold: str, predicted: str) -> float:
    """1 for a math-verify match; SPELLED_CREDIT for an integer answer spelled in Thai words; else 0."""
    if answers_match(gold, predicted):
        return 1.0
    integer = _INTEGER.fullmatch(gold.strip().replace(",", ""))
    if integer is not None and spelled_value(predicted) == int(integer.group()):
        return SPELLED_CREDIT
    return 0.0


@reward("accuracy")
def accuracy(prompts, completions, answer, **_) -> list[float]:
    """1 when the answer (inside `<answer>` if present) equals the gold one, checked by math-verify;
    SPELLED_CREDIT when it has no digits and spells the gold integer in Thai number words."""
    return [answer_score(str(gold), extract_answer(c)) for c, gold in zip(completions, answer)]


@reward("format")
def format_reward(prompts, completions, **_) -> list[float]:
    """1 for exactly `<think>…</think><answer>…</answer>`, surrounding whitespace allowed."""
    return [float(_FORMAT.fullmatch(c) is not None) for c in completions]


@reward("overlong")
def overlong(prompts, completions, completion_length=None, max_new_tokens=None, overlong_buffer=None,
             **_) -> list[float]:
    """DAPO's soft overlong punishment (its eq. 13; verl's overlong buffer, whose penalty_factor is
    this reward's weight): 0 up to `max_new_tokens - overlong_buffer` tokens, then linearly down to
    -1 at `max_new_tokens`. Lengths in tokens, eos included (rollouts.parquet's completion_length)."""
    if completion_length is None or max_new_tokens is None or overlong_buffer is None:
        missing = [name for name, value in (("completion_length", completion_length), ("max_new_tokens", max_new_tokens),
                                            ("overlong_buffer", overlong_buffer)) if value is None]
        raise ValueError(f"'overlong' needs {', '.join(missing)}: score rollouts with their completion_length "
                         f"and rollout.max_new_tokens")
    expected = max_new_tokens - overlong_buffer
    return [min(0.0, -(int(length) - expected) / overlong_buffer) for length in completion_length]


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


def resolve(weights: dict[str, float], custom: list[str], models: dict | None = None,
            judges: dict | None = None) -> dict[str, RewardFn]:
    """The reward components of a run, by name: built-ins, the user's functions (`custom`), reward
    models and judges (`stages.rewards.models`: checked here, loaded when first called), each with a weight."""
    from stages.rewards.models import check_model_rewards, model_rewards

    models, judges = models or {}, judges or {}
    available = dict(REGISTRY)
    for dotted in custom:
        name = dotted.replace(":", ".").rsplit(".", 1)[-1]
        if name in available:  # a second function of that name would silently replace the first
            raise ConfigError(f"reward.custom: {dotted!r} is named {name!r}, like another reward; rename it")
        available[name] = import_reward(dotted)
    for section, names in (("models", models), ("judges", judges)):
        for name in names:
            if name in available:
                raise ConfigError(f"reward.{section}.{name}: named like another reward; rename it")
    check_model_rewards(models, judges)
    available.update(model_rewards(models, judges))
    for name in weights:
        if name not in available:
            raise ConfigError(f"reward.weights.{name}: no such reward (known: {', '.join(sorted(available))})")
    for name in set(available) - set(REGISTRY):
        if name not in weights:
            where = ("models" if name in models else "judges") if name in {**models, **judges} else "custom"
            raise ConfigError(f"reward.{where}: {name!r} has no weight in reward.weights")
    return {name: available[name] for name in weights}
