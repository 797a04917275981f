"""Policy checkpoints: model + tokenizer (safetensors) and optimizer state, one directory each."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stages.artifacts import atomic_path, fresh_dir, replace_dir

OPTIMIZER_FILE = "optimizer.pt"


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                    optimizer: torch.optim.Optimizer, target: Path) -> None:
    staging = fresh_dir(target.with_name(f".{target.name}.tmp"))
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    # Plain tensors and numbers only, so it loads with weights_only=True (no pickle of code).
    # Saved through a file object: torch names the archive inside after a path, and the
    # temporary path is random, which would make identical states differ byte for byte.
    with atomic_path(staging / OPTIMIZER_FILE) as tmp, open(tmp, "wb") as file:
        torch.save(optimizer.state_dict(), file)
    replace_dir(staging, target)


def load_optimizer_state(optimizer: torch.optim.Optimizer, checkpoint: Path) -> None:
    state = torch.load(checkpoint / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state)


def prune(checkpoints_dir: Path, keep_last: int) -> list[Path]:
    """Remove all but the newest `keep_last` checkpoints; call only once the newest is complete."""
    done = sorted(p for p in checkpoints_dir.glob("[0-9]" * 4) if p.is_dir())
    removed = done[:-keep_last]
    for path in removed:
        shutil.rmtree(path)
    return removed
