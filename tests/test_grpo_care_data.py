"""grpo_care.data: SEED-Bench-R1 / Video-R1 records to prompts, as grpo_care.md 2.1-2.2 and 9.2 say."""

import json
import random

import pytest
from grpo_care.data import (
    EVAL_QUESTION_TEMPLATE,
    QUESTION_TEMPLATE,
    SHORT_EVAL_QUESTION_TEMPLATE,
    SHORT_QUESTION_TEMPLATE,
    TYPE_TEMPLATE,
    DataFormatError,
    build_messages,
    load_samples,
    question_text,
    seed_bench_r1_sample,
)

QUESTION = "Considering the progress shown in the video and my current observation shown in the image, what action should I take next in order to make tea?"  # noqa: E501

TRAIN_RECORD = {
    "sample_id": 7,
    "question": QUESTION,
    "answer": "boil water",
    "negative_answers": ["open fridge", "cut bread", "wash cup", "close door", "take spoon"],
    "task_progress_metadata": [{"narration_text": "take kettle", "start_frame": 0, "stop_frame": 30}],
    "video_source": "EpicKitchens_flatten",
    "video_basename": "P01_01_7.mp4",
    "current_observation_basename": "P01_01_7.png",
}
VAL_RECORD = {
    "sample_id": "ego4d-uid_2",
    "question": QUESTION,
    "answer": "wash cup",
    "choice_a": "open fridge",
    "choice_b": "wash cup",
    "choice_c": "cut bread",
    "choice_d": "boil water",
    "golden_choice_idx": "B",
    "task_progress_metadata": [],
    "video_source": "Ego4D_flatten",
    "video_basename": "x.mp4",
    "current_observation_basename": "x.png",
    "domain": "Hobbies",
}


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_templates_are_the_authors_text():
    assert QUESTION_TEMPLATE.startswith("{Question}\nPlease think about this question as if you were a human")
    assert "natural language thought expressions It's encouraged" in QUESTION_TEMPLATE  # no period: sic
    assert QUESTION_TEMPLATE.endswith(
        "between the <think> </think> tags, and then give your final answer between the <answer> </answer> "
        "tags."
    )
    assert EVAL_QUESTION_TEMPLATE.endswith(
        "between the <think> and </think> tags, and then give your final answer between the <answer> and "
        "</answer> tags."
    )
    assert TYPE_TEMPLATE["multiple choice"] == (
        " Please provide only the single option letter (e.g., A, B, C, D, etc.) "
        "within the <answer> </answer> tags."
    )


def test_training_record_samples_three_negatives_and_shuffles_with_the_seeded_rng(tmp_path):
    sample = seed_bench_r1_sample(TRAIN_RECORD, tmp_path, random.Random(42))
    rng = random.Random(42)
    expected = rng.sample(TRAIN_RECORD["negative_answers"], 3) + ["boil water"]
    rng.shuffle(expected)
    assert sample.options == expected
    gold = "ABCD"[expected.index("boil water")]
    assert sample.solution == f"<answer>{gold}</answer>"
    question = QUESTION + "Options:\n" + "\n".join(f"{L}. {o}" for L, o in zip("ABCD", expected)) + "\n"
    assert sample.text == QUESTION_TEMPLATE.format(Question=question) + TYPE_TEMPLATE["multiple choice"]
    assert sample.video == str(tmp_path / "videos" / "EpicKitchens_flatten" / "P01_01_7.mp4")
    assert sample.image == str(tmp_path / "images" / "EpicKitchens_flatten" / "P01_01_7.png")


def test_validation_record_keeps_a_to_d_order_and_has_no_video_without_progress(tmp_path):
    (tmp_path / "annotations").mkdir()
    path = _write_jsonl(tmp_path / "annotations" / "validation_L3.jsonl", [VAL_RECORD])
    (sample,) = load_samples(path, template="eval")
    assert sample.options == ["open fridge", "wash cup", "cut bread", "boil water"]
    assert sample.solution == "<answer>B</answer>"
    assert sample.video is None and sample.image.endswith("images/Ego4D_flatten/x.png")
    assert sample.text.startswith(
        QUESTION + "Options:\nA. open fridge\nB. wash cup\nC. cut bread\nD. boil water\n"
    )
    assert "<think> and </think>" in sample.text  # the eval template
    assert (
        sample.level == "validation_L3" and sample.domain == "Hobbies" and sample.sample_id == "ego4d-uid_2"
    )
    content = build_messages(sample)[0]["content"]
    assert [c["type"] for c in content] == ["image", "text"]


def test_shuffle_happens_once_in_file_order_and_is_reproducible(tmp_path):
    path = _write_jsonl(tmp_path / "train.jsonl", [dict(TRAIN_RECORD, sample_id=i) for i in range(20)])
    first = [s.options for s in load_samples(path, tmp_path, seed=3)]
    assert first == [s.options for s in load_samples(path, tmp_path, seed=3)]
    assert first != [s.options for s in load_samples(path, tmp_path, seed=4)]
    assert len({tuple(o) for o in first}) > 1  # each record draws its own shuffle from the one RNG


def test_messages_put_video_then_image_then_text(tmp_path):
    sample = seed_bench_r1_sample(TRAIN_RECORD, tmp_path, random.Random(0))
    (message,) = build_messages(sample)
    assert message["role"] == "user"
    assert [c["type"] for c in message["content"]] == ["video", "image", "text"]
    assert build_messages(sample, multimodal=False) == [{"role": "user", "content": sample.text}]


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(TRAIN_RECORD) + "\n\n" + '{"question": "broken",\n')
    with pytest.raises(DataFormatError, match=rf"{path}:3: malformed JSON line"):
        load_samples(path, tmp_path)


def test_record_missing_a_field_names_file_and_line(tmp_path):
    bad = {k: v for k, v in TRAIN_RECORD.items() if k != "answer"}
    path = _write_jsonl(tmp_path / "train.jsonl", [TRAIN_RECORD, bad])
    with pytest.raises(DataFormatError, match=rf"{path}:2: bad seed_bench_r1 record: missing field 'answer'"):
        load_samples(path, tmp_path)


def test_video_r1_json(tmp_path):
    records = [
        {
            "problem_id": 1,
            "problem": "Which color? ",
            "options": ["A. red", "B. blue"],
            "problem_type": "multiple choice",
            "data_type": "video",
            "path": "./clips/a.mp4",
            "solution": "<answer>B</answer>",
        },
        {
            "problem_id": 2,
            "problem": "How many?",
            "options": [],
            "problem_type": "numerical",
            "data_type": "image",
            "path": "./imgs/b.png",
            "solution": "<answer>3</answer>",
        },
    ]
    path = tmp_path / "Video-R1-260k.json"
    path.write_text(json.dumps(records))
    mc, num = load_samples(path, tmp_path)
    assert (
        mc.text
        == QUESTION_TEMPLATE.format(Question="Which color? Options:\nA. red\nB. blue\n")
        + TYPE_TEMPLATE["multiple choice"]
    )
    assert mc.video == str(tmp_path / "clips/a.mp4") and mc.image is None
    assert num.problem_type == "numerical" and num.image == str(tmp_path / "imgs/b.png")
    assert num.text.endswith(TYPE_TEMPLATE["numerical"])
    path.write_text(json.dumps([dict(records[0], problem_type="essay")]))
    with pytest.raises(DataFormatError, match=r"record 0: bad video_r1 record: problem_type"):
        load_samples(path, tmp_path)


def test_short_prompt_style_replaces_the_instructions_only(tmp_path):
    """prompt_style="short": the same question and options, one sentence of instructions (with the paper's "and"
    difference between the training and evaluation wordings), no option-letter sentence; other problem types
    keep the sentence that says what form their answer takes."""
    question = "Which color? Options:\nA. red\nB. blue\n"
    assert question_text(question, template="train", prompt_style="short") == (
        question + "\nPlease reason between the <think> </think> tags and answer between the <answer> </answer> tags.")
    assert question_text(question, template="eval", prompt_style="short") == SHORT_EVAL_QUESTION_TEMPLATE.format(
        Question=question)
    assert "<think> and </think>" in SHORT_EVAL_QUESTION_TEMPLATE
    assert "<answer> and </answer>" in SHORT_EVAL_QUESTION_TEMPLATE
    assert question_text("How many?", "numerical", prompt_style="short") == (
        SHORT_QUESTION_TEMPLATE.format(Question="How many?") + TYPE_TEMPLATE["numerical"])
    assert question_text(question, template="eval") == (
        EVAL_QUESTION_TEMPLATE.format(Question=question) + TYPE_TEMPLATE["multiple choice"])  # the default: the paper's
    path = tmp_path / "training.jsonl"
    path.write_text(json.dumps(TRAIN_RECORD) + "\n")
    paper, = load_samples(path, tmp_path, seed=3)
    short, = load_samples(path, tmp_path, seed=3, prompt_style="short")
    assert short.options == paper.options and short.solution == paper.solution  # the same shuffle
    assert short.text == SHORT_QUESTION_TEMPLATE.format(Question=paper.text.split("\nPlease think")[0])
    with pytest.raises(ValueError, match="prompt_style must be one of paper, short, got 'long'"):
        load_samples(path, tmp_path, prompt_style="long")
    with pytest.raises(ValueError, match="template must be 'train' or 'eval'"):
        load_samples(path, tmp_path, template="test")


def test_the_paper_style_prompt_byte_for_byte():
    """The default prompt as the authors' code writes it (grpo_care.md 2.1), spelled out rather than rebuilt from
    the templates, for a multiple-choice training prompt and a numerical evaluation one."""
    question = "What next? Options:\nA. up\nB. down\n"
    assert question_text(question) == (
        "What next? Options:\nA. up\nB. down\n\n"
        "Please think about this question as if you were a human pondering deeply. Engage in an internal dialogue "
        "using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', 'let's break it down', etc, or other "
        "natural language thought expressions It's encouraged to include self-reflection or verification in the "
        "reasoning process. Provide your detailed reasoning between the <think> </think> tags, and then give your "
        "final answer between the <answer> </answer> tags. Please provide only the single option letter (e.g., A, "
        "B, C, D, etc.) within the <answer> </answer> tags.")
    assert question_text("How many?", "numerical", template="eval").endswith(
        "Provide your detailed reasoning between the <think> and </think> tags, and then give your final answer "
        "between the <answer> and </answer> tags. Please provide the numerical value (e.g., 42 or 3.14) within the "
        "<answer> </answer> tags.")
