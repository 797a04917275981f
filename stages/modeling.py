"""Models and tokenizers: the built-in tiny one, any local Hugging Face directory, one code path.

Everything is a `transformers` object saved with `save_pretrained` (safetensors) and loaded
with `AutoModelForCausalLM` / `AutoTokenizer`, so a real Hub download and the tiny model
built here are treated the same.
"""

from __future__ import annotations

import contextlib
import json
import os
import string
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models
from transformers.utils import logging as hf_logging
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig,
                          PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast)

from stages.artifacts import fresh_dir, replace_dir
from stages.errors import ModelError
from stages.config import ModelConfig, Params, TinyModel

# Loading bars for a 1M-parameter model are noise; our own bars show progress that matters.
hf_logging.disable_progress_bar()

# Plain (non-special) tokens: completions are decoded with skip_special_tokens=True and the
# format reward must still see the tags.
REASONING_TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"


def configure_threads(params: Params) -> None:
    torch.set_num_threads(params.threads or max(1, os.cpu_count() or 1))


def resolve_device(params: Params) -> torch.device:
    if params.device == "cuda" and not torch.cuda.is_available():
        raise ModelError("device: 'cuda' requested but no CUDA device is available")
    if params.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(params.device)


def dtype_for(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def autocast(device: torch.device):
    """bf16 matmuls on GPU over fp32 master weights (the optimizer needs fp32); plain fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII plus the reasoning tags.

    Characters, not subwords: a tiny model learns digit-wise arithmetic far more easily.
    """
    specials = [PAD, BOS, EOS, UNK]
    vocab = {token: i for i, token in enumerate(specials + list(string.printable[:95] + "\n"))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(t, special=True) for t in specials])
    core.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING_TAGS])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        padding_side="left", model_max_length=None,
    )


def build_tiny_model(shape: TinyModel, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    # Llama-shaped: transformers' qwen2 type would swap in its own tokenizer class on reload.
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        max_position_embeddings=shape.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def check_model_dir(path: Path, trust_remote_code: bool) -> None:
    """Refuse, with one line, a directory we must not or cannot load."""
    if not path.is_dir():
        raise ModelError(f"model.path: {path} is not a directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"model.path: {path} has no config.json")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.glob("*.bin"))
        why = f"only pickle weights ({pickles[0]}); convert them to safetensors" if pickles else "no *.safetensors weights"
        raise ModelError(f"model.path: {path} has {why}")
    config = json.loads(config_file.read_text())
    if config.get("auto_map") and not trust_remote_code:
        raise ModelError(f"model.path: {path} needs remote code; set model.trust_remote_code: true to allow it")
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ModelError(f"model.path: {path} has no tokenizer files")


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ModelError(f"model.path: {path}: the tokenizer has no eos token")
    return tokenizer


def load_model(path: Path, cfg: ModelConfig, device: torch.device, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Load for inference (bf16 on GPU) unless `dtype` says otherwise (fp32 for training)."""
    check_model_dir(path, cfg.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=cfg.trust_remote_code, dtype=dtype or dtype_for(device), use_safetensors=True,
    )
    return model.to(device)


def load_pretrained(path: Path, cfg: ModelConfig, device: torch.device) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = load_model(path, cfg, device)
    return model, load_tokenizer(path, cfg.trust_remote_code)


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a completion: the tokenizer's eos and the model's (chat models have several)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None) if model.generation_config else None
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return sorted(i for i in ids if i is not None)


def prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The text the policy continues: the chat template when the tokenizer has one."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True,
        )
    return prompt + "\n"


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[list[int]]:
    texts = [prompt_text(tokenizer, p) for p in prompts]
    # A chat template already carries the special tokens it wants.
    return tokenizer(texts, add_special_tokens=not tokenizer.chat_template)["input_ids"]


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """save_pretrained (safetensors) into a sibling directory, then swap it in: never half a model."""
    target = Path(target)
    staging = fresh_dir(target.with_name(f".{target.name}.tmp"))
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    replace_dir(staging, target)
