"""The reference probe (grpo_care.demo.reference_probe): which cases it builds, and that its letter
probabilities are the model's, checked against a plain torch forward pass."""

import json

import pytest
import torch
from grpo_care.demo.pipeline import DESIGN_1, DESIGN_2
from grpo_care.demo.reference_probe import mean_letter_probability, probe_cases, reference_probe
from grpo_care.demo.synthetic_data import LETTERS, DatasetSizes
from grpo_care.demo.warm_start import batch_inputs


@pytest.fixture(scope="module")
def setup(demo_setup):
    return demo_setup("probe", DatasetSizes(train=24, sft=2, eval_per_level=2), 3, DESIGN_2)


@pytest.mark.parametrize("teacher", [DESIGN_1.teacher, DESIGN_2.teacher], ids=["design_1", "design_2"])
def test_cases_are_the_reversing_cars_away_from_a_wall_and_every_prompt(setup, teacher):
    files, _, processor, config = setup
    truths = [json.loads(line)["ground_truth"] for line in files.train.read_text().splitlines()]
    cases = probe_cases(processor, files.train, config, teacher, seed=0)
    away = [t for t in truths if t["reversing"] and not t["at_wall"]]
    assert 0 < len(away) < len(truths)
    after_true, after_teacher = cases["right_letter_after_true_premises"], cases["right_letter_after_teacher_premises"]
    assert len(after_true) == len(after_teacher) == len(away)
    assert len(cases["their_letter_after_random_premises"]) == len(truths)
    tokenizer = processor.tokenizer
    for (true, at), (taught, at_taught), truth in zip(cases["right_letter_after_true_premises"],
                                                        cases["right_letter_after_teacher_premises"], away):
        right = LETTERS[truth["option_directions"].index(truth["next_direction"])]
        for example, position in ((true, at), (taught, at_taught)):
            assert right in tokenizer.decode(example.target[position])
            assert tokenizer.decode(example.target[:position + 1]).endswith("<answer>" + right)
        ending = "." if teacher.cell_first else " and is now at"
        assert f"drove {truth['direction']}{ending}" in tokenizer.decode(true.target)
        assert f"drove {truth['facing']}{ending}" in tokenizer.decode(taught.target)


@pytest.mark.parametrize("style", ["paper", "short"])
def test_the_probe_asks_in_the_configs_prompt_style(setup, style):
    """The probe's prompts are the RL prompts, in the trainer config's prompt style (design 4: short)."""
    from dataclasses import replace

    from grpo_care.data import QUESTION_TEMPLATE, SHORT_QUESTION_TEMPLATE

    files, _, processor, config = setup
    cases = probe_cases(processor, files.train, replace(config, prompt_style=style), DESIGN_2.teacher, seed=0)
    instruction = {"paper": QUESTION_TEMPLATE, "short": SHORT_QUESTION_TEMPLATE}[style].split("\n", 1)[1]
    prompts = [example.messages[0]["content"][-1]["text"] for kind in cases.values() for example, _ in kind]
    assert prompts and all(instruction in text for text in prompts)


def test_letter_probabilities_match_a_torch_forward_pass(setup):
    files, model, processor, config = setup
    cases = probe_cases(processor, files.train, config, DESIGN_2.teacher, seed=0)
    cases = cases["right_letter_after_true_premises"][:3]
    model.eval()
    expected = []
    with torch.no_grad():
        for example, position in cases:
            inputs, targets = batch_inputs([example], processor)
            logits = model(**inputs).logits[0, -targets.shape[1] - 1:-1].float()
            expected.append(torch.log_softmax(logits, -1)[position, targets[0, position]].exp().item())
    assert mean_letter_probability(model, processor, cases) == pytest.approx(sum(expected) / len(expected), abs=2e-4)
    probe = reference_probe(model, processor, files.train, config, DESIGN_2.teacher, seed=0)
    assert all(0.0 < probe[k] < 1.0 for k in ("right_letter_after_true_premises",
                                               "right_letter_after_teacher_premises",
                                               "their_letter_after_random_premises"))
