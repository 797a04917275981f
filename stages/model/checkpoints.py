"""Policy checkpoints: model + tokenizer (safetensors) and optimizer state, one directory each."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stages.model.modeling import save_model, tensor_bytes

OPTIMIZER_FILE = "optimizer.pt"


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                    optimizer: torch.optim.Optimizer | dict[str, Any], target: Path,
                    weights: dict[str, torch.Tensor] | None = None) -> None:
    """`optimizer`: the optimizer, or its state dict; `weights`: the model's state dict when its own
    parameters are not whole (FSDP2 shards)."""
    state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()

    def save_optimizer(staging: Path) -> None:
        # Plain tensors and numbers only, so it loads with weights_only=True (no pickle of code).
        # Through a file object: torch names the archive inside after a path it is given,
        # and a temporary path would make identical states differ byte for byte.
        with open(staging / OPTIMIZER_FILE, "wb") as file:
            torch.save(state, file)

    save_model(model, tokenizer, target, extra=save_optimizer, extra_bytes=tensor_bytes(state), state_dict=weights)


def read_optimizer_state(checkpoint: Path) -> dict[str, Any]:
    return torch.load(checkpoint / OPTIMIZER_FILE, map_location="cpu", weights_only=True)


def load_optimizer_state(optimizer: torch.optim.Optimizer, checkpoint: Path) -> None:
    optimizer.load_state_dict(read_optimizer_state(checkpoint))


def prune(checkpoints_dir: Path, keep_last: int, newest: int) -> list[Path]:
    """Keep the `keep_last` checkpoints up to iteration `newest`; call only once `newest` is complete.

    Checkpoints past `newest` belong to an earlier run that this one has not yet replaced
    (see `manifest.redoing`): they are left alone.
    """
    done = sorted(p for p in checkpoints_dir.glob("[0-9]" * 4) if p.is_dir() and int(p.name) <= newest)
    removed = done[:-keep_last]
    for path in removed:
        shutil.rmtree(path)
    return removed
