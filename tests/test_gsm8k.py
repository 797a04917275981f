"""The GSM8K recipe (benchmarks/recipes/gsm8k.yaml): GSM8K as users have it (`question`,
`answer` ending in `#### 72`) on a local chat model, the system prompt through its template,
the budgets checked against its context."""

import json
import sys

import pandas as pd
import pytest
from transformers import AutoTokenizer

from conftest import ROOT
from stages.records.artifacts import Layout
from stages.params import load_params
from stages.errors import DataError
from stages.model.modeling import encode_prompts
from stages.prepare import prepare

sys.path.insert(0, str(ROOT / "benchmarks"))
from workload import model_directory  # noqa: E402

RECIPE = ROOT / "benchmarks" / "recipes" / "gsm8k.yaml"
GSM8K = [{"question": f"Natalia sold clips to {n} of her friends in April, and then she sold half as many clips in "
                      f"May. How many clips did Natalia sell altogether in April and May?",
          "answer": f"Natalia sold {n}/2 = <<{n}/2={n // 2}>>{n // 2} clips in May.\n"
                    f"Natalia sold {n}+{n // 2} = <<{n}+{n // 2}={n + n // 2}>>{n + n // 2} clips altogether.\n"
                    f"#### {n + n // 2:,}"} for n in range(2000, 2060, 2)]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("gsm8k")
    (root / "gsm8k").mkdir()
    (root / "gsm8k" / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in GSM8K))
    model_directory(root / "models" / "Qwen2.5-0.5B-Instruct", vocabulary=2_000, hidden=32, layers=1)
    return root


def test_the_recipe_reads_gsm8k_as_users_have_it_and_applies_the_system_prompt(project):
    params = load_params(RECIPE, ["rollout.prompts_per_iteration=8"])  # a 30-row file
    layout = Layout(project)
    prepare(params, layout)
    train = pd.read_parquet(layout.prompt_split("train"))
    test = pd.read_parquet(layout.prompt_split("test"))
    assert len(train) + len(test) == len(GSM8K)
    row = train.iloc[0]
    n = int(row["prompt"].split("clips to ")[1].split(" ")[0])
    assert row["answer"] == str(n + n // 2)  # the number after ####, its thousands comma dropped
    assert row["demonstration"].startswith("<think>Natalia sold ")

    tokenizer = AutoTokenizer.from_pretrained(project / params.model.path)
    text = tokenizer.decode(encode_prompts(tokenizer, [row["prompt"]], params.data.system_prompt)[0])
    assert text.startswith(f"<|im_start|>system\n{params.data.system_prompt}<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_a_budget_past_the_models_context_is_refused_naming_the_row_and_the_key(project, tmp_path):
    layout = Layout(tmp_path)
    (tmp_path / "gsm8k").symlink_to(project / "gsm8k")
    (tmp_path / "models").symlink_to(project / "models")
    params = load_params(RECIPE, ["rollout.prompts_per_iteration=8", "rollout.max_new_tokens=1900",
                                  "eval.max_new_tokens=64"])
    with pytest.raises(DataError) as refused:
        prepare(params, layout)
    message = str(refused.value)
    assert "gsm8k/train.jsonl row 0" in message and "rollout.max_new_tokens=1900" in message, message
    assert not layout.prompts.exists()
