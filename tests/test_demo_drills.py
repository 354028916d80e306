"""Answer drills (synthetic_data.answer_drill, warm_start's drill stage): random premises after a black clip, only
what follows the premises trained."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from grpo_care.demo.consistency import judge
from grpo_care.demo.pipeline import DESIGN_1, DESIGN_2, QUICK
from grpo_care.demo.synthetic_data import DatasetSizes, write_dataset
from grpo_care.demo.warm_start import (
    IGNORE_INDEX,
    WarmStartSpec,
    batch_inputs,
    drill_target,
    load_examples,
    mix_drills,
    warm_start,
)

SIZES = DatasetSizes(train=2, sft=24, eval_per_level=2)


@pytest.fixture(scope="module")
def data(demo_setup):
    return demo_setup("drills", SIZES, 4, DESIGN_2)


def _sft(files) -> list[dict]:
    return [json.loads(line) for line in files.sft.read_text().splitlines()]


def test_drills_follow_their_random_premises_and_change_nothing_else(data, tmp_path):
    files = data[0]
    records = _sft(files)
    for r in records:
        verdict = judge(r["drill"], [r[f"choice_{c}"] for c in "abcd"])
        assert verdict.consistent, r["drill"]
        assert r["drill"].startswith("<think>" + r["drill_premises"][:-1])
    drawn = sum(r["drill_premises"] != r["cot_premises"] for r in records) / len(records)
    assert drawn > 0.5  # random premises, not the ones the clip or the teacher gives
    # the drills draw from their own stream: the same seed without them gives the same clips and chains of thought
    again = write_dataset(tmp_path / "again", SIZES, seed=4, teacher=DESIGN_2.teacher,
                          world=DESIGN_2.world)
    assert [r["cot"] for r in _sft(again)] == [r["cot"] for r in records]


def test_drill_examples_show_black_visuals_and_train_only_after_the_premises(data):
    files, _, processor, config = data
    perception, cot, drills = load_examples(files.sft, config, processor)
    assert len(drills) == len(cot) == 2 * SIZES.sft
    tokenizer = processor.tokenizer
    for drill, example in zip(drills[::2], cot[::2]):
        for black, shown in ((drill.videos, example.videos), (drill.images, example.images)):
            assert len(black) == len(shown) == 1
            assert np.asarray(black[0]).shape == np.asarray(shown[0]).shape
            assert not np.asarray(black[0]).any() and np.asarray(shown[0]).any()
        context = tokenizer.decode(drill.target[:drill.trained_from])
        trained = tokenizer.decode(drill.target[drill.trained_from:])
        assert "drove" in context and "drove" not in trained and "<answer>" in trained
    inputs, labels = batch_inputs(drills[:3], processor)
    for row, drill in enumerate(drills[:3]):
        assert (labels[row, :drill.trained_from] == IGNORE_INDEX).all()
        assert labels[row, drill.trained_from:len(drill.target)].tolist() == drill.target[drill.trained_from:]
        assert inputs["input_ids"][row, -labels.shape[1]:][:len(drill.target)].tolist() == drill.target


def test_drill_target_rejects_a_drill_that_does_not_start_with_its_premises(data):
    tokenizer = data[2].tokenizer
    with pytest.raises(ValueError, match="does not start with its premises"):
        drill_target(tokenizer, "<think>The red car drove up.</think><answer>A</answer>", "The blue car drove up.")


def test_mix_drills_share_and_validation():
    cot, drills = list(range(70)), list(range(100, 200))
    mixed = mix_drills(cot, drills, 0.3, seed=0)
    assert mixed[:70] == cot and len(mixed) == 100 and set(mixed[70:]) <= set(drills)
    assert mix_drills(cot, drills, 0.0, seed=0) == cot
    with pytest.raises(ValueError, match="no answer drills"):
        mix_drills(cot, [], 0.3, seed=0)
    with pytest.raises(ValueError, match="drill_share"):
        WarmStartSpec(drill_share=1.0)


@pytest.mark.parametrize("first", [True, False])
def test_the_drill_stage_runs_where_asked(data, first):
    files, model, processor, config = data
    spec = replace(QUICK.warm, drill_steps=2, drills_first=first, drill_share=0.25)
    history = warm_start(model, processor, files.sft, config, spec, log=None)
    stages = [h["stage"] for h in history]
    order = list(dict.fromkeys(stages))
    assert order == (["answer drills", "perception", "chain of thought"] if first
                     else ["perception", "answer drills", "chain of thought"])
    assert stages.count("answer drills") == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert DESIGN_1.warm.drill_steps == 0 and DESIGN_1.warm.drill_share == 0.0  # study 1: no drills


def test_misreads_as_context_feed_the_misread_premises_and_train_only_the_letter(data):
    files, _, processor, config = data
    records = {r["sample_id"]: r for r in _sft(files)}
    _, plain, _ = load_examples(files.sft, config, processor)
    _, context, _ = load_examples(files.sft, config, processor, misreads_as_context=True)
    kinds = [r["cot_kind"] for r in records.values()]
    assert "misread" in kinds and "faithful" in kinds
    tokenizer = processor.tokenizer
    for kind, a, b in zip(kinds, plain[::2], context[::2]):  # two wordings per record, the same target
        assert a.target == b.target and a.trained_from == 0
        if kind != "misread":
            assert b.trained_from == 0
            continue
        premises = tokenizer.decode(b.target[:b.trained_from])
        assert "drove" in premises and "drove" not in tokenizer.decode(b.target[b.trained_from:])
        assert "<answer>" in tokenizer.decode(b.target[b.trained_from:])
