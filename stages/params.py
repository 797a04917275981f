"""Reading params.yaml: overrides applied, every key validated (`stages.config`), and every reward
it names resolved — before any stage writes anything.

Apart from `stages.config` (what a valid value is) because resolving the rewards imports the
reward components (`stages.rewards`), which themselves read their settings' types from config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from stages.config import Params, set_key
from stages.errors import ConfigError, one_line
from stages.rewards.rules import resolve  # imports the user's reward modules when called; math-verify later


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"])
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        message = "missing key"
    elif first["type"] == "value_error":  # our own validators: their message, without pydantic's prefix
        message = str(first["ctx"]["error"])
    return f"{key}: {message}" if key else message


def parse_params(raw: dict[str, Any]) -> Params:
    """Validate every key, and that every reward named in `reward` resolves, before any stage runs.

    Checking the rewards here (importing the user's dotted paths) means a typo there stops
    `prepare` or `train` before it writes or discards anything, not mid-iteration.
    """
    try:
        params = Params.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"params: {_describe(error)}") from None
    try:
        resolve(params.reward.weights, params.reward.custom, params.reward.models, params.reward.judges)
    except ConfigError as error:
        raise ConfigError(f"params: {error}") from None
    return params


def load_params(path: str | Path = "params.yaml", overrides: list[str] = ()) -> Params:
    """Read `path`, apply `key=value` overrides (values parsed as YAML), validate."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"params: file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        why = getattr(error, "strerror", None) or error
        raise ConfigError(f"params: cannot read {path}: {one_line(why)}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"params: {path} is not valid YAML: {_yaml_problem(error)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"params: {path} must hold a mapping of keys, not a {type(raw).__name__}")
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"params: override {override!r} is not key=value")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ConfigError(f"params: {key.strip()}: override value {value!r} is not valid YAML: "
                              f"{_yaml_problem(error, with_line=False)}") from None
        set_key(raw, key.strip(), parsed)
    return parse_params(raw)


def _yaml_problem(error: yaml.YAMLError, with_line: bool = True) -> str:
    """`line 3 column 5: mapping values are not allowed here`: where, then what."""
    mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
    if mark is None or problem is None:
        return one_line(error)
    where = f"line {mark.line + 1} column {mark.column + 1}: " if with_line else ""
    return where + one_line(problem)
