"""An allocation that fails becomes one line a user can act on: the stage, the shapes, the knobs.

torch says "DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes" on CPU
and raises torch.OutOfMemoryError on CUDA, each with a screen of traceback; neither says which
of the run's knobs made the tensor that large. Nothing is written when it happens (every stage
writes its files at its end), so the same command resumes after the knob is lowered; the
knobs named here change memory, not the maths (grpo.micro_batch_size, gradient checkpointing),
or say so.
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator

import torch

from stages.records.artifacts import readable_size
from stages.errors import OutOfMemoryError

_CPU_ALLOCATION = re.compile(r"can't allocate memory: you tried to allocate (\d+) bytes")
_CUDA_ALLOCATION = re.compile(r"Tried to allocate ([\d.]+ [KMGT]?i?B)")


def failed_allocation(error: BaseException) -> str | None:
    """How much the failed allocation wanted ("" when unknown), or None if `error` is not one."""
    text = str(error)
    if isinstance(error, torch.OutOfMemoryError):
        found = _CUDA_ALLOCATION.search(text)
        return found.group(1) if found else ""
    if isinstance(error, RuntimeError) and "can't allocate memory" in text:
        found = _CPU_ALLOCATION.search(text)
        return readable_size(int(found.group(1))) if found else ""
    if isinstance(error, MemoryError) and not isinstance(error, OutOfMemoryError):
        return ""
    return None


@contextlib.contextmanager
def memory_named(where: str, shapes: str, remedy: str) -> Iterator[None]:
    """Turn a failed allocation inside the block into an OutOfMemoryError naming `where`, the
    `shapes` that set its size and the `remedy` (the knobs to lower)."""
    try:
        yield
    except (RuntimeError, MemoryError) as error:
        wanted = failed_allocation(error)
        if wanted is None:
            raise
        asked = f", one more tensor of {wanted}" if wanted else ""
        raise OutOfMemoryError(f"out of memory in {where} ({shapes}{asked}): {remedy}") from None
