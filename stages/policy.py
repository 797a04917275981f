"""The policy as the trainers and the rollout workers build it: from the reference, or a checkpoint."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from stages.model.adapters import add_adapters, load_adapters
from stages.records.artifacts import Layout
from stages.model.checkpoints import read_optimizer_state
from stages.config import Params
from stages.model.distributed import Rank, distribute, load_full_optimizer_state
from stages.records.manifest import checkpoint_path
from stages.model.modeling import (compute_dtype, dtype_for, enable_gradient_checkpointing, load_model, load_tokenizer,
                             resolve_device)
from stages.update import TrainState, make_optimizer


def load_policy(params: Params, layout: Layout, checkpoint: int, device: torch.device) -> PreTrainedModel:
    """The policy after iteration `checkpoint` (0: before the first), fp32, in eval mode."""
    source = checkpoint_path(layout, checkpoint)
    # fp32 master weights: AdamW on bf16 weights loses small updates. bf16 comes from autocast.
    if params.model.lora.r:  # the reference's weights, frozen, and adapters: fresh, or the checkpoint's
        base = load_model(layout.reference, params.model, device, dtype=torch.float32)
        model = load_adapters(base, source) if checkpoint else add_adapters(base, params.model.lora, params.seed)
    else:
        model = load_model(source, params.model, device, dtype=torch.float32)
    return model.eval()


def load_train_state(params: Params, layout: Layout, start: int, rank: Rank = Rank()) -> TrainState:
    """The policy to train from iteration `start` on, its optimizer and, in a trainer group, this rank's wrapping."""
    device = resolve_device(params)
    if device.type == "cuda" and rank.world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    compute_dtype(device, params.precision)  # a precision this machine cannot run: refused before any work
    model = load_policy(params, layout, start, device)
    if params.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    reader = distribute(model, params.distributed.strategy, rank)
    # After `distribute`: under FSDP2 the optimizer must hold the sharded parameters.
    state = TrainState(model, load_tokenizer(checkpoint_path(layout, start), params.model.trust_remote_code),
                       make_optimizer(model, params), rank, reader)
    if start:
        load_full_optimizer_state(reader, state.optimizer, read_optimizer_state(checkpoint_path(layout, start)))
    return state


def load_reference(params: Params, layout: Layout, state: TrainState) -> PreTrainedModel | None:
    """The frozen reference (None when beta = 0); with LoRA the policy itself, its adapters disabled."""
    if params.grpo.beta == 0.0:
        return None
    if params.model.lora.r:
        return state.model
    return load_model(layout.reference, params.model, state.model.device,
                      dtype=dtype_for(state.model.device, params.precision)).eval()
