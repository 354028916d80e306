"""grpo_care.rewards: accuracy and format exactly as grpo_care.md 4, and pluggable reward functions."""

import pytest
from grpo_care.rewards import (
    accuracy_reward,
    extract_answer,
    format_reward,
    resolve_reward_func,
    reward_name,
    score_completions,
)

GOOD = "<think>The tap is open, so close it.</think>\n<answer>B</answer>"


@pytest.mark.parametrize(
    ("completion", "accuracy", "fmt"),
    [
        (GOOD, 1.0, 1.0),
        ("<think>x</think><answer> B </answer>", 1.0, 1.0),  # stripped content
        ("<think>x</think><answer>B.</answer>", 0.0, 1.0),  # strict letter match
        ("<think>x</think><answer>B. close tap</answer>", 0.0, 1.0),
        ("<think>x</think><answer>b</answer>", 0.0, 1.0),
        (" " + GOOD, 1.0, 0.0),  # fullmatch: no leading whitespace
        (GOOD + "\n", 1.0, 0.0),  # ... nor trailing
        ("<answer>B</answer>", 1.0, 0.0),  # no think
        ("<think>x</think><answer>C</answer><answer>B</answer>", 0.0, 1.0),  # the first answer counts
        ("I think B", 0.0, 0.0),
        ("<think>x</think><answer>B", 0.0, 0.0),  # unclosed
    ],
)
def test_multiple_choice_accuracy_and_format_on_hand_written_completions(completion, accuracy, fmt):
    assert accuracy_reward(
        [completion], solution=["<answer>B</answer>"], problem_type=["multiple choice"]
    ) == [accuracy]
    assert format_reward([completion]) == [fmt]


def test_extract_answer():
    assert extract_answer("a <answer>\n  A  \n</answer> b <answer>C</answer>") == "A"
    assert extract_answer("no tags") == ""


@pytest.mark.filterwarnings("ignore:rouge_score is not installed")
def test_other_problem_types():
    sol = lambda x: [f"<answer>{x}</answer>"]  # noqa: E731
    comp = lambda x: [f"<think>t</think><answer>{x}</answer>"]  # noqa: E731
    assert accuracy_reward(comp("3.14"), sol("3.141"), ["numerical"]) == [1.0]
    assert accuracy_reward(comp("3"), sol("3.0"), ["numerical"]) == [0.0]  # only one has a '.'
    assert accuracy_reward(comp("1,000"), sol("1,000"), ["numerical"]) == [1.0]
    assert accuracy_reward(comp("abc"), sol("3"), ["numerical"]) == [0.0]  # exception -> 0
    assert accuracy_reward(comp("the cat sat"), sol("the cat sat"), ["OCR"]) == [1.0]
    assert accuracy_reward(comp("the dog sat"), sol("the cat sat"), ["OCR"]) == [pytest.approx(2 / 3)]
    assert accuracy_reward(comp("15"), sol("10"), ["regression"]) == [pytest.approx(0.5)]
    assert accuracy_reward(comp("a red apple"), sol("a red apple"), ["free-form"]) == [pytest.approx(1.0)]
    assert accuracy_reward(comp("x"), sol("y"), ["unknown type"]) == [0.0]


def test_free_form_accuracy_is_stemmed_rouge(monkeypatch):
    """grpo_care.md 4: the mean of ROUGE-1/2/L F-measures with stemming (rouge_score); without rouge_score, an
    unstemmed ROUGE and a warning."""
    from grpo_care import rewards

    pytest.importorskip("rouge_score", reason="rouge-score is in the [video] and [test] extras")
    # stemmed: cats ~ cat, running ~ run; ROUGE-1 3/4, ROUGE-2 1/3, ROUGE-L 3/4 -> mean 11/18
    assert rewards.free_form_accuracy("the cats are running", "the cat is running") == pytest.approx(11 / 18)
    monkeypatch.setitem(__import__("sys").modules, "rouge_score", None)  # as if not installed
    with pytest.warns(UserWarning, match="rouge_score is not installed"):
        unstemmed = rewards.free_form_accuracy("the cats are running", "the cat is running")
    assert unstemmed == pytest.approx((2 / 4 + 0 + 2 / 4) / 3)


def test_conversational_completions_are_accepted():
    conv = [[{"role": "assistant", "content": GOOD}]]
    assert accuracy_reward(conv, solution=["<answer>B</answer>"]) == [1.0]
    assert format_reward(conv) == [1.0]


def _halves(completions, **columns):
    assert "solution" in columns and "prompts" in columns
    return [None if "skip" in c else 0.5 for c in completions]


def test_pluggable_by_dotted_path_with_trls_signature():
    assert resolve_reward_func("accuracy") is accuracy_reward
    assert resolve_reward_func("grpo_care.rewards.format_reward") is format_reward
    assert resolve_reward_func("grpo_care.rewards:format_reward") is format_reward
    assert reward_name("my_pkg.rewards.length_bonus") == "length_bonus"
    f = resolve_reward_func(f"{__name__}._halves")
    scores = score_completions(
        [f, format_reward], ["a", "skip me"], {"solution": ["", ""], "prompts": ["p", "p"]}
    )
    assert scores == [[0.5, None], [0.0, 0.0]]
    with pytest.raises(ValueError, match="unknown reward function 'acc'"):
        resolve_reward_func("acc")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        resolve_reward_func("no_such_module.f")
    with pytest.raises(ValueError, match="returned 1 values for 2 completions"):
        score_completions([lambda completions, **kw: [1.0]], ["a", "b"], {})
