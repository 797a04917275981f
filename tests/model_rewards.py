"""Small reward and judge models, trained here in seconds, saved as Hugging Face directories.

Both learn one preference of the built-in task's completions, the `format` rule's
(`<think>…</think><answer>…</answer>`), from the task's own demonstrations and corruptions of
them: a reward model (`LlamaForSequenceClassification`, one label) regresses it, a judge
(`LlamaForCausalLM`) answers "1" or "0" after `JUDGE_TEMPLATE`. The tests and benchmarks
then check that a run rewarded by them moves the policy where they point.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from stages.params import load_params
from stages.model.modeling import build_tokenizer, task_characters
from stages.prepare import arithmetic_problems
from stages.rewards.rules import format_reward, language

ROOT = Path(__file__).resolve().parents[1]
JUDGE_TEMPLATE = "{prompt}\n{completion}\nformat="


def _corrupted(demonstration: str, rng: random.Random) -> str:
    """A completion the format rule rejects, or one it accepts, drawn like a sampling policy's slips."""
    choice = rng.randrange(6)
    if choice == 0:  # cut short, as a completion that ran out of tokens
        return demonstration[:rng.randrange(1, len(demonstration) - 1)]
    if choice == 1:  # no tags
        return demonstration.replace("<think>", "").replace("</think>", " ").replace("<answer>", "").replace(
            "</answer>", "")
    if choice == 2:  # a tag missing
        tag = rng.choice(["<think>", "</think>", "<answer>", "</answer>"])
        return demonstration.replace(tag, "", 1)
    if choice == 3:  # trailing chatter
        return demonstration + rng.choice(["1", " 2+2", "<answer>", "="])
    if choice == 4:  # shuffled characters
        chars = list(demonstration)
        rng.shuffle(chars)
        return "".join(chars)
    return demonstration  # well formed (with another answer)


def examples(count: int, seed: int) -> list[tuple[str, str, float]]:
    """(prompt, completion, format score): half demonstrations, half corruptions."""
    params = load_params(ROOT / "params.yaml")
    problems, _ = arithmetic_problems(params.data, seed)
    rng = random.Random(seed)
    rows = []
    for n in range(count):
        problem = problems.iloc[n % len(problems)]
        completion = problem["demonstration"] if n % 2 else _corrupted(problem["demonstration"], rng)
        rows.append((problem["prompt"], completion, format_reward([problem["prompt"]], [completion])[0]))
    return rows


def _config(tokenizer, **extra) -> LlamaConfig:
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, **extra)


def thai_examples(count: int, seed: int) -> list[tuple[str, str, float]]:
    """builtin-th's (prompt, demonstration, share of the reasoning in Thai script): its
    demonstrations reason in English (data.builtin.english_share of them) or in Thai."""
    params = load_params(ROOT / "params.yaml")
    problems, _ = arithmetic_problems(params.data, seed, language="th")
    rows = problems.iloc[[n % len(problems) for n in range(count)]]
    return [(p, d, language([p], [d], target_language="th")[0]) for p, d in zip(rows["prompt"], rows["demonstration"])]


def build_format_reward_model(target: Path, steps: int = 300, seed: int = 0) -> Path:
    """A reward model scoring ~1 for a well-formed completion, ~0 otherwise (its logit regresses the rule)."""
    return build_reward_model(target, examples(2048, seed), "builtin", steps, seed)


def build_thai_reward_model(target: Path, steps: int = 300, seed: int = 0) -> Path:
    """A reward model for builtin-th scoring ~1 for reasoning worded in Thai, ~0 for English."""
    return build_reward_model(target, thai_examples(2048, seed), "builtin-th", steps, seed)


def build_reward_model(target: Path, data: list[tuple[str, str, float]], source: str, steps: int, seed: int) -> Path:
    """A LlamaForSequenceClassification (one label) regressing `data`'s (prompt, completion, score)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(task_characters(source))
    tokenizer.padding_side = "right"
    model = LlamaForSequenceClassification(_config(tokenizer, num_labels=1))

    def loss(batch):
        encoded = tokenizer([f"{p}\n{c}" for p, c, _ in batch], return_tensors="pt", padding=True)
        return torch.nn.functional.mse_loss(model(**encoded).logits[:, 0], torch.tensor([s for *_, s in batch]))

    return _fit(model, tokenizer, data, loss, steps, seed, target)


def build_format_judge(target: Path, steps: int = 300, seed: int = 0) -> Path:
    """A causal LM that answers JUDGE_TEMPLATE with "1" for a well-formed completion, "0" otherwise."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(task_characters("builtin"))
    model = LlamaForCausalLM(_config(tokenizer))
    data = examples(2048, seed)
    digits = {1.0: tokenizer.convert_tokens_to_ids("1"), 0.0: tokenizer.convert_tokens_to_ids("0")}
    tokenizer.padding_side = "left"

    def loss(batch):
        encoded = tokenizer([JUDGE_TEMPLATE.format(prompt=p, completion=c) + "\n" for p, c, _ in batch],
                            return_tensors="pt", padding=True)
        logits = model(**encoded).logits[:, -1]  # the reply's first token
        return torch.nn.functional.cross_entropy(logits, torch.tensor([digits[s] for *_, s in batch]))

    return _fit(model, tokenizer, data, loss, steps, seed, target)


def _fit(model, tokenizer, data, loss, steps: int, seed: int, target: Path) -> Path:
    """`steps` AdamW steps on batches of 32 drawn from `data`, then the model saved at `target`."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        loss(rng.sample(data, 32)).backward()
        optimizer.step()
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target
