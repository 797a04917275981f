"""Reward functions run in a process of their own, and every call has a deadline.

A reward that hangs (a judge that never answers, a regex that backtracks forever, a sympy
simplification that never ends) would otherwise hang the whole run: a thread cannot be
stopped, and C code holding the GIL would stop the trainer's threads too. So the reward
stage hands each component's call to a scoring process, `python -m stages.rewards.scoring`, started
once per run (math-verify, the user's reward modules and any reward or judge model are
loaded once), and waits for
its answer at most `reward.timeout_seconds`. A call past its deadline kills the process and
stops the iteration before rewards.parquet is written, naming the reward and the prompts.

Requests and replies are JSON lines (nothing is unpickled). Running on its own main thread,
the scoring process can also give math-verify its signal-based per-answer timeouts, which a
thread of the trainer cannot (see `stages.rewards.rules.answers_match`).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pandas as pd

from stages.config import JudgeSpec, RewardConfig, RewardModelSpec
from stages.errors import PipelineError, RewardError, one_line
from stages.rewards.rules import RewardFn, answers_match, import_reward, resolve

COLUMNS = ["prompt", "completion", "answer", "prompt_id", "sample"]
OPTIONAL_COLUMNS = ["completion_length"]  # sent when the rollouts have it (rollout's do; a hand-made frame may not)
STARTUP_SECONDS = 120  # importing math-verify and the user's reward modules, on a busy machine
MODEL_LOAD_SECONDS = 900  # ... and loading reward or judge models (a 7B one from a slow disk)
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the scoring process before it starts: SIGKILL it when the trainer dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.setpgrp()  # not in the terminal's process group: Ctrl-C is the trainer's to answer


def _prompt_ids(rollouts: pd.DataFrame, shown: int = 4) -> str:
    ids = list(dict.fromkeys(rollouts["prompt_id"].tolist()))
    listed = ", ".join(repr(i) for i in ids[:shown])
    return f"prompt_id {listed}" + (f" and {len(ids) - shown} more" if len(ids) > shown else "")


def scorers(cfg: RewardConfig) -> str:
    """What the scoring process loads at its start, as its one argument: the user's reward modules,
    the reward and judge models, and the torch threads a model may use (the caller's: the trainer's
    `threads` in process, one on a reward worker)."""
    threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else 1
    return json.dumps({"custom": cfg.custom, "models": {n: s.model_dump() for n, s in cfg.models.items()},
                       "judges": {n: s.model_dump() for n, s in cfg.judges.items()}, "threads": threads},
                      sort_keys=True)


def _key(spec: str) -> tuple:
    return tuple(sys.path), os.getcwd(), spec


class ScoringProcess:
    """The trainer's end: one scoring process, one iteration's rewards at a time."""

    def __init__(self, spec: str) -> None:
        # The user's reward modules must import there as they do here (`python -m` puts the
        # project on sys.path; tests prepend their workspace).
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.key = _key(spec)
        self.process = subprocess.Popen([sys.executable, "-m", "stages.rewards.scoring", spec], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=env, preexec_fn=_die_with_parent)
        self._received = b""
        # It imports math-verify and the user's modules, and loads the models, before it says it
        # is ready: that time is not a reward's, and must not count against reward.timeout_seconds.
        loads = json.loads(spec)
        startup = STARTUP_SECONDS + (MODEL_LOAD_SECONDS if loads["models"] or loads["judges"] else 0)
        started = self._line(startup)
        if started is None or not started or "ready" not in json.loads(started):
            self.stop()
            why = json.loads(started).get("error") if started else None
            raise RewardError(why or f"the reward scoring process did not start within {startup} s "
                                     f"(exit code {self.process.returncode}); see the lines above")

    def _line(self, seconds: float) -> bytes | None:
        """The next reply line; None past the deadline; b"" if the process ended."""
        deadline = time.monotonic() + seconds
        while b"\n" not in self._received:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.process.stdout], [], [], remaining)[0]:
                if time.monotonic() >= deadline:
                    return None
                continue  # a signal woke select early
            chunk = os.read(self.process.stdout.fileno(), 1 << 16)
            if not chunk:
                return b""
            self._received += chunk
        line, self._received = self._received.split(b"\n", 1)
        return line

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait()

    def score(self, weights: dict[str, float], rollouts: pd.DataFrame, settings: dict[str, Any],
              timeout: float) -> dict[str, np.ndarray]:
        """`score_component` of every weighted reward, run there in order, each within `timeout`;
        one request for all (the completions are sent once), one reply per reward. `settings`:
        `stages.reward.run_settings` (target_language, max_new_tokens, overlong_buffer)."""
        names = list(weights)
        columns = COLUMNS + [column for column in OPTIONAL_COLUMNS if column in rollouts]
        request = {"names": names, "weights": weights, "settings": settings,
                   "columns": {column: rollouts[column].tolist() for column in columns}}
        self.process.stdin.write(json.dumps(request, default=_plain).encode() + b"\n")
        self.process.stdin.flush()
        scores = {}
        for name in names:
            line = self._line(timeout)
            if line is None:
                self.stop()
                raise RewardError(f"reward {name!r} did not return within reward.timeout_seconds={timeout:g} on the "
                                  f"{len(rollouts)} completions of {_prompt_ids(rollouts)}; it was stopped")
            if not line:
                code = self.process.wait()
                raise RewardError(f"reward {name!r} ended its scoring process (exit code {code}) on the "
                                  f"{len(rollouts)} completions of {_prompt_ids(rollouts)}")
            reply = json.loads(line)
            if "error" in reply:
                self.stop()  # it may still be scoring the rewards after this one: start afresh next time
                raise RewardError(reply["error"])
            scores[name] = np.array([math.nan if v is None else v for v in reply["values"]], dtype=float)
        return scores


def _plain(value: Any) -> Any:
    """numpy scalars and arrays (prompt ids, answers) as the JSON values they hold."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# ---- inside the scoring process: one component on one iteration's completions ----------------

def _call(fn: RewardFn, rollouts: pd.DataFrame, settings: dict[str, Any]) -> Any:
    columns = {
        "answer": rollouts["answer"].tolist(),
        "prompt_id": rollouts["prompt_id"].tolist(),
        "sample": rollouts["sample"].tolist(),
        # Tokens, eos included; None for a frame without it (one made by hand, not by rollout).
        "completion_length": rollouts["completion_length"].tolist() if "completion_length" in rollouts else None,
        **settings,
    }
    return fn(rollouts["prompt"].tolist(), rollouts["completion"].tolist(), **columns)


def _culprit(rollouts: pd.DataFrame, row: int) -> str:
    """How a user finds the completion again in rollouts.parquet."""
    culprit = rollouts.iloc[row]
    return f"prompt_id={culprit['prompt_id']!r} sample={culprit['sample']}"


def _failure(name: str, fn: RewardFn, rollouts: pd.DataFrame, settings: dict[str, Any],
             error: Exception) -> RewardError:
    """The error for a reward that raised: on the first completion it raises on alone, if any."""
    for row in range(len(rollouts)):
        try:
            _call(fn, rollouts.iloc[row:row + 1], settings)
        except Exception as alone:
            return RewardError(f"reward {name!r} raised on {_culprit(rollouts, row)}: "
                               f"{type(alone).__name__}: {one_line(alone)}")
    return RewardError(f"reward {name!r} raised on the batch of {len(rollouts)} completions (on none alone): "
                       f"{type(error).__name__}: {one_line(error)}")


def _as_list(name: str, result: Any, expected: int) -> list:
    """A reward's result as one entry per completion, or an error saying what came back instead."""
    shape = getattr(result, "shape", None)
    if shape is not None and len(shape) != 1:
        raise RewardError(f"reward {name!r} returned an array of shape {tuple(shape)}, expected ({expected},): "
                          f"one score per completion")
    if result is None or isinstance(result, (str, bytes, dict)) or not hasattr(result, "__iter__"):
        raise RewardError(f"reward {name!r} returned {type(result).__name__} {one_line(repr(result), 60)}, "
                          f"expected a list of {expected} scores, one per completion")
    scores = list(result)
    if len(scores) != expected:
        raise RewardError(f"reward {name!r} returned {len(scores)} scores for {expected} completions")
    return scores


def score_component(name: str, fn: RewardFn, rollouts: pd.DataFrame, settings: dict[str, Any]) -> np.ndarray:
    """Exactly one finite float per completion (NaN = abstained, from `None`), or an error naming the culprit.
    `settings` (`run_settings`) are passed to `fn` as keyword columns."""
    try:
        result = _call(fn, rollouts, settings)
    except Exception as error:  # the user's code: find the completion it fails on, to reproduce it
        raise _failure(name, fn, rollouts, settings, error) from None
    values = np.full(len(rollouts), np.nan)
    for row, score in enumerate(_as_list(name, result, len(rollouts))):
        if score is None:  # an explicit abstention
            continue
        try:
            value = math.nan if isinstance(score, (str, bytes)) else float(score)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise RewardError(
                f"reward {name!r} returned {one_line(repr(score), 60)} for {_culprit(rollouts, row)}: "
                f"expected a finite number or None (abstain)"
            )
        values[row] = value
    return values


_current: ScoringProcess | None = None


def scoring_process(cfg: RewardConfig) -> ScoringProcess:
    """The run's scoring process: started on first use, again after a timeout or when what it loads changed."""
    global _current
    spec = scorers(cfg)
    if _current is None or not _current.alive() or _current.key != _key(spec):
        if _current is not None:
            _current.stop()
        _current = ScoringProcess(spec)
    return _current


def serve(spec: dict, requests, replies) -> None:
    for line in requests:
        request = json.loads(line)
        columns = pd.DataFrame(request["columns"])
        for name in request["names"]:  # each answered as soon as it is scored: its own deadline
            try:
                # The same objects each time: a model component keeps its loaded model.
                functions = resolve(request["weights"], spec["custom"], spec["models"], spec["judges"])
                values = score_component(name, functions[name], columns, request["settings"])
                reply = {"values": [None if math.isnan(v) else float(v) for v in values]}
            except RewardError as error:
                reply = {"error": str(error)}
            except Exception as error:  # importing the user's module: refused at params load already
                reply = {"error": f"reward {name!r}: {type(error).__name__}: {one_line(error)}"}
            print(json.dumps(reply), file=replies, flush=True)
            if "error" in reply:
                break  # the trainer stops at the first error


def warm_up(spec: dict) -> dict:
    """Import what scoring needs and load the models, so a reward's first call is timed on its own
    work; `spec` (from `scorers`) with the model sections as the params' own types."""
    answers_match("1", "1")  # math-verify imports its parsers on first use
    for dotted in spec["custom"]:
        import_reward(dotted)
    models = {n: RewardModelSpec.model_validate(s) for n, s in spec["models"].items()}
    judges = {n: JudgeSpec.model_validate(s) for n, s in spec["judges"].items()}
    if models or any(s.model for s in judges.values()):
        import torch

        from stages.rewards.models import warm_up as load_models

        torch.set_num_threads(spec["threads"])
        load_models(models, judges)
    return {**spec, "models": models, "judges": judges}


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the trainer decides when scoring stops
    # Replies get stdout to themselves: whatever a reward function prints goes to stderr.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        spec = warm_up(json.loads(sys.argv[1]))
    except PipelineError as error:  # a model that passed the checks but does not load: the trainer says it
        print(json.dumps({"error": str(error)}), file=replies, flush=True)
        return 1
    except Exception as error:  # refused at params load already; the trainer names it
        print(f"scoring process: {type(error).__name__}: {one_line(error)}", file=sys.stderr)
        return 1
    print(json.dumps({"ready": True}), file=replies, flush=True)
    serve(spec, sys.stdin, replies)
    return 0


if __name__ == "__main__":
    sys.exit(main())
