"""One run at a time in a project directory: a lock on runs/.lock that names its holder.

Two runs writing the same runs/ would interleave their iterations and checkpoints. Every
command that writes artefacts holds this lock; a second one is refused at once, with the
holder's pid, host and command. The lock is `flock`: the kernel drops it when its holder
exits, however it exits (kill -9 included), so a lock left by a dead process is simply
taken by the next run; the file stays, and only says who held it last.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from typing import Iterator

from stages.records.artifacts import Layout
from stages.errors import BusyError

LOCK_FILE = ".lock"  # in runs/; listed in .dvcignore, so DVC never versions it


def _holder(handle) -> str:
    """Who holds the lock, as its file says (the holder writes it right after taking the lock)."""
    for _ in range(20):  # the holder may be between taking the lock and writing its name
        handle.seek(0)
        text = handle.read()
        if text.strip():
            try:
                info = json.loads(text)
                return (f"pid {info['pid']} on host {info['host']} ({info['command']}, "
                        f"since {info['since']})")
            except (ValueError, KeyError):
                break
        time.sleep(0.05)
    return "a process that has not said who it is"


@contextmanager
def exclusive_run(layout: Layout, command: str) -> Iterator[None]:
    """Hold the project's run lock for the duration; refuse at once if another process holds it."""
    path = layout.runs / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BusyError(f"{layout.runs} is in use by another run: {_holder(handle)}; "
                            f"wait for it to end or stop it, then run this again") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "command": command,
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
