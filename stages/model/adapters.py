"""LoRA through peft (`model.lora`): the policy as low-rank adapters over the frozen reference.

The reference is the same model with its adapters disabled, as TRL does: one copy of the
base weights in memory, not two. Checkpoints hold the adapters (peft's own format) and their
optimizer state; `models/policy` is the merged model, a plain Hugging Face directory that
`AutoModelForCausalLM` loads, with the adapter beside it in `models/policy/adapter/`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stages.config import LoraSection
from stages.errors import ModelError, one_line
from stages.model.modeling import save_model

ADAPTER_DIR = "adapter"  # under models/policy


def add_adapters(base: PreTrainedModel, cfg: LoraSection, seed: int) -> PeftModel:
    """Fresh adapters on `base`: A drawn from `seed` (B is zero, so the policy starts as the reference)."""
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                        target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):  # peft draws A from the global generator
        torch.manual_seed(seed)
        try:
            return get_peft_model(base, config)
        except ValueError as error:  # "Target modules {...} not found in the base model."
            raise ModelError(f"model.lora.target_modules: {one_line(error)}") from None


def load_adapters(base: PreTrainedModel, checkpoint: Path) -> PeftModel:
    return PeftModel.from_pretrained(base, checkpoint, is_trainable=True)


def is_adapted(model: torch.nn.Module) -> bool:
    return isinstance(model, PeftModel)


@contextlib.contextmanager
def as_reference(model: PreTrainedModel) -> Iterator[PreTrainedModel]:
    """The model the reference log-probs come from: an adapted policy with its adapters off."""
    if is_adapted(model):
        with model.disable_adapter():
            yield model
    else:
        yield model


def save_policy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """The final policy: a plain directory; an adapted one merged (in place: the run is over), its
    adapter saved beside it as peft saves one."""
    if not is_adapted(model):
        save_model(model, tokenizer, target)
        return
    adapter = {name: tensor.detach().clone() for name, tensor in get_peft_model_state_dict(model).items()}
    config = model.peft_config["default"]

    def save_adapter(staging: Path) -> None:
        (staging / ADAPTER_DIR).mkdir()
        save_file(adapter, staging / ADAPTER_DIR / "adapter_model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(staging / ADAPTER_DIR)

    save_model(model.merge_and_unload(), tokenizer, target, extra=save_adapter,
               extra_bytes=sum(t.numel() * t.element_size() for t in adapter.values()))
