"""prepare: the prompts, split into train and held-out test → data/prompts/{train,test}.parquet.

Columns: prompt_id, prompt, answer, demonstration. `demonstration` is the completion the
SFT stage imitates, `<think>reasoning</think><answer>answer</answer>` (the reasoning is
empty when a user's file has none).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd

from stages.records.artifacts import Layout, write_parquet
from stages.config import BUILTIN_SOURCES, DataConfig, Params
from stages.errors import DataError, one_line

COLUMNS = ["prompt_id", "prompt", "answer", "demonstration"]

# The built-in task in each language it is asked in (`data.source`: builtin, builtin-th).
QUESTIONS = {
    "en": {"+": "What is {a} + {b}?", "-": "What is {a} - {b}?"},
    "th": {"+": "ผลรวมของ {a} + {b} คืออะไร?", "-": "ผลต่างของ {a} - {b} คืออะไร?"},  # "the sum / difference of"
}
# builtin-th's demonstrations put the column working into words, in English or in Thai: the
# columns (units, tens, ... from the right), "carry 1" and "borrow 1", and a column past those named.
COLUMN_WORDS = {
    "en": (("units", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands", "millions"),
           "carry", "borrow", "column {}"),
    "th": (("หลักหน่วย", "หลักสิบ", "หลักร้อย", "หลักพัน", "หลักหมื่น", "หลักแสน", "หลักล้าน"),
           "ทด", "ยืม", "หลักที่ {}"),
}


def column_steps(a: int, op: str, b: int) -> str:
    """Schoolbook working, units column first: `78 + 55` → `8+5=13 7+5+1=13`.

    Every problem is built from the same few hundred one-digit facts and carries, so what
    GRPO teaches on one training prompt carries over to held-out ones.
    """
    return " ".join(step for step, _ in _column_working(a, op, b))


def worded_steps(a: int, op: str, b: int, language: str) -> str:
    """`column_steps` in words: `78 + 55` → `units 8+5=13 carry 1 tens 7+5+1=13`, or in Thai
    `หลักหน่วย 8+5=13 ทด 1 หลักสิบ 7+5+1=13`. A carry (borrow) is said where the next column takes it."""
    names, carry, borrow, other = COLUMN_WORDS[language]
    columns = _column_working(a, op, b)
    words = []
    for k, (step, carries) in enumerate(columns):
        words.append(f"{names[k] if k < len(names) else other.format(k + 1)} {step}")
        if carries and k + 1 < len(columns):
            words.append(f"{carry if op == '+' else borrow} 1")
    return " ".join(words)


def _column_working(a: int, op: str, b: int) -> list[tuple[str, bool]]:
    """Each column's step, units first, and whether it carries into (borrows from) the next column."""
    steps, carry = [], 0
    while a or b:
        x, y = a % 10, b % 10
        if op == "+":
            total = x + y + carry
            step = f"{x}+{y}{'+1' if carry else ''}={total}"
            carry = total // 10
        else:
            top = x - carry
            borrow = top < y
            step = f"{'1' if borrow else ''}{x}-{y}{'-1' if carry else ''}={top + 10 * borrow - y}"
            carry = int(borrow)
        steps.append((step, bool(carry)))
        a, b = a // 10, b // 10
    return steps


def demonstration(reasoning: str, answer: str) -> str:
    return f"<think>{reasoning}</think><answer>{answer}</answer>"


def arithmetic_problems(cfg: DataConfig, seed: int, language: str = "en") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Distinct `a + b` / `a - b` problems (non-negative results), shuffled by the seed, asked in
    `language` (`QUESTIONS`). In English the working is `column_steps`; in another language it is
    in words (`worded_steps`), in English for `english_share` of the demonstrations, else in that language."""
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
    # Drawn after the English task's draws: every language gets the same problems, split and slips.
    in_english = rng.random(needed) < task.english_share if language != "en" else np.ones(needed, dtype=bool)
    rows = []
    for (a, op, b), slip, english in zip((problems[i] for i in order), slips, in_english):
        result = str(a + b if op == "+" else a - b)
        # The slip: digits written in the order the columns were worked, units first.
        written = result[::-1] if slip else result
        working = (column_steps(a, op, b) if language == "en"
                   else worded_steps(a, op, b, "en" if english else language))
        rows.append({
            "prompt_id": f"{a}{op}{b}",
            "prompt": QUESTIONS[language][op].format(a=a, b=b),
            "answer": result,
            "demonstration": demonstration(working, written),
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


def check_final_answers(answers: pd.Series, path: Path) -> None:
    """A file in GSM8K's format (any answer with `#### final`) must end every answer so: a row
    without one would be scored against its whole worked solution, and never be right."""
    marked = answers.str.contains("####", regex=False)
    if not marked.any():
        return
    finals = answers.str.rpartition("####")[2].str.strip()
    bad = ~marked | (finals == "")
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"data.source: {path} row {row}: 'answer' has no final answer after '####' "
                        f"(GSM8K's format, which {int(marked.sum())} of its {len(answers)} rows use): "
                        f"{one_line(answers.iloc[row], 80)!r}")


def read_user_file(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise DataError(f"data.source: file not found: {path}")
    if not path.is_file():
        raise DataError(f"data.source: {path} is not a file")
    if path.suffix not in (".parquet", ".jsonl", ".json"):
        raise DataError(f"data.source: {path}: expected a .parquet or .jsonl file")
    if path.stat().st_size == 0:
        raise DataError(f"data.source: {path} has no rows (the file is empty)")
    try:
        if path.suffix == ".jsonl":
            return read_jsonl(path)
        if path.suffix == ".json":
            return pd.read_json(path, dtype=False)
        return pd.read_parquet(path)
    except DataError:
        raise
    except Exception as error:  # pyarrow/pandas raise many types for a corrupt file
        raise DataError(f"data.source: {path} is unreadable: {type(error).__name__}: {one_line(error)}") from None


def read_jsonl(path: Path) -> pd.DataFrame:
    """One JSON object per line; a bad line is named by its number (from 1, as editors count)."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"data.source: {path} line {number} is not valid JSON: {error.msg}") from None
            if not isinstance(row, dict):
                raise DataError(f"data.source: {path} line {number} is a JSON {type(row).__name__}, expected an object")
            rows.append(row)
    return pd.DataFrame(rows)


def user_problems(path: Path) -> pd.DataFrame:
    """A user's file as validated problems, in file order (`row N` in messages counts rows from 0)."""
    frame = read_user_file(path).reset_index(drop=True)
    if frame.empty:
        raise DataError(f"data.source: {path} has no rows")
    if "prompt" not in frame.columns and "question" in frame.columns:  # GSM8K's name for it
        frame = frame.rename(columns={"question": "prompt"})
    for column in ("prompt", "answer"):
        if column not in frame.columns:
            columns = ", ".join(map(str, frame.columns))
            also = " (or GSM8K's 'question')" if column == "prompt" else ""
            raise DataError(f"data.source: {path} has no '{column}' column{also} (columns: {columns})")
        missing = frame[column].isna() | (frame[column].astype(str).str.strip() == "")
        if missing.any():
            raise DataError(f"data.source: {path} row {int(np.flatnonzero(missing)[0])}: empty '{column}'")
    not_text = ~frame["prompt"].map(lambda value: isinstance(value, str))
    if not_text.any():
        row = int(np.flatnonzero(not_text)[0])
        raise DataError(f"data.source: {path} row {row}: 'prompt' is a {type(frame['prompt'].iloc[row]).__name__}, "
                        f"expected text")
    if "prompt_id" in frame.columns:
        ids = frame["prompt_id"]
        if ids.isna().any():
            raise DataError(f"data.source: {path} row {int(np.flatnonzero(ids.isna())[0])}: null 'prompt_id'")
        ids = ids.astype(str)
        duplicated = ids.duplicated()
        if duplicated.any():
            row = int(np.flatnonzero(duplicated)[0])
            first = int(np.flatnonzero(ids == ids.iloc[row])[0])
            raise DataError(f"data.source: {path} row {row}: duplicate prompt_id {ids.iloc[row]!r} "
                            f"(first in row {first})")
    else:
        ids = pd.Series([f"row-{i}" for i in range(len(frame))])
    if len(frame) < 2:
        raise DataError(f"data.source: {path} needs at least 2 rows to hold some out for testing")
    check_final_answers(frame["answer"].astype(str), path)
    finals, reasonings = zip(*(split_answer(str(a)) for a in frame["answer"]))
    return pd.DataFrame({
        "prompt_id": ids.to_numpy(),
        "prompt": frame["prompt"].to_numpy(),
        "answer": list(finals),
        "demonstration": [demonstration(r, a) for r, a in zip(reasonings, finals)],
    })


def split_held_out(problems: pd.DataFrame, cfg: DataConfig, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    order = np.random.default_rng(seed).permutation(len(problems))
    n_test = max(1, round(cfg.test_fraction * len(problems)))
    test, train = problems.iloc[order[:n_test]], problems.iloc[order[n_test:]]
    return train.reset_index(drop=True), test.reset_index(drop=True)


def user_source(params: Params, layout: Layout) -> Path:
    """`data.source` as a path (relative to the project), refused where prepare would overwrite it."""
    source = Path(params.data.source).expanduser()
    if not source.is_absolute():
        source = layout.root / source
    outputs = layout.prompts.resolve()
    if outputs == source.resolve() or outputs in source.resolve().parents:
        raise DataError(f"data.source: {source} is inside {layout.prompts}, which prepare rewrites; "
                        f"keep your file elsewhere")
    return source


def check_prompts_fit(problems: pd.DataFrame, labels: list[str], params: Params, root: Path) -> None:
    """Every prompt, with the longest completion budget, fits the context of the model it is for."""
    # Late: torch and transformers take seconds to import, and most bad files are refused without them.
    from stages.errors import ModelError
    from stages.model.modeling import check_context, encode_prompts, planned_tokenizer

    try:
        tokenizer, limit = planned_tokenizer(params.model, root, params.data.source)
    except ModelError:
        return  # the reference stage names what is wrong with model.path
    if limit is None:
        return
    budget_key, budget = max([("rollout.max_new_tokens", params.rollout.max_new_tokens),
                              ("eval.max_new_tokens", params.eval.max_new_tokens)], key=lambda item: item[1])
    check_context(encode_prompts(tokenizer, problems["prompt"].tolist(), params.data.system_prompt), labels, budget,
                  budget_key, *limit)


def read_prompt_split(layout: Layout, split: str) -> pd.DataFrame:
    """data/prompts/{split}.parquet, or one line saying to run `prepare`."""
    path = layout.prompt_split(split)
    if not path.is_file():
        raise DataError(f"{path}: not found; run prepare first")
    try:
        return pd.read_parquet(path)
    except Exception as error:  # a file cut short or overwritten: pyarrow raises many types
        raise DataError(f"{path} is unreadable ({type(error).__name__}: {one_line(error)}); "
                        f"run prepare again") from None


def prepare(params: Params, layout: Layout) -> dict[str, int]:
    """Validate everything first (the file, its rows, their fit in the model's context), then write."""
    targets = {split: layout.prompt_split(split) for split in ("train", "test")}  # inside the run directory
    if params.data.source in BUILTIN_SOURCES:
        train, test = arithmetic_problems(params.data, params.seed, BUILTIN_SOURCES[params.data.source])
        problems = pd.concat([train, test], ignore_index=True)
        labels = [f"data.builtin: prompt_id {pid!r}" for pid in problems["prompt_id"]]
    else:
        source = user_source(params, layout)
        problems = user_problems(source)
        labels = [f"data.source: {source} row {row} (prompt_id {pid!r})"
                  for row, pid in enumerate(problems["prompt_id"])]
    check_prompts_fit(problems, labels, params, layout.root)
    if params.data.source not in BUILTIN_SOURCES:
        train, test = split_held_out(problems, params.data, params.seed)
        if len(train) < params.rollout.prompts_per_iteration:
            raise DataError(f"data.source: {source} leaves {len(train)} training prompts after holding out {len(test)} "
                            f"(data.test_fraction={params.data.test_fraction}), fewer than "
                            f"rollout.prompts_per_iteration={params.rollout.prompts_per_iteration}")
    write_parquet(targets["train"], train)
    write_parquet(targets["test"], test)
    return {"train_prompts": len(train), "test_prompts": len(test)}
