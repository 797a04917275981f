"""One code path for the built-in tiny model and any Hub-shaped directory."""

import json

import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from stages.records.artifacts import Layout
from stages.errors import ModelError
from stages.model.modeling import build_tokenizer, check_model_dir, load_pretrained
from stages.prepare import prepare
from stages.reference import reference

TEXT = "What is 47 + 38?\n<think>7+8=15 4+3+1=8</think><answer>85</answer>"


def test_the_builtin_tokenizer_round_trips_through_autotokenizer(tmp_path):
    build_tokenizer().save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == TEXT  # spaces and newlines survive
    # Reasoning tags are single tokens but not special: skip_special_tokens keeps them.
    assert len(tokenizer("<think>", add_special_tokens=False)["input_ids"]) == 1
    assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == TEXT


def hub_shaped_gpt2(directory):
    """A model the reference stage did not build: GPT-2 layout, its own BPE tokenizer."""
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([TEXT, "What is 12 - 7?", "<answer>5</answer>"] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", unk_token="<unk>")
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_a_hub_shaped_directory_goes_through_reference_and_a_grpo_iteration(tiny_params, tmp_path):
    from flows.train import train

    source = hub_shaped_gpt2(tmp_path / "gpt2-tiny")
    params = tiny_params.model_copy(update={
        "model": tiny_params.model.model_copy(update={"path": str(source)}),
        "grpo": tiny_params.grpo.model_copy(update={"iterations": 1}),
    })
    layout = Layout(tmp_path / "project")
    prepare(params, layout)
    metrics = reference(params, layout)
    assert metrics["sft_steps"] == 0  # used as is
    assert json.loads((layout.reference / "config.json").read_text())["model_type"] == "gpt2"
    train(params, layout)
    rollouts = pd.read_parquet(layout.iteration(1) / "rollouts.parquet")
    assert len(rollouts) == params.rollout.prompts_per_iteration * params.rollout.group_size
    model, _ = load_pretrained(layout.policy, params.model, torch.device("cpu"))
    assert model.config.model_type == "gpt2"


@pytest.fixture
def saved_model(tiny_params, tmp_path):
    source = hub_shaped_gpt2(tmp_path / "model")
    return source


def test_a_directory_with_only_pickle_weights_is_refused(saved_model):
    (saved_model / "model.safetensors").rename(saved_model / "pytorch_model.bin")
    with pytest.raises(ModelError, match="only pickle weights .pytorch_model.bin."):
        check_model_dir(saved_model, trust_remote_code=False)


def test_remote_code_is_refused_unless_trusted(saved_model):
    config = json.loads((saved_model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (saved_model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="needs remote code; set model.trust_remote_code"):
        check_model_dir(saved_model, trust_remote_code=False)


@pytest.mark.parametrize("remove, message", [
    (["tokenizer.json", "tokenizer_config.json"], "has no tokenizer files"),
    (["config.json"], "has no config.json"),
])
def test_an_incomplete_directory_is_named(saved_model, remove, message):
    for name in remove:
        (saved_model / name).unlink()
    with pytest.raises(ModelError, match=message):
        check_model_dir(saved_model, trust_remote_code=False)


def test_a_missing_directory_is_named(tmp_path):
    with pytest.raises(ModelError, match="is not a directory"):
        check_model_dir(tmp_path / "nowhere", trust_remote_code=False)
