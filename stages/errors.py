"""Errors the user can fix. Each message is one line naming the culprit: key, file, row."""


class PipelineError(Exception):
    """Base: the CLI prints the message alone and exits non-zero."""


class ConfigError(PipelineError, ValueError):
    """A params problem, naming the key."""


class DataError(PipelineError, ValueError):
    """A problem with the prompts file, naming the file, column or row."""


class ModelError(PipelineError, ValueError):
    """A model directory we cannot or must not load, naming the directory."""


class RewardError(PipelineError, ValueError):
    """A reward function that failed or misbehaved, naming it and the completion."""


class GroupError(PipelineError, ValueError):
    """Rollouts that do not form complete groups of G, naming the prompt."""


class NumericsError(PipelineError, RuntimeError):
    """A NaN/inf loss or gradient, naming the iteration."""
