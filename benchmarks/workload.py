"""The shape of a user's first real run, built locally (no downloads).

A Llama-architecture directory with Qwen2.5's vocabulary size (151,936 entries: characters
plus entries this text never produces, since the vocabulary's size is what costs), ChatML
turns, tied embeddings, hidden 256 and 4 layers; and GSM8K-style word problems of 150-300
tokens after the template, as a `prompt`/`answer` JSONL file.

    python benchmarks/workload.py DIR [--vocabulary 151936] [--prompts 300]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

QWEN_VOCABULARY = 151_936
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PROBLEMS = [
    ("{name} sold clips to {a} of her friends in April, and then she sold {b} more clips in May than in April. "
     "Each clip costs {c} dollars. How many dollars did {name} earn from the clips she sold in April and May "
     "altogether? Think it through step by step before you answer.", lambda a, b, c: (a + a + b) * c),
    ("{name} earns {a} dollars an hour for babysitting. Yesterday, she did {b} hours of babysitting and then "
     "spent {c} dollars of what she earned on a book for her brother. How many dollars does she have left from "
     "yesterday's babysitting? Show your reasoning, then give the number.", lambda a, b, c: a * b - c),
    ("A bakery made {a} trays of muffins with {b} muffins on each tray. By noon, {name} had packed {c} boxes "
     "of 6 muffins each for a school fair, and the rest were put on the shelf. How many muffins were put on "
     "the shelf? Explain each step of the calculation, then answer.", lambda a, b, c: a * b - 6 * c),
]
NAMES = ["Natalia", "Weng", "Betty", "Julie", "James", "Albert", "Ken", "Alexis"]


def build_tokenizer(vocabulary: int):
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    characters = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {token: i for i, token in enumerate(specials + characters)}
    vocab |= {f"##w{i}": len(vocab) + i for i in range(vocabulary - len(vocab))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(t, special=True) for t in specials])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def model_directory(path: Path, vocabulary: int = QWEN_VOCABULARY, hidden: int = 256, layers: int = 4,
                    seed: int = 0) -> Path:
    """The model a user brings, saved as a Hugging Face directory (made once per path)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").is_file():
        return path
    tokenizer = build_tokenizer(vocabulary)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=2048, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def gsm8k_style_prompts(path: Path, count: int = 300, seed: int = 0) -> Path:
    """Word problems with integer answers, one JSON object per line: {"prompt": ..., "answer": ...}."""
    draw = random.Random(seed)
    with path.open("w") as file:
        for _ in range(count):
            text, solve = draw.choice(PROBLEMS)
            a, b, c = draw.randint(12, 60), draw.randint(2, 12), draw.randint(1, 9)
            file.write(json.dumps({"prompt": text.format(name=draw.choice(NAMES), a=a, b=b, c=c),
                                   "answer": str(solve(a, b, c))}) + "\n")
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--vocabulary", type=int, default=QWEN_VOCABULARY)
    parser.add_argument("--prompts", type=int, default=300)
    args = parser.parse_args()
    args.directory.mkdir(parents=True, exist_ok=True)
    model_directory(args.directory / "model", args.vocabulary)
    gsm8k_style_prompts(args.directory / "prompts.jsonl", args.prompts)
    print(args.directory)
