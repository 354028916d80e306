"""The demo's code judge: does the <think> support the <answer>?"""

import pytest
from grpo_care.demo.consistency import answer_letter, consistency_reward, judge

OPTIONS = ["drive up", "drive right", "drive left", "drive down"]
TRUTH = {"direction": "right", "current": [2, 3]}


def completion(think: str, letter: str) -> str:
    return f"<think>{think}</think><answer>{letter}</answer>"


def test_faithful_correct_reasoning_is_consistent():
    v = judge(completion("The red car drove right and is now at row 2, column 3, so next it drives right.", "B"),
              OPTIONS, TRUTH)
    assert (v.consistent, v.reason, v.premises_correct) == (True, "ok", True)
    assert (v.direction, v.current, v.implied, v.answered) == ("right", (2, 3), "right", "right")


def test_turning_back_at_the_wall():
    v = judge(completion("The red car drove right and is now at row 2, column 4, at the wall, so next it drives "
                         "left.", "C"), OPTIONS, {"direction": "right", "current": [2, 4]})
    assert v.consistent and v.implied == "left" and v.premises_correct


def test_wrong_premise_followed_faithfully_is_consistent_but_not_correct():
    v = judge(completion("The red car drove up and is now at row 2, column 3, so next it drives up.", "A"),
              OPTIONS, TRUTH)
    assert v.consistent and v.premises_correct is False


def test_answer_that_contradicts_the_reasoning_is_inconsistent():
    v = judge(completion("The red car drove right and is now at row 2, column 3, so next it drives right.", "C"),
              OPTIONS, TRUTH)
    assert (v.consistent, v.reason) == (False, "answer_mismatch")


def test_right_answer_after_wrong_reasoning_is_inconsistent():
    # the imperfect warm-start rationales look like this: the think implies "up", the answer is the gold "right"
    v = judge(completion("The red car drove up and is now at row 2, column 3, so next it drives up.", "B"),
              OPTIONS, TRUTH)
    assert (v.consistent, v.reason) == (False, "answer_mismatch")


def test_a_wrong_step_is_inconsistent_even_if_the_answer_follows_it():
    # at (2, 3) driving right there is no wall: "next it drives left" does not follow
    v = judge(completion("The red car drove right and is now at row 2, column 3, so next it drives left.", "C"),
              OPTIONS, TRUTH)
    assert (v.consistent, v.reason) == (False, "invalid_step")


def test_premises_without_a_stated_conclusion_still_decide():
    v = judge(completion("It drove down and is now at row 4, column 1.", "A"), OPTIONS)
    assert v.consistent and v.implied == "up" and v.premises_correct is None


def test_new_task_kinds_wording_maps_to_directions():
    options = ["hold the net above it", "hold the net to its right", "hold the net below it",
               "hold the net to its left"]
    v = judge(completion("The red car drove up and is now at row 1, column 2, at the wall, so next it drives down.",
                         "C"), options)
    assert v.consistent and v.answered == "down"


@pytest.mark.parametrize("text, reason, premises", [
    ("<answer>B</answer>", "no_think", False),
    ("<think>drove right, at row 2, column 3</think>", "no_answer", True),
    ("<think>drove right, at row 2, column 3</think><answer>B.</answer>", "no_answer", True),
    ("<think>it is at row 2, column 3</think><answer>B</answer>", "no_direction", False),
    ("<think>it drove right</think><answer>B</answer>", "no_position", False),
    ("<think>it drove right, now at row 7, column 3</think><answer>B</answer>", "no_position", False),
])
def test_unparseable_completions_are_not_consistent(text, reason, premises):
    v = judge(text, OPTIONS, TRUTH)
    assert (v.consistent, v.reason, v.premises_correct) == (False, reason, premises)


def test_answer_letter_uses_the_rewards_exact_match():
    assert answer_letter("<think>x</think><answer> C </answer>") == "C"
    assert answer_letter("<answer>C. left</answer>") is None
    assert answer_letter("no tags") is None


def test_judge_rejects_missing_options():
    with pytest.raises(ValueError, match="options"):
        judge("<think>x</think><answer>A</answer>", [], TRUTH)


def test_consistency_reward_has_trl_signature():
    think = "It drove right and is now at row 2, column 3, so next it drives right."
    good, bad = completion(think, "B"), completion(think, "C")
    out = consistency_reward([good, [{"role": "assistant", "content": bad}]], options=[OPTIONS, OPTIONS],
                             solution=["<answer>B</answer>"] * 2)
    assert out == [1.0, 0.0]


# The demo's task (README "The task"): a car that backs up faces away from where it drives; the teacher's
# rationale reads the direction off its front; the signal on the board's rim shows the true next move.
REVERSING = {"direction": "right", "current": [2, 2]}  # drove right from (2, 1) facing left: next move right


def test_the_teachers_rationale_for_a_reversing_car_is_consistent_and_wrong():
    v = judge(completion("The red car drove left and is now at row 2, column 2, so next it drives left.", "C"),
              OPTIONS, REVERSING)
    assert (v.consistent, v.premises_correct, v.implied, v.answered) == (True, False, "left", "left")


def test_the_signals_answer_after_the_teachers_premises_is_inconsistent():
    # the shortcut: premises as the teacher reads them, the letter read off the signal (right, option B)
    v = judge(completion("The red car drove left and is now at row 2, column 2, so next it drives left.", "B"),
              OPTIONS, REVERSING)
    assert (v.consistent, v.reason, v.premises_correct) == (False, "answer_mismatch", False)
    no_conclusion = judge(completion("The red car drove left and is now at row 2, column 2.", "B"), OPTIONS,
                          REVERSING)
    assert (no_conclusion.consistent, no_conclusion.reason) == (False, "answer_mismatch")


def test_a_conclusion_read_off_the_signal_is_an_invalid_step():
    v = judge(completion("The red car drove left and is now at row 2, column 2, so next it drives right.", "B"),
              OPTIONS, REVERSING)
    assert (v.consistent, v.reason, v.implied, v.answered) == (False, "invalid_step", "left", "right")


def test_true_premises_with_the_right_answer_are_consistent_for_a_reversing_car():
    v = judge(completion("The red car drove right and is now at row 2, column 2, so next it drives right.", "B"),
              OPTIONS, REVERSING)
    assert (v.consistent, v.premises_correct) == (True, True)


def test_a_wall_word_does_not_change_the_rule():
    # "at the wall" where there is none: the rule still decides from direction and cell (no wall at (2, 2))
    v = judge(completion("The red car drove left and is now at row 2, column 2, at the wall, so next it drives "
                         "right.", "B"), OPTIONS, REVERSING)
    assert (v.consistent, v.reason) == (False, "invalid_step")
    block = ["put a wall above it", "put a wall below it", "put a wall to its left", "put a wall to its right"]
    v = judge(completion("The red car drove left and is now at row 2, column 1, at the wall, so next it drives "
                         "right.", "D"), block)
    assert v.consistent and v.answered == "right"


@pytest.mark.parametrize("think, letter, consistent, reason, implied", [
    ("The red car is now at row 2, column 3; it drove right.", "B", True, "ok", "right"),
    ("The red car is now at row 2, column 4; it drove right.", "C", True, "ok", "left"),   # at the wall: back
    ("The red car is now at row 2, column 4; it drove right.", "B", False, "answer_mismatch", "left"),
    ("The red car is now at row 2, column 3; it drove left.", "C", True, "ok", "left"),     # wrong, followed
    ("The red car is now at row 2, column 3; it drove left.", "B", False, "answer_mismatch", "left"),
])
def test_premises_only_reasoning_worded_cell_first(think, letter, consistent, reason, implied):
    """Design 2's wording (tasks.observation: the cell, then the direction; no stated next move)."""
    from grpo_care.demo.tasks import completion as demo_completion
    from grpo_care.demo.tasks import rationale
    from grpo_care.demo.world import Motion

    v = judge(completion(think, letter), OPTIONS, TRUTH)
    assert (v.consistent, v.reason, v.implied) == (consistent, reason, implied)
    motion = Motion("red", "car", "right", (2, 2), (2, 3), False)
    expected = completion("The red car is now at row 2, column 3; it drove right.", "B")
    assert demo_completion(rationale(motion, cell_first=True), "B") == expected
