"""Bad input: every mistake a user can make is refused the same way.

One line on stderr, `error: ...`, naming the culprit (the params key, the file, the row or
column, the prompt_id and sample); a non-zero exit; and every file of the previous run and
of the user's own inputs byte-identical afterwards, with nothing new beside them.

Each case starts from a copy of one real previous run, built once with the real stages:
data/, models/reference/, runs/, models/policy/, metrics/, plus the user's prompts file,
model directory and reward module. How a case trips:
- process: `python -m flows.cli ...` in the project, as a user runs it. Used for the
  issue's own list of bad params, data and model inputs: a process costs a second (five
  when it imports torch), so the other CLI cases use
- app: the same typer app, invoked in this process (same exit code, same stderr);
- stage: a train-stage check (rewards, groups, rollouts) through the stage function the
  Prefect task calls, on the previous run's iteration files; the error is what the CLI prints.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from flows.cli import app
from stages.advantage import advantage
from stages.records.artifacts import Layout
from stages.params import load_params
from stages.config import set_key
from stages.errors import DataError, GroupError, PipelineError, RewardError, RolloutError
from stages.evaluate import evaluate
from stages.records.manifest import read_manifest, training_fingerprint, write_manifest
from stages.model.modeling import load_model, load_tokenizer, save_model
from stages.prepare import prepare
from stages.reference import reference
from stages.records.report import write_training_metrics
from stages import rollout as rollout_stage
from stages.reward import reward
from stages.update import TrainState, make_optimizer, update

from conftest import ROOT, TINY, start_prefect_server, stop

STATE = Path(tempfile.mkdtemp(prefix="grpo-bad-input-"))  # Prefect/MLflow homes: never inside a workspace (under the session's TMPDIR)

USER_REWARDS = '''
import numpy as np

NOT_A_FUNCTION = 3

def fails_on_sample_2(prompts, completions, sample, **_):
    return [1 / 0 if s == 2 else 1.0 for s in sample]

def returns_nan(prompts, completions, **_):
    return [float("nan")] * len(completions)

def returns_inf(prompts, completions, **_):
    return [1.0] * (len(completions) - 1) + [float("inf")]

def returns_too_few(prompts, completions, **_):
    return [1.0] * (len(completions) - 1)

def returns_too_many(prompts, completions, **_):
    return [1.0] * (len(completions) + 1)

def returns_matrix(prompts, completions, **_):
    return np.ones((len(completions), 2))

def returns_a_number(prompts, completions, **_):
    return 1.0

def returns_nothing(prompts, completions, **_):
    pass

def returns_text(prompts, completions, **_):
    return ["1.0"] * len(completions)
'''


def _params_yaml(extra: list[str]) -> str:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for override in [*TINY, *extra]:
        key, _, value = override.partition("=")
        set_key(raw, key, yaml.safe_load(value))
    return yaml.safe_dump(raw, sort_keys=False)


def write(relative: str, content: str | bytes) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        path = ws / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def rows(relative: str, table: list[dict]) -> Callable[[Path], None]:
    return write(relative, "".join(json.dumps(row) + "\n" for row in table))


def good(count: int = 12) -> list[dict]:
    return [{"prompt_id": f"p{i}", "prompt": f"What is {i} + 2?", "answer": str(i + 2)} for i in range(count)]


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory) -> Path:
    """A project after one complete tiny run, with the user's own inputs beside it."""
    root = tmp_path_factory.mktemp("previous-run")
    (root / "params.yaml").write_text(_params_yaml(["grpo.iterations=1"]))
    params, layout = load_params(root / "params.yaml"), Layout(root)
    prepare(params, layout)
    reference(params, layout)
    # One GRPO iteration through the stages, in flows/train.py's order (no Prefect, no MLflow).
    device = torch.device("cpu")
    model = load_model(layout.reference, params.model, device, dtype=torch.float32).eval()
    state = TrainState(model, load_tokenizer(layout.reference), make_optimizer(model, params))
    frozen = load_model(layout.reference, params.model, device).eval()
    fingerprint = training_fingerprint(params, layout)
    metrics = rollout_stage.rollout(params, layout, 1, state.model, state.tokenizer)
    metrics |= reward(params.reward, layout, 1, params.rollout.group_size)
    metrics |= advantage(params.grpo, params.rollout.group_size, layout, 1)
    metrics |= update(params, layout, 1, state, frozen)
    write_manifest(layout, 1, fingerprint, fingerprint["reference"], metrics)
    write_training_metrics(layout, [read_manifest(layout, 1)])
    save_model(state.model, state.tokenizer, layout.policy)
    evaluate(params, layout)
    # The user's inputs: a prompts file, a Hub-shaped model directory, a module of rewards.
    rows("user/prompts.jsonl", good(30))(root)
    shutil.copytree(layout.reference, root / "user" / "model")
    (root / "my_rewards.py").write_text(USER_REWARDS)
    (root / "broken_rewards.py").write_text("raise RuntimeError('half-written module')\n")
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` → its content digest ("dir" for a directory, the target for a link).

    Except runs/.lock: every command that may write takes the project's run lock, and the lock
    file names its latest holder (stages/records/runlock.py); it is not an artefact.
    """
    state = {}
    for folder, dirs, files in os.walk(root):  # never follows a symlinked directory
        for name in dirs + files:
            path = Path(folder, name)
            rel = str(path.relative_to(root))
            if path.name == ".lock" and path.parent.name == "runs":
                continue
            if path.is_symlink():
                state[rel] = f"link -> {os.readlink(path)}"
            elif path.is_dir():
                state[rel] = "dir"
            else:
                state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


# ----------------------------------------------------------------------------- the cases


@dataclass
class Case:
    """One bad input: `setup` makes it in the workspace, the command or `call` trips on it."""

    via: str  # process | app | stage (see the module docstring)
    expect: list[str]  # each is in the error line
    stage: str = "prepare"  # the CLI command
    overrides: list[str] = field(default_factory=list)  # --set key=value
    args: list[str] = field(default_factory=list)  # instead of --params params.yaml --root .
    setup: Callable[[Path], None] | None = None
    call: Callable[[Path, pytest.MonkeyPatch], None] | None = None
    error: type[PipelineError] = PipelineError  # what `call` must raise


def edit_params(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        raw = yaml.safe_load((ws / "params.yaml").read_text())
        change(raw)
        (ws / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return setup


def model_dir(change: Callable[[Path], None]) -> Callable[[Path], None]:
    return lambda ws: change(ws / "user" / "model")


def edit_json(name: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def setup(folder: Path) -> None:
        config = json.loads((folder / name).read_text())
        change(config)
        (folder / name).write_text(json.dumps(config))
    return setup


def truncated_parquet(ws: Path) -> None:
    whole = (ws / "data" / "prompts" / "train.parquet").read_bytes()
    (ws / "user" / "cut.parquet").write_bytes(whole[: len(whole) // 2])


def empty_parquet(ws: Path) -> None:
    pd.DataFrame({"prompt": pd.Series([], dtype=str), "answer": pd.Series([], dtype=str)}).to_parquet(
        ws / "user" / "none.parquet")


def prompts_elsewhere(ws: Path) -> None:
    """data/prompts is a symlink to a directory outside the project (the previous files move there)."""
    outside = ws.parent / "elsewhere"
    outside.mkdir()
    shutil.move(ws / "data" / "prompts", outside / "prompts")
    (ws / "data" / "prompts").symlink_to(outside / "prompts", target_is_directory=True)


# In-process stage calls for the train-stage checks, on the previous run's iteration 1.

def _params(ws: Path, overrides: list[str] = ()):
    return load_params(ws / "params.yaml", list(overrides))


def score_with(name: str) -> Callable[[Path, pytest.MonkeyPatch], None]:
    """Iteration 1's reward stage with the user's reward `name` (the case's overrides say the same to dvc repro)."""
    def call(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        params = _params(ws, custom(f"my_rewards:{name}"))
        reward(params.reward, Layout(ws), 1, params.rollout.group_size)
    return call


def rollouts_file(ws: Path) -> Path:
    return ws / "runs" / "iterations" / "0001" / "rollouts.parquet"


def tamper_rollouts(change: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        frame = pd.read_parquet(rollouts_file(ws))
        change(frame).to_parquet(rollouts_file(ws), index=False)
    return setup


def score_iteration_1(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = _params(ws)
    reward(params.reward, Layout(ws), 1, params.rollout.group_size)


def advantage_iteration_1(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = _params(ws)
    advantage(params.grpo, params.rollout.group_size, Layout(ws), 1)


def drop_last_row_of_rewards(ws: Path) -> None:
    path = ws / "runs" / "iterations" / "0001" / "rewards.parquet"
    pd.read_parquet(path).iloc[:-1].to_parquet(path, index=False)


def rollout_iteration_2(overrides: list[str] = (), generated: Callable[[pd.DataFrame], pd.DataFrame] | None = None):
    """Iteration 2's rollout stage; `generated` replaces sampling by a doctored copy of iteration 1's rollouts."""
    def call(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        params, layout = _params(ws, overrides), Layout(ws)
        if generated is not None:
            previous = pd.read_parquet(rollouts_file(ws))
            monkeypatch.setattr(rollout_stage, "generate_rollouts", lambda *args, **kwargs: generated(previous.copy()))
        model = load_model(layout.reference, params.model, torch.device("cpu")).eval()
        rollout_stage.rollout(params, layout, 2, model, load_tokenizer(layout.reference))
    return call


def relabel(frame: pd.DataFrame, row: int, **values) -> pd.DataFrame:
    for column, value in values.items():
        frame.at[row, column] = value
    return frame


PROCESS, APP, STAGE = "process", "app", "stage"
MODEL = ["model.path=user/model"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
ITERATION_1 = "runs/iterations/0001/rollouts.parquet"


def custom(name: str, weight: bool = True) -> list[str]:
    return [f"reward.custom=[{name}]"] + ([f"reward.weights.{name.rsplit(':', 1)[-1]}=1"] if weight else [])


def source(name: str) -> list[str]:
    return [f"data.source=user/{name}"]


def bad_file(via: str, name: str, problem: str, setup: Callable[[Path], None] | None = None,
             table: list[dict] | None = None, extra: list[str] = ()) -> Case:
    """prepare on user/`name` (made by `setup`, or holding `table` as JSONL) fails with `problem` after its path."""
    return Case(via, ["data.source: ", f"/user/{name}{problem}"], overrides=[*source(name), *extra],
                setup=setup or rows(f"user/{name}", table))


CASES = {
    # --- the params file and its keys: every command validates all of params.yaml first
    "params-missing-file": Case(PROCESS, ["params: file not found: nope.yaml"],
                                args=["--params", "nope.yaml", "--root", "."]),
    "params-is-a-directory": Case(PROCESS, ["params: cannot read user: Is a directory"],
                                  args=["--params", "user", "--root", "."]),
    "params-yaml-syntax": Case(PROCESS, ["params: params.yaml is not valid YAML: line 2 column 12: mapping values"],
                               setup=write("params.yaml", "seed: 0\ndevice: cpu: x\n")),
    "params-not-a-mapping": Case(PROCESS, ["params: params.yaml must hold a mapping of keys, not a list"],
                                 setup=write("params.yaml", "- seed\n- device\n")),
    "params-missing-key": Case(APP, ["params: seed: missing key"], setup=edit_params(lambda raw: raw.pop("seed"))),
    "params-unknown-key": Case(PROCESS, ["params: grpo.betta: unknown key"], overrides=["grpo.betta=0.1"]),
    "params-unknown-section": Case(APP, ["params: optimizer: unknown key"],
                                   setup=edit_params(lambda raw: raw.update(optimizer={"lr": 1}))),
    "params-ill-typed": Case(PROCESS, ["params: grpo.iterations: Input should be a valid integer"],
                             overrides=["grpo.iterations=many"]),
    "params-boolean-for-a-number": Case(APP, ["params: sft.warmup_steps: expected a number, got true"],
                                        overrides=["sft.warmup_steps=yes"]),
    "params-section-ill-typed": Case(APP, ["params: rollout: Input should be a valid dictionary"],
                                     setup=edit_params(lambda raw: raw.update(rollout=8))),
    "params-G<2": Case(PROCESS, ["params: rollout.group_size: Input should be greater than or equal to 2"],
                       overrides=["rollout.group_size=1"]),
    "params-eps_low<=0": Case(PROCESS, ["params: grpo.eps_low: Input should be greater than 0"],
                              overrides=["grpo.eps_low=0"]),
    "params-eps_high<=0": Case(APP, ["params: grpo.eps_high: Input should be greater than 0"],
                               overrides=["grpo.eps_high=-0.1"]),
    "params-negative-beta": Case(PROCESS, ["params: grpo.beta: Input should be greater than or equal to 0"],
                                 overrides=["grpo.beta=-0.01"]),
    "params-lr<=0": Case(PROCESS, ["params: grpo.lr: Input should be greater than 0"], overrides=["grpo.lr=0"]),
    "params-sft-lr<=0": Case(APP, ["params: sft.lr: Input should be greater than 0"], overrides=["sft.lr=-1"]),
    "params-lr-nan": Case(APP, ["params: grpo.lr: Input should be a finite number"], overrides=["grpo.lr=.nan"]),
    "params-temperature-inf": Case(APP, ["params: rollout.temperature: Input should be a finite number"],
                                   overrides=["rollout.temperature=.inf"]),
    "params-top_p>1": Case(APP, ["params: rollout.top_p: Input should be less than or equal to 1"],
                           overrides=["rollout.top_p=1.5"]),
    "params-unknown-loss_agg": Case(
        PROCESS, ["params: grpo.loss_agg: Input should be 'grpo', 'bnpo', 'dapo' or 'dr_grpo'"],
        overrides=["grpo.loss_agg=mean"]),
    "params-unknown-scale_rewards": Case(
        PROCESS, ["params: grpo.scale_rewards: Input should be 'group', 'batch' or 'none'"],
        overrides=["grpo.scale_rewards=max"]),
    "params-minibatch-not-dividing-the-batch": Case(
        PROCESS, ["params: grpo.minibatch_size=6 must divide rollout.prompts_per_iteration * rollout.group_size = 16"],
        overrides=["grpo.minibatch_size=6"]),
    "params-micro-batch-not-dividing-the-minibatch": Case(
        PROCESS, ["params: grpo.micro_batch_size=3 must divide grpo.minibatch_size=8"],
        overrides=["grpo.micro_batch_size=3"]),
    "params-prompts-per-iteration-over-train-size": Case(
        APP, ["params: rollout.prompts_per_iteration=400 exceeds data.builtin.train_size=200"],
        overrides=["rollout.prompts_per_iteration=400"]),
    "params-test_fraction-out-of-range": Case(APP, ["params: data.test_fraction: Input should be less than 1"],
                                              overrides=["data.test_fraction=1"]),
    "params-override-not-key=value": Case(APP, ["params: override 'grpo.beta' is not key=value"],
                                          overrides=["grpo.beta"]),
    "params-override-bad-yaml": Case(APP, ["params: grpo.beta: override value '[0' is not valid YAML"],
                                     overrides=["grpo.beta=[0"]),
    "params-override-into-a-value": Case(APP, ["params: grpo.beta.x: beta is not a section"],
                                         overrides=["grpo.beta.x=1"]),
    "params-cuda-without-a-gpu": Case(APP, ["device: 'cuda' requested but no CUDA device is available"],
                                      stage="reference", overrides=["device=cuda"]),
    "params-unknown-reward": Case(APP, ["params: reward.weights.accuracyy: no such reward (known: accuracy,"],
                                  overrides=["reward.weights.accuracyy=1.0"]),
    # --- a reward's dotted path: imported while params load, before a stage writes or discards anything
    "reward-module-missing": Case(
        PROCESS, ["params: reward.custom: cannot import 'no_such_module:score': ModuleNotFoundError"],
        overrides=custom("no_such_module:score")),
    "reward-function-missing": Case(APP, ["params: reward.custom: cannot import 'my_rewards:missing': AttributeError"],
                                    overrides=custom("my_rewards:missing")),
    "reward-module-raises-on-import": Case(
        APP, ["params: reward.custom: cannot import 'broken_rewards:score': RuntimeError: half-written module"],
        overrides=custom("broken_rewards:score")),
    "reward-not-callable": Case(APP, ["params: reward.custom: 'my_rewards:NOT_A_FUNCTION' is not callable"],
                                overrides=custom("my_rewards:NOT_A_FUNCTION")),
    "reward-not-a-dotted-path": Case(APP, ["params: reward.custom: 'score' is not 'package.module:function'"],
                                     overrides=custom("score")),
    "reward-without-weight": Case(APP, ["params: reward.custom: 'fails_on_sample_2' has no weight in reward.weights"],
                                  overrides=custom("my_rewards:fails_on_sample_2", weight=False)),
    "reward-named-like-a-builtin": Case(
        APP, ["params: reward.custom: 'stages.rewards.rules:accuracy' is named 'accuracy', like another reward"],
        overrides=custom("stages.rewards.rules:accuracy", weight=False)),
    # --- the data file (data.source): the error names it, then the row or column
    "data-missing": Case(PROCESS, ["data.source: file not found: ", "/user/nope.jsonl"],
                         overrides=source("nope.jsonl")),
    "data-not-a-file": Case(APP, ["data.source: ", "/user is not a file"], overrides=["data.source=user"]),
    "data-wrong-format": bad_file(APP, "prompts.csv", ": expected a .parquet or .jsonl file",
                                  setup=write("user/prompts.csv", "prompt,answer\n1+1,2\n")),
    "data-empty": bad_file(PROCESS, "empty.jsonl", " has no rows (the file is empty)",
                           setup=write("user/empty.jsonl", "")),
    "data-no-rows": bad_file(APP, "none.parquet", " has no rows", setup=empty_parquet),
    "data-unreadable": bad_file(PROCESS, "garbage.parquet", " is unreadable: ArrowInvalid",
                                setup=write("user/garbage.parquet", b"PAR1 this is not parquet \x00\xff")),
    "data-truncated-parquet": bad_file(APP, "cut.parquet", " is unreadable", setup=truncated_parquet),
    "data-not-utf8": bad_file(APP, "latin1.jsonl", " is unreadable: UnicodeDecodeError",
                              setup=write("user/latin1.jsonl", '{"prompt": "caf\xe9", "answer": 1}'.encode("latin-1"))),
    "data-bad-json-line": bad_file(APP, "bad.jsonl", " line 3 is not valid JSON",
                                   setup=write("user/bad.jsonl", '{"prompt": "a", "answer": 1}\n\n{"prompt": x}\n')),
    "data-line-not-an-object": bad_file(APP, "list.jsonl", " line 2 is a JSON list, expected an object",
                                        setup=write("user/list.jsonl", '{"prompt": "a", "answer": "1"}\n["b", "2"]\n')),
    "data-no-prompt-column": bad_file(PROCESS, "q.jsonl",
                                      " has no 'prompt' column (or GSM8K's 'question') (columns: text, answer)",
                                      table=[{"text": "1+1", "answer": "2"}] * 3),
    "data-no-answer-column": bad_file(PROCESS, "a.jsonl", " has no 'answer' column",
                                      table=[{"prompt": "1+1", "solution": "2"}] * 3),
    "data-null-prompt": bad_file(APP, "n.jsonl", " row 1: empty 'prompt'",
                                 table=[*good(1), {"prompt": None, "answer": "3"}]),
    "data-empty-answer": bad_file(APP, "n.jsonl", " row 2: empty 'answer'",
                                  table=[*good(2), {"prompt": "1+5", "answer": " "}]),
    "data-prompt-not-text": bad_file(APP, "chat.jsonl", " row 1: 'prompt' is a list, expected text",
                                     table=[*good(1), {"prompt": [{"role": "user", "content": "1+1"}], "answer": "2"}]),
    "data-null-ids": bad_file(PROCESS, "ids.jsonl", " row 3: null 'prompt_id'",
                              table=[*good(3), {"prompt_id": None, "prompt": "1+1", "answer": "2"}]),
    "data-duplicate-ids": bad_file(PROCESS, "ids.jsonl", " row 4: duplicate prompt_id 'p1' (first in row 1)",
                                   table=[*good(4), {"prompt_id": "p1", "prompt": "1+9", "answer": "10"}]),
    "data-one-row": bad_file(APP, "one.jsonl", " needs at least 2 rows", table=good(1)),
    "data-gsm8k-answer-without-a-final-answer": bad_file(
        PROCESS, "gsm8k.jsonl", " row 2: 'answer' has no final answer after '####' (GSM8K's format, which 4 of its "
        "5 rows use): 'She sold 48 clips, then half as many: 72.'",
        table=[{"question": f"Q{i}?", "answer": f"{i} and {i} #### {2 * i}"} for i in range(2)]
        + [{"question": "Q2?", "answer": "She sold 48 clips, then half as many: 72."},
           {"question": "Q3?", "answer": "So 3 + 3 = ####"}, {"question": "Q4?", "answer": "#### 8"}]),
    "data-fewer-prompts-than-an-iteration": bad_file(
        APP, "few.jsonl", " leaves 3 training prompts after holding out 3 (data.test_fraction=0.5), "
                          "fewer than rollout.prompts_per_iteration=4",
        table=good(6), extra=["data.test_fraction=0.5"]),
    "data-source-is-an-output": Case(
        APP, ["data.source: ", "/data/prompts/train.parquet is inside", "which prepare rewrites"],
        overrides=["data.source=data/prompts/train.parquet"]),
    "data-prompt-longer-than-context": bad_file(
        APP, "long.jsonl", " row 2 (prompt_id 'p2'): the prompt is 141 tokens, which with rollout.max_new_tokens=24 "
                           "exceeds the model's context of 128 tokens (model.tiny.max_position_embeddings)",
        table=[*good(2), {"prompt_id": "p2", "prompt": "x" * 140, "answer": "1"}, *good(12)[3:]]),
    "data-prompt-longer-than-a-smaller-context": Case(
        APP, ["/data/prompts/train.parquet prompt_id ", "which with rollout.max_new_tokens=24 exceeds the model's "
                                                        "context of 32 tokens (model.tiny.max_position_embeddings)"],
        stage="reference", overrides=["model.tiny.max_position_embeddings=32"]),
    # --- the model directory (model.path)
    "model-missing": Case(APP, ["model.path: ", "/user/nowhere is not a directory"], stage="reference",
                          overrides=["model.path=user/nowhere"]),
    "model-not-a-directory": Case(APP, ["model.path: ", "/user/prompts.jsonl is not a directory"], stage="reference",
                                  overrides=["model.path=user/prompts.jsonl"]),
    "model-no-config": Case(APP, ["model.path: ", "/user/model has no config.json"], stage="reference",
                            setup=model_dir(lambda d: (d / "config.json").unlink()), overrides=MODEL),
    "model-config-not-json": Case(APP, ["model.path: ", "/user/model: config.json is unreadable"], stage="reference",
                                  setup=write("user/model/config.json", "{not json"), overrides=MODEL),
    "model-no-tokenizer": Case(APP, ["model.path: ", "/user/model has no tokenizer files"], stage="reference",
                               setup=model_dir(lambda d: [(d / n).unlink() for n in TOKENIZER_FILES]),
                               overrides=MODEL),
    "model-pickle-only": Case(PROCESS, ["model.path: ", "/user/model has only pickle weights (pytorch_model.bin)"],
                              stage="reference", overrides=MODEL,
                              setup=model_dir(lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"))),
    "model-corrupt-weights": Case(APP, ["model.path: ", "/user/model: the model does not load: SafetensorError"],
                                  stage="reference", overrides=MODEL,
                                  setup=write("user/model/model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{bad")),
    "model-needs-remote-code": Case(
        APP, ["model.path: ", "/user/model needs remote code; set model.trust_remote_code: true"], stage="reference",
        setup=model_dir(edit_json("config.json", lambda c: c.update(auto_map={"AutoModelForCausalLM": "evil.Model"}))),
        overrides=MODEL),
    "model-tokenizer-needs-remote-code": Case(
        APP, ["model.path: ", "/user/model needs remote code"], stage="reference", overrides=MODEL,
        setup=model_dir(edit_json("tokenizer_config.json", lambda c: c.update(
            auto_map={"AutoTokenizer": ["evil.Tokenizer", None]})))),
    "model-context-shorter-than-prompts": Case(
        APP, ["/data/prompts/train.parquet prompt_id ", "exceeds the model's context of 16 tokens "
                                                        "(max_position_embeddings in model.path's config.json)"],
        stage="reference", overrides=MODEL,
        setup=model_dir(edit_json("config.json", lambda c: c.update(max_position_embeddings=16)))),
    "evaluate-before-train": Case(APP, ["/models/policy is not a directory"], stage="evaluate",
                                  setup=lambda ws: shutil.rmtree(ws / "models" / "policy")),
    "evaluate-prompt-longer-than-context": Case(
        APP, ["/data/prompts/test.parquet prompt_id ", "which with eval.max_new_tokens=120 exceeds the model's "
                                                       "context of 128 tokens"],
        stage="evaluate", overrides=["eval.max_new_tokens=120"]),
    # --- paths: nothing is written outside the project
    "path-root-is-a-file": Case(PROCESS, ["--root ", "/user/prompts.jsonl: not a directory"],
                                args=["--params", "params.yaml", "--root", "user/prompts.jsonl"]),
    "path-outputs-symlinked-outside": Case(
        PROCESS, ["/project/data/prompts resolves to ", "/elsewhere/prompts, outside the run directory "],
        setup=prompts_elsewhere),
    # --- the train stages' checks at their boundaries, before anything reaches the update
    "reward-raises-on-one-completion": Case(
        STAGE, [ITERATION_1, ": reward 'fails_on_sample_2' raised on prompt_id=", " sample=2: ZeroDivisionError"],
        call=score_with("fails_on_sample_2"), overrides=custom("my_rewards:fails_on_sample_2"), error=RewardError),
    "reward-nan": Case(STAGE, [ITERATION_1, ": reward 'returns_nan' returned nan for prompt_id=", " sample=0: expected "
                                                                                                  "a finite number"],
                       call=score_with("returns_nan"), overrides=custom("my_rewards:returns_nan"), error=RewardError),
    "reward-inf": Case(STAGE, ["reward 'returns_inf' returned inf for prompt_id=", " sample=3: expected a finite"],
                       call=score_with("returns_inf"), overrides=custom("my_rewards:returns_inf"), error=RewardError),
    "reward-too-few-scores": Case(STAGE, ["reward 'returns_too_few' returned 15 scores for 16 completions"],
                                  call=score_with("returns_too_few"), overrides=custom("my_rewards:returns_too_few"), error=RewardError),
    "reward-too-many-scores": Case(STAGE, ["reward 'returns_too_many' returned 17 scores for 16 completions"],
                                   call=score_with("returns_too_many"), overrides=custom("my_rewards:returns_too_many"), error=RewardError),
    "reward-wrong-shape": Case(STAGE, ["reward 'returns_matrix' returned an array of shape (16, 2), expected (16,)"],
                               call=score_with("returns_matrix"), overrides=custom("my_rewards:returns_matrix"), error=RewardError),
    "reward-a-number-not-a-list": Case(STAGE, ["reward 'returns_a_number' returned float 1.0, expected a list of 16"],
                                       call=score_with("returns_a_number"), overrides=custom("my_rewards:returns_a_number"), error=RewardError),
    "reward-returns-nothing": Case(STAGE, ["reward 'returns_nothing' returned NoneType None, expected a list of 16"],
                                   call=score_with("returns_nothing"), overrides=custom("my_rewards:returns_nothing"), error=RewardError),
    "reward-text-scores": Case(STAGE, ["reward 'returns_text' returned '1.0' for prompt_id=", " sample=0"],
                               call=score_with("returns_text"), overrides=custom("my_rewards:returns_text"), error=RewardError),
    "group-duplicate-sample": Case(STAGE, [ITERATION_1, ": prompt_id=", " has sample 2 more than once"],
                                   setup=tamper_rollouts(lambda f: relabel(f, 3, sample=2)),
                                   call=score_iteration_1, error=GroupError),
    "group-missing-completion": Case(
        STAGE, [ITERATION_1, ": prompt_id=", " has samples [0, 1, 2], expected 0..3 (rollout.group_size=4)"],
        setup=tamper_rollouts(lambda f: f.drop(index=3)), call=score_iteration_1, error=GroupError),
    "group-incomplete-at-advantage": Case(STAGE, ["prompt_id=", " has samples [0, 1, 2], expected 0..3"],
                                          setup=drop_last_row_of_rewards, call=advantage_iteration_1, error=GroupError),
    "rollout-longer-than-max_new_tokens": Case(
        STAGE, ["prompt_id=", " sample=0 is longer than rollout.max_new_tokens=2"], error=RolloutError,
        call=rollout_iteration_2(["rollout.max_new_tokens=2"], generated=lambda f: f)),
    "rollout-length-finish-before-the-budget": Case(
        STAGE, ["prompt_id=", " sample=1 has finish_reason 'length' before rollout.max_new_tokens=24 tokens"],
        error=RolloutError, call=rollout_iteration_2(generated=lambda f: relabel(
            f, 1, finish_reason="length", completion_length=1, completion_ids=[5], logprobs=[-1.0]))),
    "rollout-nan-logprob": Case(
        STAGE, ["prompt_id=", " sample=0 has a non-finite log-prob"], error=RolloutError,
        call=rollout_iteration_2(generated=lambda f: relabel(f, 0, logprobs=[math.nan] * len(f.at[0, "logprobs"])))),
    "rollout-prompt-longer-than-context": Case(
        STAGE, ["/data/prompts/train.parquet prompt_id ", "which with rollout.max_new_tokens=120 exceeds the model's "
                                                          "context of 128 tokens"],
        error=DataError, call=rollout_iteration_2(["rollout.max_new_tokens=120"]), overrides=["rollout.max_new_tokens=120"]),
}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PREFECT_", "MLFLOW_"))}
    env.update({"PREFECT_HOME": str(STATE / "prefect"), "MLFLOW_TRACKING_URI": f"sqlite:///{STATE / 'mlflow.db'}",
                "PYTHONDONTWRITEBYTECODE": "1", "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    return env


def _cli_args(case: Case) -> list[str]:
    args = case.args or ["--params", "params.yaml", "--root", "."]
    for override in case.overrides:
        args += ["--set", override]
    return [case.stage, *args]


def run_case(case: Case, ws: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """Trip on the bad input; return (exit code, stderr) as the user would see them."""
    if case.via == "process":
        result = subprocess.run([sys.executable, "-m", "flows.cli", *_cli_args(case)], cwd=ws, env=_env(),
                                capture_output=True, text=True, timeout=300)
        return result.returncode, result.stderr
    monkeypatch.chdir(ws)
    monkeypatch.syspath_prepend(str(ws))  # as `python -m` puts the project on the path for the user's rewards
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    if case.via == "app":
        result = CliRunner().invoke(app, _cli_args(case))
        assert isinstance(result.exception, SystemExit), result.exception  # refused, not crashed
        return result.exit_code, result.stderr
    with pytest.raises(case.error) as error:
        case.call(ws, monkeypatch)
    return 1, f"error: {error.value}\n"  # what flows/cli.py prints for a PipelineError


@pytest.fixture
def forget_user_modules():
    yield
    for name in ("my_rewards", "broken_rewards"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_input_is_one_line_naming_the_culprit_and_touches_nothing(name, previous_run, tmp_path, monkeypatch,
                                                                       forget_user_modules):
    case = CASES[name]
    if name == "params-cuda-without-a-gpu" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    ws = tmp_path / "project"
    shutil.copytree(previous_run, ws, symlinks=True)
    if case.setup:
        case.setup(ws)
    before = snapshot(tmp_path)

    code, stderr = run_case(case, ws, monkeypatch)

    lines = stderr.strip().splitlines()
    assert code != 0
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr  # one line, nothing else on stderr
    for culprit in case.expect:
        assert culprit in lines[0]
    after = snapshot(tmp_path)
    changed = sorted(p for p in before.keys() & after.keys() if before[p] != after[p])
    assert (sorted(after.keys() - before.keys()), sorted(before.keys() - after.keys()), changed) == ([], [], [])


def test_every_kind_of_bad_input_of_the_issue_is_covered():
    """The list of issue 5 ("Bad input", "Checks at stage boundaries"), each with at least one case."""
    required = ["params-unknown-key", "params-ill-typed", "params-G<2", "params-eps_low<=0", "params-negative-beta",
                "params-lr<=0", "params-unknown-loss_agg", "params-unknown-scale_rewards",
                "params-minibatch-not-dividing-the-batch", "params-missing-file", "params-yaml-syntax",
                "data-missing", "data-empty", "data-unreadable", "data-no-prompt-column", "data-no-answer-column",
                "data-null-ids", "data-duplicate-ids", "data-prompt-longer-than-context",
                "model-missing", "model-no-tokenizer", "model-pickle-only", "model-needs-remote-code",
                "reward-module-missing", "reward-wrong-shape", "reward-nan", "reward-raises-on-one-completion",
                "group-duplicate-sample", "group-missing-completion", "rollout-longer-than-max_new_tokens",
                "path-outputs-symlinked-outside"]
    assert not set(required) - set(CASES)


# ----------------------------------------------------------------------------- through dvc repro
# DVC deletes a stage's outputs before running it unless they are `persist: true`: a refusal
# by the stage itself then came too late. Here the same bad inputs go into params.yaml (and
# the project) of a finished `dvc repro` run, and `dvc repro` must refuse them with the same
# line while data/, models/ and metrics/ stay byte-identical, whichever stage trips.

def _dvc_env(api: str | None = None) -> dict[str, str]:
    return {**_env(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
            **({"PREFECT_API_URL": api} if api else {})}


@pytest.fixture(scope="module")
def prefect_api():
    """One server for the cases that reach `train`: each would otherwise boot a temporary one (~10 s)."""
    server, api = start_prefect_server(_env())
    yield api
    stop(server)


@pytest.fixture(scope="module")
def finished_dvc_run(tmp_path_factory) -> Path:
    """A git + DVC project after one complete `dvc repro` (tiny, one iteration), with the user's inputs beside it."""
    root = tmp_path_factory.mktemp("dvc-run")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file() and not name.startswith("tests/"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, root / name)
    # One torch thread: the cases run two at a time, and two 2-thread torch processes on two
    # cores stall each other (OpenMP spin-waits).
    (root / "params.yaml").write_text(_params_yaml(["grpo.iterations=1", "threads=1"]))
    env = _dvc_env()
    for command in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "tiny"],
                    ["dvc", "repro"]):
        result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows("user/prompts.jsonl", good(30))(root)
    shutil.copytree(root / "models" / "reference", root / "user" / "model")
    (root / "my_rewards.py").write_text(USER_REWARDS)
    (root / "broken_rewards.py").write_text("raise RuntimeError('half-written module')\n")
    return root


# Cases a user can make in params.yaml and the project; not the ones that are command-line
# arguments, or doctored iteration files standing in for a broken stage.
NOT_THROUGH_DVC = {
    "evaluate-before-train": "dvc repro rebuilds the missing policy: not a mistake there",
    "group-duplicate-sample": "a doctored rollouts.parquet", "group-missing-completion": "a doctored rollouts.parquet",
    "group-incomplete-at-advantage": "a doctored rewards.parquet",
    "rollout-longer-than-max_new_tokens": "a doctored sampler", "rollout-length-finish-before-the-budget": "a doctored sampler",
    "rollout-nan-logprob": "a doctored sampler",
    "params-missing-file": "a --params argument", "params-is-a-directory": "a --params argument",
    "path-root-is-a-file": "a --root argument",
    "params-override-not-key=value": "a --set argument", "params-override-bad-yaml": "a --set argument",
    "params-override-into-a-value": "a --set argument",
    "path-outputs-symlinked-outside": "DVC follows the link to the same files: nothing changed, nothing runs",
}
# A reward's bad answer is found in `train`, after the rollout, whatever the answer is: through
# DVC each is the same path (train fails, the iteration set aside is put back) at ~20 s a case.
# Three of the nine go through DVC; all nine through the CLI above.
NOT_THROUGH_DVC |= {name: "a reward's runtime answer, the same path as reward-raises-on-one-completion"
                    for name in ("reward-inf", "reward-too-few-scores", "reward-too-many-scores",
                                 "reward-a-number-not-a-list", "reward-returns-nothing", "reward-text-scores")}
# What DVC itself refuses before it runs any stage (it reads params.yaml first), in its words.
DVC_SAYS = {
    "params-yaml-syntax": "ERROR: unable to read: 'params.yaml', YAML file structure is corrupted",
    "params-not-a-mapping": "expected a dictionary, got 'list' in file 'params.yaml'",
}
DVC_CASES = [name for name in CASES if name not in NOT_THROUGH_DVC]


def _write_overrides(ws: Path, overrides: list[str]) -> None:
    if not overrides:  # the case may have made params.yaml unreadable on purpose
        return
    raw = yaml.safe_load((ws / "params.yaml").read_text())
    for override in overrides:
        key, _, value = override.partition("=")
        set_key(raw, key, yaml.safe_load(value))
    (ws / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def _dvc_case(name: str, repo: Path, parent: Path, api: str) -> tuple[str, str | None]:
    """(name, what went wrong or None): `dvc repro` on one bad input, in a copy of the finished run."""
    case = CASES[name]
    ws = parent / name
    shutil.copytree(repo, ws, symlinks=True)
    if case.setup:
        case.setup(ws)
    _write_overrides(ws, case.overrides)
    outputs = {folder: snapshot(ws / folder) for folder in ("data", "models", "metrics")}
    result = subprocess.run(["dvc", "repro"], cwd=ws, env=_dvc_env(api), capture_output=True, text=True, timeout=600)
    said = result.stdout + result.stderr
    ours = [line for line in said.splitlines() if line.startswith("error: ")]
    if result.returncode == 0:
        return name, "dvc repro succeeded"
    if name in DVC_SAYS:
        if DVC_SAYS[name] not in said:
            return name, f"DVC did not refuse it as expected: {said[-1000:]}"
    elif len(ours) != 1 or not all(culprit in ours[0] for culprit in case.expect):
        return name, f"not the one line naming {case.expect}: {ours or said[-1000:]}"
    damaged = [folder for folder in outputs if snapshot(ws / folder) != outputs[folder]]
    shutil.rmtree(ws, ignore_errors=True)
    return name, f"{damaged} changed" if damaged else None


def test_through_dvc_repro_every_bad_input_is_refused_before_dvc_touches_an_output(finished_dvc_run, prefect_api,
                                                                                   tmp_path):
    """Two `dvc repro` at a time (each mostly waits on imports): the whole list in a few minutes."""
    from concurrent.futures import ThreadPoolExecutor

    cases = [name for name in DVC_CASES if not (name == "params-cuda-without-a-gpu" and torch.cuda.is_available())]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda name: _dvc_case(name, finished_dvc_run, tmp_path, prefect_api), cases))
    problems = [f"{name}: {problem}" for name, problem in results if problem]
    assert not problems, "\n".join(problems)
    assert len(cases) >= 67
