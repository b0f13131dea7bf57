"""Reward functions on edge cases: no answer, malformed tags, Countdown's traps, user rewards."""

import sys
from fractions import Fraction

import pytest

from lorakit.rl import RewardSet, answer_format, countdown, extract_number, numeric_match, resolve_reward


@pytest.mark.parametrize("text, want", [
    ("The answer is 42.", Fraction(42)),
    ("3 apples and 4 pears: 7", Fraction(7)),
    ("so 12 #### 1,234", Fraction(1234)),
    ("\\boxed{\\frac{1}{2}} and then 9", Fraction(1, 2)),
    ("\\boxed{-\\dfrac{3}{4}}", Fraction(-3, 4)),
    ("\\boxed{3/4}", Fraction(3, 4)),
    ("\\boxed{x = 5} 6", Fraction(5)),
    ("<answer>7</answer> then 9", Fraction(7)),
    ("2.50", Fraction(5, 2)),
    ("-3", Fraction(-3)),
    ("no number here", None),
    ("", None),
    ("<answer></answer> 5", None),      # an empty answer slot is no answer, not the stray 5
    ("#### none", None),
    ("\\boxed{12", Fraction(12)),       # unclosed box: fall back to the last number
])
def test_extract_number(text, want):
    assert extract_number(text) == want


def test_numeric_match():
    assert numeric_match("1+1=", "2", answer="2") == 1.0
    assert numeric_match("p", "it is 2.50", answer=2.5) == 1.0
    assert numeric_match("p", "#### 1,000", answer="1000") == 1.0
    assert numeric_match("p", "3", answer="2") == 0.0
    assert numeric_match("p", "I don't know", answer="2") == 0.0
    assert numeric_match("p", "", answer="2") == 0.0
    with pytest.raises(ValueError, match="'answer' field"):
        numeric_match("p", "2")


@pytest.mark.parametrize("text, want", [
    ("<answer>5</answer>", 1.0),
    ("<think>5 = 2 + 3</think>\n<answer>5</answer>\n", 1.0),
    ("<answer>5", 0.0),
    ("answer>5</answer>", 0.0),
    ("so: <answer>5</answer>", 0.0),
    ("<answer>5</answer> and more", 0.0),
    ("<answer><answer>5</answer></answer>", 0.0),
    ("<answer>  </answer>", 0.0),
    ("<think>a</think><think>b</think><answer>5</answer>", 0.0),
    ("", 0.0),
])
def test_answer_format(text, want):
    assert answer_format("p", text) == want


@pytest.mark.parametrize("text, want", [
    ("<answer>(3 + 5) * 2</answer>", 1.0),
    ("<think>try</think><answer>2*(5+3) = 16</answer>", 1.0),
    ("<answer>3 * 5 + 2</answer>", 0.0),            # 17
    ("<answer>(5 + 5) * 2</answer>", 0.0),          # 5 twice, 3 unused
    ("<answer>(3 + 5) * 2 * 1</answer>", 0.0),      # 1 is not given
    ("<answer>16</answer>", 0.0),                   # numbers unused
    ("<answer>2 / (5 - 5) + 3</answer>", 0.0),      # division by zero, and 5 twice
    ("<answer>2 ** 5 - 3 - 5 - 8</answer>", 0.0),   # powers are not allowed
    ("<answer>__import__('os')</answer>", 0.0),
    ("<answer>(3 + 5) * 2" + ")" * 500 + "</answer>", 0.0),
    ("<answer>((3 + 5) * 2</answer>", 0.0),         # unbalanced
    ("(3 + 5) * 2", 0.0),                           # no tags
    ("<answer></answer>", 0.0),
])
def test_countdown(text, want):
    assert countdown("p", text, nums=[3, 5, 2], target=16) == want


def test_countdown_exact_fractions_and_division_by_zero():
    assert countdown("p", "<answer>6 / 4 * 2</answer>", nums=[6, 4, 2], target=3) == 1.0
    assert countdown("p", "<answer>7 / (3 - 3)</answer>", nums=[7, 3, 3], target=1) == 0.0
    with pytest.raises(ValueError, match="'nums' and 'target'"):
        countdown("p", "<answer>1</answer>", nums=[1])


def test_user_rewards_by_module_and_combined_weights(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def short(prompt, completion, **fields):\n    return 1.0 if len(completion) < 5 else 0.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_rewards", None)
    assert resolve_reward("my_rewards:short")("p", "abc") == 1.0
    rewards = RewardSet({"numeric_match": 1.0, "my_rewards:short": 0.5})
    scored = rewards.score(["1+1=", "1+1="], ["2", "the answer: 3"], [{"answer": "2"}, {"answer": "2"}])
    assert scored.total == [1.5, 0.0]
    assert scored.parts == {"numeric_match": [1.0, 0.0], "my_rewards:short": [1.0, 0.0]}
    assert scored.correct == [True, False]
    assert RewardSet({"my_rewards:short": 1.0}).score(["p"], ["x"], [{}]).correct is None


@pytest.mark.parametrize("spec, message", [
    ("nope", "not a built-in"),
    ("no_such_module_xyz:fn", "cannot import module"),
    ("json:no_such_function", "has no function"),
])
def test_bad_reward_specs_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_reward(spec)


def test_a_reward_returning_nan_is_refused():
    import math

    def bad(prompt, completion, **_):
        return math.nan

    rewards = RewardSet({"numeric_match": 1.0})
    rewards.fns["bad"], rewards.weights["bad"] = bad, 1.0
    with pytest.raises(ValueError, match="returned nan"):
        rewards.score(["p"], ["1"], [{"answer": 1}])
