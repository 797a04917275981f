"""Ctrl-C and `kill`: how a run stops when asked to.

SIGINT (Ctrl-C, DVC passing on the user's Ctrl-C) and SIGTERM (`kill`, a Prefect cancellation
stopping `dvc exp run`'s process group) are answered the same way:

- in the GRPO loop, the first one lets the running stage finish and stops before the next
  (every artefact of the stage is then complete, and the same command resumes after the
  last complete iteration); a second one stops at once;
- anywhere else (prepare, the SFT of `reference`, evaluate, start-up), the run stops at once:
  those stages write their outputs only at their end, atomically, so stopping loses the work
  of that stage and damages nothing.

Either way the CLI prints one line and exits with 128 + the signal's number, as a shell does.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from types import FrameType
from typing import Callable, Iterator

from stages.errors import StoppedError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """Raised where the main thread is when a signal stops the run at once (a KeyboardInterrupt for SIGTERM too)."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number


def _install(handler: Callable[[int, FrameType | None], None]) -> dict[int, object]:
    if threading.current_thread() is not threading.main_thread():
        return {}  # signals reach the main thread only; whoever runs us there handles them
    return {sig: signal.signal(sig, handler) for sig in SIGNALS}


def _restore(previous: dict[int, object]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _stop_at_once(signal_number: int, frame: FrameType | None) -> None:
    raise Interrupted(signal_number)


@contextmanager
def stop_at_once() -> Iterator[None]:
    """Within: SIGINT and SIGTERM raise `Interrupted` wherever the main thread is."""
    previous = _install(_stop_at_once)
    try:
        yield
    finally:
        _restore(previous)


class StopAtBoundary:
    """Within: the first SIGINT/SIGTERM is remembered and `check()` raises it at the next boundary;
    a second one raises `Interrupted` at once."""

    def __init__(self, announce: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)):
        self.received: int | None = None
        self._announce = announce
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopAtBoundary:
        self._previous = _install(self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        _restore(self._previous)

    def _handle(self, signal_number: int, frame: FrameType | None) -> None:
        if self.received is not None:
            raise Interrupted(signal_number)
        self.received = signal_number
        self._announce(f"grpo: {signal.Signals(signal_number).name} received: stopping after the running stage "
                       f"(send it again to stop at once)")

    def check(self, done: str) -> None:
        """Between stages: stop here if a signal came (`done` says what is complete)."""
        if self.received is not None:
            name = signal.Signals(self.received).name
            raise StoppedError(f"stopped by {name} after {done}; run the same command to resume "
                               f"after the last complete iteration", self.received)
