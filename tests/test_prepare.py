"""prepare: the built-in task and a user's file become train/test prompt tables."""

import hashlib
import json

import pandas as pd
import pytest

from stages.records.artifacts import Layout
from stages.errors import DataError
from stages.prepare import arithmetic_problems, column_steps, prepare, worded_steps
from stages.rewards.rules import extract_reasoning, script_share


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


def _digest(train, test):
    tables = [train.to_dict("records"), test.to_dict("records")]
    return hashlib.sha256(json.dumps(tables, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def test_the_english_builtin_task_is_unchanged_by_other_languages(tiny_params):
    # Computed before builtin-th existed: the default run's prompts, demonstrations and draws.
    train, test = arithmetic_problems(tiny_params.data, tiny_params.seed)
    assert train.iloc[:2].to_dict("records") == [
        {"prompt_id": "78+50", "prompt": "What is 78 + 50?", "answer": "128",
         "demonstration": "<think>8+0=8 7+5=12</think><answer>128</answer>"},
        {"prompt_id": "55+72", "prompt": "What is 55 + 72?", "answer": "127",
         "demonstration": "<think>5+2=7 5+7=12</think><answer>721</answer>"}]
    assert _digest(train, test) == "a45197b808b2fdfe295954d5b7db4919d3d2ce7b6c5273e7dfb79c3bc56e068f"
    assert _digest(*arithmetic_problems(tiny_params.data, 1)) == (
        "90382716342f9f188c52f3d5c3967e7c49231983dbc6aefaa1884c53428ac5f2")


def _thai(params):
    return params.model_copy(update={"data": params.data.model_copy(update={"source": "builtin-th"})})


def test_builtin_th_asks_builtins_problems_in_thai_with_working_often_in_english(tiny_params, tmp_path):
    prepare(_thai(tiny_params), Layout(tmp_path / "th"))
    prepare(tiny_params, Layout(tmp_path / "en"))
    thai, english = (pd.concat(_read(Layout(tmp_path / name))) for name in ("th", "en"))
    # The same problems, split, answers and slips as builtin for the same seed.
    for column in ("prompt_id", "answer"):
        assert thai[column].tolist() == english[column].tolist()
    written = lambda frame: frame["demonstration"].str.extract("<answer>(.*)</answer>")[0].tolist()  # noqa: E731
    assert written(thai) == written(english)
    assert thai["answer"].str.fullmatch("[0-9]+").all()
    for row in thai.itertuples():
        a, op, b = row.prompt_id.replace("+", " + ").replace("-", " - ").split()
        assert row.prompt == f"{'ผลรวมของ' if op == '+' else 'ผลต่างของ'} {a} {op} {b} คืออะไร?"
        assert script_share(row.prompt, {"THAI"}) == 1.0
        reasoning = extract_reasoning(row.demonstration)
        assert reasoning in (worded_steps(int(a), op, int(b), "en"), worded_steps(int(a), op, int(b), "th"))
    in_english = thai["demonstration"].map(lambda d: script_share(extract_reasoning(d), {"LATIN"}) == 1.0)
    assert abs(in_english.mean() - tiny_params.data.builtin.english_share) < 0.1
    assert 0 < in_english.mean() < 1


@pytest.mark.parametrize("a, op, b, language, working", [
    (78, "+", 55, "th", "หลักหน่วย 8+5=13 ทด 1 หลักสิบ 7+5+1=13"),  # the carry said where the tens take it
    (78, "+", 55, "en", "units 8+5=13 carry 1 tens 7+5+1=13"),
    (90, "-", 86, "th", "หลักหน่วย 10-6=4 ยืม 1 หลักสิบ 9-8-1=0"),
    (90, "-", 86, "en", "units 10-6=4 borrow 1 tens 9-8-1=0"),
    (78, "-", 55, "en", "units 8-5=3 tens 7-5=2"),
])
def test_the_worded_working_names_each_column_and_carry(a, op, b, language, working):
    assert worded_steps(a, op, b, language) == working


def test_the_tiny_models_vocabulary_has_thai_for_builtin_th_only(tiny_params, tmp_path):
    from stages.model.modeling import planned_tokenizer

    default, _ = planned_tokenizer(tiny_params.model, tmp_path)
    thai, _ = planned_tokenizer(tiny_params.model, tmp_path, "builtin-th")
    assert len(default) == 104  # printable ASCII, newline, 4 specials, 4 tags: the default model's, unchanged
    text = "ผลต่างของ 90 - 86 คืออะไร?\n<think>หลักหน่วย 10-6=4 ยืม 1 หลักสิบ 9-8-1=0</think><answer>4</answer>"
    ids = thai(text, add_special_tokens=False)["input_ids"]
    assert thai.unk_token_id not in ids and thai.decode(ids) == text
    assert default.unk_token_id in default(text, add_special_tokens=False)["input_ids"]
    assert thai("What is 1 + 7?")["input_ids"] == default("What is 1 + 7?")["input_ids"]


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
