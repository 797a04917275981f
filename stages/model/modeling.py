"""Models and tokenizers: the built-in tiny one, any local Hugging Face directory, one code path.

Everything is a `transformers` object saved with `save_pretrained` (safetensors) and loaded
with `AutoModelForCausalLM` / `AutoTokenizer`, so a real Hub download and the tiny model
built here are treated the same.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import string
import unicodedata
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models
from transformers.utils import logging as hf_logging
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig,
                          PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast)

from stages.records.artifacts import write_dir
from stages.errors import DataError, ModelError, one_line
from stages.config import ModelConfig, Params, TinyModel

# Loading bars for a 1M-parameter model are noise; our own bars show progress that matters.
hf_logging.disable_progress_bar()

# Plain (non-special) tokens: completions are decoded with skip_special_tokens=True and the
# format reward must still see the tags.
REASONING_TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
# The Thai block's characters (U+0E01..U+0E5B, its unassigned code points left out): builtin-th's
# prompts and demonstrations are Thai.
THAI = "".join(ch for ch in map(chr, range(0x0E01, 0x0E5C)) if unicodedata.name(ch, ""))


def configure_threads(params: Params) -> None:
    torch.set_num_threads(params.threads or max(1, os.cpu_count() or 1))


def resolve_device(params: Params) -> torch.device:
    if params.device == "cuda" and not torch.cuda.is_available():
        raise ModelError("device: 'cuda' requested but no CUDA device is available")
    if params.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(params.device)


def compile_forward(model: PreTrainedModel) -> PreTrainedModel:
    """The forward of `model`'s body (its decoder), compiled by torch.compile (inductor), in place.

    The body, not the whole model: log-probs are read from its hidden states through the LM
    head a chunk at a time (stages/model/logprobs.py), and the model's own forward calls the body
    too, so sampling runs compiled as well. On a small model most of a forward's time is
    launching ~1,000 small ops per step (norms, rotary, activations, their backward); inductor
    fuses them. Shapes are dynamic: one graph serves every batch and sequence length (prefill,
    decode, a minibatch, its backward). Weights and saving are unchanged. A model
    torch.compile cannot handle fails at its first call, as a one-line ModelError.
    """
    try:
        body = model.get_decoder() or model
    except (AttributeError, NotImplementedError, ValueError):
        body = model
    # One graph per kind of call, each a legitimate variant: grad or inference mode, no cache, an
    # empty cache (a prompt) or a filled one (what follows it), the model's own call (sampling) or
    # ours (log-probs), the policy's and the reference's. Past dynamo's default limit of 8 graphs
    # per function it runs the rest eagerly, silently: a compiled run would be an eager one.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    compiled = torch.compile(body.forward, dynamic=True)

    @functools.wraps(body.forward)
    def forward(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as error:
            raise ModelError(f"compile: torch.compile failed on this model ({one_line(error)}); "
                             "set compile: false") from error

    body.forward = forward
    return model


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """`model.gradient_checkpointing`: the model's own, non-reentrant (the variant torch recommends).
    Recent transformers call it activation checkpointing, and warn on the old name."""
    try:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    except ValueError as error:  # transformers: "... does not support gradient checkpointing."
        raise ModelError(f"model.gradient_checkpointing: {one_line(error)}; set it to false") from None


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), as oneDNN sees it."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def compute_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of the model's forwards under `precision`; None: plain fp32.

    auto: bf16 on CUDA, fp32 on CPU. bf16: bf16 on either (on CPU only where it has bf16 units:
    elsewhere it would be emulated, slower than fp32). fp32: fp32 on either.
    """
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if device.type == "cpu" and not cpu_has_bf16():
        raise ModelError("precision: bf16: this CPU has no bf16 units (AVX512-BF16 or AMX), so bf16 would be "
                         "emulated and slower than fp32; use auto or fp32")
    return torch.bfloat16


def dtype_for(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The weights' dtype of a model loaded for inference: bf16 on CUDA unless precision is fp32.
    (On CPU fp32 weights always: bf16 there is autocast, the weights stay fp32.)"""
    return torch.bfloat16 if device.type == "cuda" and precision != "fp32" else torch.float32


def autocast(device: torch.device, precision: str = "auto"):
    """Matmuls in bf16 where `precision` says so, over fp32 master weights (the optimizer needs fp32);
    softmax, log-softmax and the loss stay in fp32 (autocast's own lists)."""
    dtype = compute_dtype(device, precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def build_tokenizer(extra: str = "") -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII plus the reasoning tags, and the
    characters of `extra` (`task_characters`) after them: without any, exactly today's vocabulary.

    Characters, not subwords: a tiny model learns digit-wise arithmetic far more easily.
    """
    specials = [PAD, BOS, EOS, UNK]
    ascii_ = string.printable[:95] + "\n"
    characters = list(ascii_) + [ch for ch in dict.fromkeys(extra) if ch not in ascii_]
    vocab = {token: i for i, token in enumerate(specials + characters)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(t, special=True) for t in specials])
    core.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING_TAGS])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        padding_side="left", model_max_length=None,
    )


def task_characters(source: str) -> str:
    """The characters the tiny model's tokenizer needs past ASCII for `data.source`: Thai for
    builtin-th; none otherwise (the default model's vocabulary and initialisation are unchanged)."""
    return THAI if source == "builtin-th" else ""


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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _read_json(path: Path, where: str) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"{where}: {path.name} is unreadable: {one_line(error)}") from None
    if not isinstance(value, dict):
        raise ModelError(f"{where}: {path.name} must hold a JSON object")
    return value


def check_model_dir(path: Path, trust_remote_code: bool, key: str | None = None) -> None:
    """Refuse, with one line, a directory we must not or cannot load.

    `key` names where the directory came from (`model.path`); an artefact's path names itself.
    """
    where = f"{key}: {path}" if key else str(path)
    if not path.is_dir():
        raise ModelError(f"{where} is not a directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{where} has no config.json")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.glob("*.bin"))
        why = (f"only pickle weights ({pickles[0]}); convert them to safetensors" if pickles
               else "no *.safetensors weights")
        raise ModelError(f"{where} has {why}")
    config = _read_json(config_file, where)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"{where} has no tokenizer files")
    tokenizer_config = path / "tokenizer_config.json"
    # The tokenizer can ask for remote code on its own, with a plain config.json.
    remote = config.get("auto_map") or (tokenizer_config.is_file()
                                        and _read_json(tokenizer_config, where).get("auto_map"))
    if remote and not trust_remote_code:
        raise ModelError(f"{where} needs remote code; set model.trust_remote_code: true to allow it")


def load_tokenizer(path: Path, trust_remote_code: bool = False, key: str | None = None) -> PreTrainedTokenizerBase:
    where = f"{key}: {path}" if key else str(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as error:  # transformers' ways of saying "not loadable"
        raise ModelError(f"{where}: the tokenizer does not load: {type(error).__name__}: {one_line(error)}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ModelError(f"{where}: the tokenizer has no eos token")
    return tokenizer


def load_model(path: Path, cfg: ModelConfig, device: torch.device, dtype: torch.dtype | None = None,
               key: str | None = None) -> PreTrainedModel:
    """Load for inference (bf16 on GPU) unless `dtype` says otherwise (fp32 for training)."""
    check_model_dir(path, cfg.trust_remote_code, key)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=cfg.trust_remote_code, dtype=dtype or dtype_for(device), use_safetensors=True,
        )
    except Exception as error:  # a directory that passed the checks can still hold corrupt weights or config
        where = f"{key}: {path}" if key else str(path)
        raise ModelError(f"{where}: the model does not load: {type(error).__name__}: {one_line(error)}") from None
    return model.to(device)


def load_pretrained(path: Path, cfg: ModelConfig, device: torch.device, key: str | None = None,
                    dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = load_model(path, cfg, device, dtype=dtype, key=key)
    return model, load_tokenizer(path, cfg.trust_remote_code, key)


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a completion: the tokenizer's eos and the model's (chat models have several)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None) if model.generation_config else None
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return sorted(i for i in ids if i is not None)


def prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: str, system: str = "") -> str:
    """The text the policy continues: the chat template when the tokenizer has one (with the
    `system` message first, if any); else the system text, the prompt and a newline."""
    if tokenizer.chat_template:
        messages = [{"role": "system", "content": system}] if system else []
        return tokenizer.apply_chat_template(messages + [{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return (f"{system}\n" if system else "") + prompt + "\n"


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str], system: str = "") -> list[list[int]]:
    texts = [prompt_text(tokenizer, p, system) for p in prompts]
    # A chat template already carries the special tokens it wants.
    return tokenizer(texts, add_special_tokens=not tokenizer.chat_template)["input_ids"]


def tensor_bytes(tensors: Any) -> int:
    """Bytes of every tensor in a (nested) state dict: what saving it needs on disk, about."""
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, dict):
        return sum(tensor_bytes(value) for value in tensors.values())
    if isinstance(tensors, (list, tuple)):
        return sum(tensor_bytes(value) for value in tensors)
    return 0


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path,
               extra: Callable[[Path], None] | None = None, extra_bytes: int = 0,
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """save_pretrained (safetensors) and the tokenizer, and whatever `extra` writes into the
    directory (about `extra_bytes`), in a sibling directory swapped in at the end: never half
    a model, and a full disk is one line."""

    def fill(staging: Path) -> None:
        model.save_pretrained(staging, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(staging)
        if extra is not None:
            extra(staging)

    write_dir(Path(target), fill, needed=lambda: tensor_bytes(state_dict or model.state_dict()) + extra_bytes)


# Where configs of the common architectures keep their context length.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")


def context_length(config: Any) -> tuple[int, str] | None:
    """(the longest sequence the model attends over, the config field saying so), if it says."""
    for name in CONTEXT_KEYS:
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, name
    return None


def check_context(prompt_ids: Sequence[Sequence[int]], labels: Sequence[str], budget: int, budget_key: str,
                  context: int, context_source: str) -> None:
    """Refuse the first prompt that, with `budget` new tokens after it, overflows the context.

    A position past the context is an index error for learned position embeddings and
    silent garbage for rotary ones: either way the run would not mean what it says.
    """
    for label, ids in zip(labels, prompt_ids):
        if len(ids) + budget > context:
            raise DataError(f"{label}: the prompt is {len(ids)} tokens, which with {budget_key}={budget} "
                            f"exceeds the model's context of {context} tokens ({context_source})")


def context_limit(config: Any, cfg: ModelConfig) -> tuple[int, str] | None:
    """The context of a model built from `cfg` (a config object or config.json's dict) and the key to raise it."""
    found = context_length(config)
    if found is None:
        return None
    where = f"{found[1]} in model.path's config.json" if cfg.path else "model.tiny.max_position_embeddings"
    return found[0], where


def model_source(cfg: ModelConfig, root: Path) -> Path | None:
    """`model.path` as a directory (a relative one is relative to the project); None for the tiny model."""
    if not cfg.path:
        return None
    path = Path(cfg.path).expanduser()
    return path if path.is_absolute() else root / path


def planned_tokenizer(cfg: ModelConfig, root: Path,
                      data_source: str = "builtin") -> tuple[PreTrainedTokenizerBase, tuple[int, str] | None]:
    """The tokenizer and context the reference will have, read without loading any weights."""
    source = model_source(cfg, root)
    if source is None:
        return build_tokenizer(task_characters(data_source)), context_limit({"max_position_embeddings": cfg.tiny.max_position_embeddings}, cfg)
    check_model_dir(source, cfg.trust_remote_code, "model.path")
    config = json.loads((source / "config.json").read_text())
    return load_tokenizer(source, cfg.trust_remote_code, "model.path"), context_limit(config, cfg)
