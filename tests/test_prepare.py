"""prepare: the built-in task and a user's file become train/test prompt tables."""

import json

import pandas as pd
import pytest

from stages.artifacts import Layout
from stages.errors import DataError
from stages.prepare import column_steps, prepare


def _read(layout):
    return pd.read_parquet(layout.prompt_split("train")), pd.read_parquet(layout.prompt_split("test"))


def test_builtin_task_is_deterministic_disjoint_and_correct(tiny_params, tmp_path):
    first, second = Layout(tmp_path / "a"), Layout(tmp_path / "b")
    prepare(tiny_params, first)
    prepare(tiny_params, second)
    train, test = _read(first)
    pd.testing.assert_frame_equal(train, _read(second)[0])
    assert len(train) == 200 and len(test) == 20
    assert not set(train["prompt"]) & set(test["prompt"])
    row = train.iloc[0]
    a, op, b = row["prompt"].removeprefix("What is ").removesuffix("?").split(" ")
    assert int(row["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    working = column_steps(int(a), op, int(b))
    assert row["demonstration"] in (f"<think>{working}</think><answer>{row['answer']}</answer>",
                                    f"<think>{working}</think><answer>{row['answer'][::-1]}</answer>")


def test_a_share_of_demonstrations_slip_by_reversing_the_answer(tiny_params, tmp_path):
    prepare(tiny_params, Layout(tmp_path))
    train, _ = _read(Layout(tmp_path))
    slipped = train[train["answer"].str.len() > 1].apply(
        lambda row: row["demonstration"].endswith(f"<answer>{row['answer'][::-1]}</answer>")
        and row["answer"] != row["answer"][::-1], axis=1)
    assert abs(slipped.mean() - tiny_params.data.builtin.slip_rate) < 0.15


@pytest.mark.parametrize("a, op, b, working", [
    (78, "+", 55, "8+5=13 7+5+1=13"),  # carry into the tens
    (90, "-", 86, "10-6=4 9-8-1=0"),  # borrow from the tens
    (78, "-", 55, "8-5=3 7-5=2"),
])
def test_the_worked_solution_goes_column_by_column_with_carries(a, op, b, working):
    assert column_steps(a, op, b) == working


def test_a_different_seed_gives_different_problems(tiny_params, tmp_path):
    prepare(tiny_params, Layout(tmp_path / "a"))
    prepare(tiny_params.model_copy(update={"seed": 1}), Layout(tmp_path / "b"))
    assert _read(Layout(tmp_path / "a"))[1]["prompt"].tolist() != _read(Layout(tmp_path / "b"))[1]["prompt"].tolist()


def _with_source(params, source):
    return params.model_copy(update={"data": params.data.model_copy(update={"source": str(source)})})


def test_a_gsm8k_style_jsonl_file_is_split_into_answer_and_reasoning(tiny_params, tmp_path):
    source = tmp_path / "gsm.jsonl"
    rows = [{"prompt": f"Q{i}?", "answer": f"Think {i} times.\n#### {i},000"} for i in range(20)]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = prepare(_with_source(tiny_params, source), Layout(tmp_path))
    train, test = _read(Layout(tmp_path))
    assert counts == {"train_prompts": 18, "test_prompts": 2}
    both = pd.concat([train, test]).set_index("prompt")
    assert both.loc["Q7?", "answer"] == "7000"
    assert both.loc["Q7?", "demonstration"] == "<think>Think 7 times.</think><answer>7000</answer>"
    assert not set(train["prompt_id"]) & set(test["prompt_id"])


@pytest.mark.parametrize("content, message", [
    (None, "file not found"),
    ("", "has no rows"),
    ('{"text": "1+1", "answer": "2"}\n{"text": "1+2", "answer": "3"}\n',
     "has no 'prompt' column \\(or GSM8K's 'question'\\)"),
    ('{"prompt": "1+1", "answer": "2"}\n{"prompt": null, "answer": "3"}\n', "row 1: empty 'prompt'"),
    ('{"prompt_id": "a", "prompt": "1+1", "answer": "2"}\n{"prompt_id": "a", "prompt": "1+2", "answer": "3"}\n',
     "row 1: duplicate prompt_id 'a'"),
    ("not json at all", "line 1 is not valid JSON"),
])
def test_a_bad_data_file_is_named_and_nothing_is_written(tiny_params, tmp_path, content, message):
    source = tmp_path / "data.jsonl"
    if content is not None:
        source.write_text(content)
    layout = Layout(tmp_path / "project")
    with pytest.raises(DataError, match=message):
        prepare(_with_source(tiny_params, source), layout)
    assert not layout.prompts.exists()
