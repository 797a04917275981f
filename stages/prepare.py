"""prepare: the prompts, split into train and held-out test → data/prompts/{train,test}.parquet.

Columns: prompt_id, prompt, answer, demonstration. `demonstration` is the completion the
SFT stage imitates, `<think>reasoning</think><answer>answer</answer>` (the reasoning is
empty when a user's file has none).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd

from stages.artifacts import Layout, write_parquet
from stages.config import DataConfig, Params
from stages.errors import DataError

COLUMNS = ["prompt_id", "prompt", "answer", "demonstration"]


def column_steps(a: int, op: str, b: int) -> str:
    """Schoolbook working, units column first: `78 + 55` → `8+5=13 7+5+1=13`.

    Every problem is built from the same few hundred one-digit facts and carries, so what
    GRPO teaches on one training prompt carries over to held-out ones.
    """
    steps, carry = [], 0
    while a or b:
        x, y = a % 10, b % 10
        if op == "+":
            total = x + y + carry
            steps.append(f"{x}+{y}{'+1' if carry else ''}={total}")
            carry = total // 10
        else:
            top = x - carry
            borrow = top < y
            steps.append(f"{'1' if borrow else ''}{x}-{y}{'-1' if carry else ''}={top + 10 * borrow - y}")
            carry = int(borrow)
        a, b = a // 10, b // 10
    return " ".join(steps)


def demonstration(reasoning: str, answer: str) -> str:
    return f"<think>{reasoning}</think><answer>{answer}</answer>"


def arithmetic_problems(cfg: DataConfig, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Distinct `a + b` / `a - b` problems (non-negative results), shuffled by the seed."""
    task = cfg.builtin
    operands = range(task.min_operand, task.max_operand + 1)
    problems = [(a, op, b) for a, b in itertools.product(operands, operands) for op in "+-"
                if op == "+" or a >= b]
    needed = task.train_size + task.test_size
    if needed > len(problems):
        raise DataError(
            f"data.builtin: train_size + test_size = {needed} exceeds the "
            f"{len(problems)} distinct problems in [{task.min_operand}, {task.max_operand}]"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(problems))[:needed]
    slips = rng.random(needed) < task.slip_rate
    rows = []
    for (a, op, b), slip in zip((problems[i] for i in order), slips):
        result = str(a + b if op == "+" else a - b)
        # The slip: digits written in the order the columns were worked, units first.
        written = result[::-1] if slip else result
        rows.append({
            "prompt_id": f"{a}{op}{b}",
            "prompt": f"What is {a} {op} {b}?",
            "answer": result,
            "demonstration": demonstration(column_steps(a, op, b), written),
        })
    frame = pd.DataFrame(rows, columns=COLUMNS)
    # Test first, so growing train_size never moves a problem from test into train.
    return frame.iloc[task.test_size:].reset_index(drop=True), frame.iloc[:task.test_size].reset_index(drop=True)


def split_answer(answer: str) -> tuple[str, str]:
    """GSM8K writes `reasoning #### 72`: return (final answer, reasoning)."""
    reasoning, sep, final = answer.rpartition("####")
    if not sep:
        return answer.strip(), ""
    return final.strip().replace(",", ""), reasoning.strip()


def read_user_file(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"data.source: file not found: {path}")
    try:
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
        elif path.suffix in (".jsonl", ".json"):
            frame = pd.read_json(path, lines=path.suffix == ".jsonl", dtype=False)
        else:
            raise DataError(f"data.source: {path}: expected a .parquet or .jsonl file")
    except DataError:
        raise
    except Exception as error:  # pyarrow/pandas raise many types for a corrupt file
        raise DataError(f"data.source: {path} is unreadable: {str(error).splitlines()[0]}") from None
    return frame


def user_problems(path: Path, cfg: DataConfig, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    frame = read_user_file(path)
    if frame.empty:
        raise DataError(f"data.source: {path} has no rows")
    for column in ("prompt", "answer"):
        if column not in frame.columns:
            raise DataError(f"data.source: {path} has no '{column}' column")
        missing = frame[column].isna() | (frame[column].astype(str).str.strip() == "")
        if missing.any():
            raise DataError(f"data.source: {path} row {int(np.flatnonzero(missing)[0])}: empty '{column}'")
    if "prompt_id" in frame.columns:
        ids = frame["prompt_id"]
        if ids.isna().any():
            raise DataError(f"data.source: {path} row {int(np.flatnonzero(ids.isna())[0])}: null 'prompt_id'")
        ids = ids.astype(str)
        duplicated = ids.duplicated()
        if duplicated.any():
            row = int(np.flatnonzero(duplicated)[0])
            raise DataError(f"data.source: {path} row {row}: duplicate prompt_id {ids.iloc[row]!r}")
    else:
        ids = pd.Series([f"row-{i}" for i in range(len(frame))])
    finals, reasonings = zip(*(split_answer(str(a)) for a in frame["answer"]))
    problems = pd.DataFrame({
        "prompt_id": ids.to_numpy(),
        "prompt": frame["prompt"].astype(str).to_numpy(),
        "answer": list(finals),
        "demonstration": [demonstration(r, a) for r, a in zip(reasonings, finals)],
    })
    if len(problems) < 2:
        raise DataError(f"data.source: {path} needs at least 2 rows to hold some out for testing")
    order = np.random.default_rng(seed).permutation(len(problems))
    n_test = max(1, round(cfg.test_fraction * len(problems)))
    test, train = problems.iloc[order[:n_test]], problems.iloc[order[n_test:]]
    return train.reset_index(drop=True), test.reset_index(drop=True)


def prepare(params: Params, layout: Layout) -> dict[str, int]:
    if params.data.source == "builtin":
        train, test = arithmetic_problems(params.data, params.seed)
    else:
        source = Path(params.data.source)
        if not source.is_absolute():
            source = layout.root / source
        train, test = user_problems(source, params.data, params.seed)
    write_parquet(layout.prompt_split("train"), train)
    write_parquet(layout.prompt_split("test"), test)
    return {"train_prompts": len(train), "test_prompts": len(test)}
