"""Errors the user can fix. Each message is one line naming the culprit: key, file, row."""


def one_line(text: object, limit: int = 200) -> str:
    """`text` on one line, cut to `limit` characters: for quoting a user's value or exception."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


class PipelineError(Exception):
    """Base: the CLI prints the message alone and exits non-zero.

    The message is always one line, whatever was quoted into it (a YAML error, a user's
    exception), so the CLI's `error: ...` is one line too.
    """

    def __str__(self) -> str:
        return " ".join(line.strip() for line in super().__str__().splitlines() if line.strip())


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


class RolloutError(PipelineError, ValueError):
    """A completion that breaks the rollout contract (length, finish reason, log-probs), naming it."""


class PathError(PipelineError, ValueError):
    """A path that is not where it may be written (outside the run directory), naming it."""


class NumericsError(PipelineError, RuntimeError):
    """A NaN/inf loss or gradient, naming the iteration."""


class BusyError(PipelineError, RuntimeError):
    """Another process is running in the same project, naming it."""


class DiskFullError(PipelineError, OSError):
    """A write that found no space left (or hit the file-size limit), naming the path and the size."""


class StoppedError(PipelineError):
    """The run was asked to stop (SIGINT, SIGTERM) and stopped between two stages."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.signal_number = signal_number


class ServiceError(PipelineError, RuntimeError):
    """A bookkeeping service (the Prefect API, the MLflow store) that does not answer, naming it."""


class OutOfMemoryError(PipelineError, MemoryError):
    """An allocation that failed (CPU or GPU), naming the stage, the shapes and the knobs to lower."""


class ReplayError(PipelineError, ValueError):
    """An iteration that cannot be replayed or re-scored as asked (missing, altered, pruned)."""


class WorkerError(PipelineError, RuntimeError):
    """A process of the cluster (trainer rank, rollout worker, reward scorer, Ray node) died or failed."""


class EngineError(PipelineError, RuntimeError):
    """An inference engine's server (vLLM) that is missing, does not start, answer or load, naming it."""
