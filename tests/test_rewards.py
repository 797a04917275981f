"""Reward functions on hand-made completions, and the reward stage's checks."""

import math
import textwrap
import threading
import time

import pandas as pd
import pytest

from stages.config import RewardConfig
from stages.errors import ConfigError, RewardError
from stages.reward import score_rollouts
from stages.rewards import accuracy, format_reward, language, resolve

# The seed's Thai answers to "1 + 7": "the answer is 8", "eight", "is 12", "the sum is 8".
THAI = ["คำตอบคือ 8", "แปด", "เป็น 12", "ผลรวมคือ 8"]
PROMPTS = ["1 + 7 เท่ากับเท่าไร"] * 4


def test_accuracy_checks_the_number_in_each_thai_answer_against_the_gold_one():
    assert accuracy(PROMPTS, THAI, answer=["8"] * 4) == [1.0, 0.0, 0.0, 1.0]


def test_accuracy_reads_the_answer_tag_not_the_reasoning():
    completions = ["<think>1 + 7 = 9? no, 8</think><answer>8</answer>", "<think>1 + 7 = 8</think><answer>9</answer>"]
    assert accuracy(["1 + 7"] * 2, completions, answer=["8", "8"]) == [1.0, 0.0]


def test_accuracy_accepts_equivalent_forms_via_math_verify():
    completions = ["<answer>0.5</answer>", "<answer>\\frac{1}{2}</answer>", "<answer>2/4</answer>", "<answer>0.6</answer>"]
    assert accuracy([""] * 4, completions, answer=["1/2"] * 4) == [1.0, 1.0, 1.0, 0.0]


def test_format_requires_think_then_answer():
    completions = [
        "<think>1 + 7 = 8</think><answer>8</answer>",
        "<think>ผลรวมคือ 8</think>\n<answer>8</answer>\n",
        "<answer>8</answer>",
        "<think>1 + 7 = 8</think>",
        "<answer>8</answer><think>1 + 7</think>",
        *THAI,
    ]
    assert format_reward([""] * len(completions), completions) == [1.0, 1.0] + [0.0] * 7


def test_language_is_the_share_of_reasoning_letters_in_the_target_script():
    assert language(PROMPTS, THAI, target_language="th") == [1.0] * 4
    assert language(PROMPTS, THAI, target_language="en") == [0.0] * 4
    mixed = "<think>sum คือ 8</think><answer>8</answer>"  # 3 Latin letters, 3 Thai characters
    assert language([""], [mixed], target_language="en") == [pytest.approx(0.5)]
    # Digits and symbols belong to no language: nothing can be off-language.
    assert language([""], ["<think>1 + 7 = 8</think><answer>8</answer>"], target_language="th") == [1.0]


def _rollouts(completions, answer="8"):
    n = len(completions)
    return pd.DataFrame({"prompt_id": ["p"] * n, "sample": range(n), "prompt": ["1 + 7"] * n,
                         "answer": [answer] * n, "completion": completions})


def test_total_is_the_weighted_sum_of_the_components():
    cfg = RewardConfig(weights={"accuracy": 1.0, "format": 0.5}, target_language="en", custom=[], timeout_seconds=60, workers=0)
    scored = score_rollouts(_rollouts(["<think>1 + 7 = 8</think><answer>8</answer>", "8", "12"]), cfg)
    assert scored["accuracy"].tolist() == [1.0, 1.0, 0.0]
    assert scored["format"].tolist() == [1.0, 0.0, 0.0]
    assert scored["reward"].tolist() == [1.5, 1.0, 0.0]


@pytest.fixture
def user_rewards(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def brevity(prompts, completions, **kwargs):
            return [1.0 / (1 + len(c)) for c in completions]

        def abstains_on_long(prompts, completions, **kwargs):
            return [None if len(c) > 3 else 1.0 for c in completions]

        def explodes_on_twelve(prompts, completions, **kwargs):
            return [1 / 0 if c == "12" else 1.0 for c in completions]

        def returns_nan(prompts, completions, **kwargs):
            return [float("nan")] * len(completions)

        def returns_too_few(prompts, completions, **kwargs):
            return [1.0]

        def backtracks_forever(prompts, completions, **kwargs):
            import re  # catastrophic backtracking: C code that never releases the GIL
            return [float(bool(re.match(r"(a+)+$", "a" * 64 + "b"))) for c in completions]

        def prints_chatter(prompts, completions, **kwargs):
            print("a reward that talks on stdout")
            return [1.0] * len(completions)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))


def _cfg(name, timeout_seconds=60.0):
    return RewardConfig(weights={"accuracy": 1.0, name: 2.0}, target_language="en", custom=[f"my_rewards:{name}"],
                        timeout_seconds=timeout_seconds, workers=0)


def test_a_user_reward_is_imported_by_dotted_path_and_weighted(user_rewards):
    scored = score_rollouts(_rollouts(["8", "12"]), _cfg("brevity"))
    assert scored["brevity"].tolist() == [0.5, pytest.approx(1 / 3)]
    assert scored["reward"].tolist() == [2.0, pytest.approx(2 / 3)]


def test_an_abstention_is_recorded_as_nan_and_adds_nothing(user_rewards):
    scored = score_rollouts(_rollouts(["8", "1 + 7 = 8"]), _cfg("abstains_on_long"))
    assert scored["abstains_on_long"].iloc[0] == 1.0 and math.isnan(scored["abstains_on_long"].iloc[1])
    assert scored["reward"].tolist() == [3.0, 1.0]


def test_a_reward_that_raises_names_the_completion(user_rewards):
    with pytest.raises(RewardError, match=r"explodes_on_twelve.*prompt_id='p' sample=1.*ZeroDivisionError"):
        score_rollouts(_rollouts(["8", "12", "9"]), _cfg("explodes_on_twelve"))


@pytest.mark.parametrize("name, message", [
    ("returns_nan", r"returned nan for prompt_id='p' sample=0"),
    ("returns_too_few", r"returned 1 scores for 2 completions"),
])
def test_a_reward_with_a_bad_result_is_refused(user_rewards, name, message):
    with pytest.raises(RewardError, match=message):
        score_rollouts(_rollouts(["8", "12"]), _cfg(name))


def test_a_reward_that_hangs_is_stopped_at_its_deadline_naming_it_and_the_prompts(user_rewards):
    started = time.monotonic()
    with pytest.raises(RewardError, match=r"reward 'backtracks_forever' did not return within "
                                          r"reward.timeout_seconds=1 on the 2 completions of prompt_id 'p'"):
        score_rollouts(_rollouts(["8", "12"]), _cfg("backtracks_forever", timeout_seconds=1))
    assert time.monotonic() - started < 30  # the deadline, plus starting the scoring process
    # The hung process was stopped; the next call gets a fresh one.
    assert score_rollouts(_rollouts(["8"]), _cfg("brevity"))["brevity"].tolist() == [0.5]


def test_what_a_reward_prints_does_not_disturb_scoring(user_rewards):
    assert score_rollouts(_rollouts(["8", "12"]), _cfg("prints_chatter"))["prints_chatter"].tolist() == [1.0, 1.0]


def test_math_verify_runs_with_its_own_timeouts_on_a_main_thread_only():
    from stages.rewards import MATH_VERIFY_SECONDS, _alarm_seconds

    assert _alarm_seconds() == MATH_VERIFY_SECONDS  # pytest runs tests on the main thread, as the scoring process does
    seen = []
    worker = threading.Thread(target=lambda: seen.append(_alarm_seconds()))
    worker.start()
    worker.join()
    assert seen == [None]  # a thread cannot set SIGALRM: math-verify would raise


def test_reward_configuration_mistakes_name_the_key(user_rewards):
    with pytest.raises(ConfigError, match="reward.weights.accuracyy: no such reward"):
        resolve({"accuracyy": 1.0}, [])
    with pytest.raises(ConfigError, match="cannot import 'my_rewards:missing'"):
        resolve({"accuracy": 1.0}, ["my_rewards:missing"])
    with pytest.raises(ConfigError, match="'brevity' has no weight"):
        resolve({"accuracy": 1.0}, ["my_rewards:brevity"])
