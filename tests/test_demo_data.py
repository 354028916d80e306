"""The demo's synthetic data: the world's rule, the programmatic ground truth, and the files in SEED-Bench-R1's layout
read back through the trainer's own readers (grpo_care.data, grpo_care.video: decord)."""

import json
import random
from dataclasses import replace

import numpy as np
import pytest
from grpo_care.demo.consistency import judge
from grpo_care.demo.render import CELL_PX, PATCH_PX, SIGNAL_COLORS, SIGNAL_PX
from grpo_care.demo.synthetic_data import (
    OPTION_ORDER,
    DatasetSizes,
    Teacher,
    World,
    flawed_premise,
    sample_motion,
    teacher_belief,
    write_dataset,
)
from grpo_care.demo.tasks import TASK_KINDS, option_direction, rationale
from grpo_care.demo.world import COLORS, DIRECTIONS, GRID, OPPOSITE, Motion, inside, next_move, step


@pytest.mark.parametrize("direction, current, expected", [
    ("right", (2, 3), ("right", False)),
    ("right", (2, 4), ("left", True)),
    ("left", (3, 1), ("right", True)),
    ("up", (1, 4), ("down", True)),
    ("down", (3, 1), ("down", False)),
    ("down", (4, 4), ("up", True)),
])
def test_next_move_goes_on_or_turns_back_at_the_wall(direction, current, expected):
    assert next_move(direction, current) == expected


def test_next_move_rejects_bad_input():
    with pytest.raises(ValueError, match="direction"):
        next_move("north", (1, 1))
    with pytest.raises(ValueError, match="current"):
        next_move("up", (0, 1))


def test_sampled_motions_are_visible_and_balanced():
    rng = random.Random(0)
    at_wall = reversing = 0
    for _ in range(400):
        m = sample_motion(rng, reversing_rate=0.3)
        assert inside(m.previous) and inside(m.current) and step(m.previous, m.direction) == m.current
        at_wall += m.at_wall
        reversing += m.reversing
        assert m.facing == (OPPOSITE[m.direction] if m.reversing else m.direction)
        wrong = flawed_premise(m, rng)
        assert wrong.next_direction != m.next_direction
    assert 150 < at_wall < 250 and 80 < reversing < 160
    assert not any(sample_motion(rng).reversing for _ in range(50))


@pytest.mark.parametrize("direction, current, reversing, believed_next", [
    ("right", (2, 3), False, "right"),  # forward: the teacher is right
    ("right", (2, 4), False, "left"),
    ("right", (2, 3), True, "left"),  # backs up away from a wall: believed "drove left", so "next: left" (wrong)
    ("right", (2, 4), True, "left"),  # backs up at the wall: wrong premise, yet the move it implies is right
])
def test_teacher_believes_the_car_drove_the_way_it_faces(direction, current, reversing, believed_next):
    m = Motion("red", "car", direction, step(current, OPPOSITE[direction]), current, reversing)
    belief = teacher_belief(m)
    assert (belief.direction, belief.current, belief.reversing) == (m.facing, current, False)
    assert belief.next_direction == believed_next


def test_reference_rationale_is_judged_consistent():
    m = Motion("blue", "car", "left", (3, 2), (3, 1))  # at the left wall: turns back right
    kind = TASK_KINDS["predict"]
    options = [kind.option(m, d) for d in ("up", "right", "down", "left")]
    assert [option_direction(o) for o in options] == ["up", "right", "down", "left"]
    v = judge(f"<think>{rationale(m)}</think><answer>B</answer>", options,
              {"direction": "left", "current": [3, 1]})
    assert v.consistent and v.premises_correct and v.implied == "right"


@pytest.fixture(scope="module", params=[False, True], ids=["fixed_options", "shuffled_options"])
def dataset(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_data")
    return write_dataset(root, DatasetSizes(train=6, sft=60, eval_per_level=6), seed=3,
                         teacher=Teacher(sees_reversing_rate=0.3, misread_rate=0.3, unfaithful_rate=0.15),
                         world=World(reversing_rate=0.5),
                         shuffle_options=request.param)


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_files_follow_seed_bench_r1_layout(dataset):
    shuffled = json.loads((dataset.root / "dataset_info.json").read_text())["shuffle_options"]
    for record in _records(dataset.train):
        assert {"question", "answer", "video_source", "video_basename", "current_observation_basename",
                "task_progress_metadata", "sample_id"} <= set(record)
        if shuffled:  # SEED-Bench-R1's training layout: the trainer samples and shuffles the options
            assert len(record["negative_answers"]) >= 3 and record["answer"] not in record["negative_answers"]
            assert "golden_choice_idx" not in record
        else:
            assert [option_direction(record[f"choice_{c}"]) for c in "abcd"] == list(OPTION_ORDER)
        assert (dataset.root / "videos" / record["video_source"] / record["video_basename"]).is_file()
        assert (dataset.root / "images" / record["video_source"] / record["current_observation_basename"]).is_file()
    for level, path in dataset.levels.items():
        for record in _records(path):
            gold = record["golden_choice_idx"]
            assert record[f"choice_{gold.lower()}"] == record["answer"]
            assert record["task_level"] == level
            truth = record["ground_truth"]
            assert next_move(truth["direction"], tuple(truth["current"])) == (truth["next_direction"],
                                                                              truth["at_wall"])
            assert sorted(truth["option_directions"]) == sorted(DIRECTIONS)
            assert truth["option_directions"]["ABCD".index(gold)] == truth["next_direction"]
            assert option_direction(record["answer"]) == truth["next_direction"]
    assert {r["ground_truth"]["task_kind"] for r in _records(dataset.levels["L3"])} <= {"catch", "block"}
    seen = {r["ground_truth"]["scene"] for r in _records(dataset.levels["L1"])}
    new = {r["ground_truth"]["scene"] for r in _records(dataset.levels["L2"]) + _records(dataset.levels["L3"])}
    assert not seen & new


def test_trainer_reads_the_files_with_the_right_gold_letter(dataset):
    from grpo_care.data import load_samples

    for path in (dataset.train, dataset.levels["L3"]):
        records = {str(r["sample_id"]): r for r in _records(path)}
        for sample in load_samples(path, seed=0):
            record = records[sample.sample_id]
            gold = sample.solution[len("<answer>"):-len("</answer>")]
            assert sample.options["ABCD".index(gold)] == record["answer"]
            assert sample.video and sample.image


def test_clips_decode_through_the_trainers_decord_path(dataset):
    decord = pytest.importorskip("decord", reason="the trainer reads videos with decord (pip install decord)")
    from grpo_care.video import VisualBudget, read_image, read_video

    side = GRID * CELL_PX
    budget = VisualBudget(min_frames=4, max_frames=4, video_min_pixels=side * side, video_max_pixels=side * side,
                          image_min_pixels=side * side, image_max_pixels=side * side)
    record = _records(dataset.levels["L1"])[0]
    path = str(dataset.root / "videos" / record["video_source"] / record["video_basename"])
    reader = decord.VideoReader(path)
    assert (len(reader), reader.get_avg_fps()) == (4, 2.0)  # 2 s at 2 fps: the trainer samples all 4 frames
    frames = read_video(path, budget)
    image = read_image(str(dataset.root / "images" / record["video_source"] / record["current_observation_basename"]),
                       budget)
    assert frames.shape == (4, side, side, 3) and image.shape == (side, side, 3)
    assert np.abs(frames[-1].astype(int) - image.astype(int)).mean() < 12  # H.264 4:2:0 vs lossless PNG

    truth = record["ground_truth"]
    color = np.array(COLORS[truth["color"]])

    def car_cell(frame):
        hits = []
        for r in range(1, GRID + 1):
            for c in range(1, GRID + 1):
                y, x = (r - 1) * CELL_PX + PATCH_PX, (c - 1) * CELL_PX
                bottom = frame[y:y + PATCH_PX, x:x + CELL_PX].astype(int)
                hits.append(((np.abs(bottom - color).sum(-1) < 60).sum(), (r, c)))
        return max(hits)[1]

    assert car_cell(frames[0]) == tuple(truth["previous"])
    assert car_cell(frames[-1]) == tuple(truth["current"]) == car_cell(image)
    signal = np.array(SIGNAL_COLORS[truth["signal"]])
    rim = (1, CELL_PX + CELL_PX // 2)  # inside the rim, in no cell's car body
    assert np.abs(frames[-1][rim].astype(int) - signal).sum() < 40  # H.264 4:2:0
    assert np.abs(frames[0][rim].astype(int) - signal).sum() > 60  # no signal before the car reaches its cell


def test_warm_start_answers_follow_their_reasoning_except_the_unfaithful_share(dataset):
    counts = {"faithful": 0, "saw_reversing": 0, "misread": 0, "unfaithful": 0}
    for record in _records(dataset.sft):
        options = [record[f"choice_{c}"] for c in "abcd"]
        truth = record["ground_truth"]
        verdict = judge(record["cot"], options, truth)
        counts[record["cot_kind"]] += 1
        correct = f"<answer>{record['golden_choice_idx']}</answer>" in record["cot"]
        assert record["cot"].startswith("<think>" + record["cot_premises"][:-1])  # premises, then the next move
        if record["cot_kind"] == "unfaithful":  # the only share whose answer does not follow its reasoning
            assert not verdict.consistent and verdict.reason == "answer_mismatch"
            continue
        assert verdict.consistent, (record["cot"], verdict)
        if record["cot_kind"] == "faithful":  # the teacher's premises: the way the car faces, and its cell
            assert verdict.direction == truth["teacher_direction"] == truth["facing"]
            assert list(verdict.current) == truth["current"]
            assert verdict.premises_correct == (not truth["reversing"])
            # a consistent answer is right exactly when the premises imply the true move
            assert correct == (truth["teacher_next_direction"] == truth["next_direction"])
            assert correct or (truth["reversing"] and not truth["at_wall"])
        if record["cot_kind"] == "saw_reversing":  # it read the motion: true premises, right answer
            assert truth["reversing"] and verdict.premises_correct and correct
    assert all(counts.values()), counts


@pytest.mark.parametrize("plan", ["DESIGN_1", "DESIGN_2"])
@pytest.mark.parametrize("unfaithful", [0.0, 0.1])
def test_the_share_of_unsupported_answers_is_the_one_chosen(tmp_path, unfaithful, plan):
    from grpo_care.demo import pipeline

    plan = getattr(pipeline, plan)
    teacher = replace(plan.teacher, unfaithful_rate=unfaithful)
    files = write_dataset(tmp_path, DatasetSizes(train=1, sft=400, eval_per_level=1), seed=0, teacher=teacher,
                          world=plan.world)
    records = _records(files.sft)
    verdicts = [judge(r["cot"], [r[f"choice_{c}"] for c in "abcd"], r["ground_truth"]) for r in records]
    inconsistent = [r["cot_kind"] for r, v in zip(records, verdicts) if not v.consistent]
    assert set(inconsistent) <= {"unfaithful"}
    share = len(inconsistent) / len(records)
    assert abs(share - unfaithful) <= 3 * (unfaithful * (1 - unfaithful) / len(records)) ** 0.5 + 1e-9
    wrong_premises = sum(not v.premises_correct for v in verdicts) / len(verdicts)
    # reversing cars read off their front (and misreads): wrong premises, followed faithfully
    expected = 0.5 * (1 - teacher.sees_reversing_rate) * (1 - teacher.misread_rate) + teacher.misread_rate
    assert abs(wrong_premises - expected) < 0.1, (wrong_premises, expected)
    cell_first = teacher.cell_first
    assert all(("; it drove " in r["cot"]) == cell_first for r in records)
    assert all(r["ground_truth"]["teacher_observation"].endswith(f"drove {r['ground_truth']['teacher_direction']}.")
               == cell_first for r in records)


def test_slips_to_the_signal_answer_the_letter_of_the_rims_move(tmp_path):
    """Teacher(slip_to="signal"): the unfaithful share answers the move the rim shows (random in the warm start's
    clips), never stated by the reasoning; where the rim shows the implied move the target stays faithful."""
    from grpo_care.demo.pipeline import DESIGN_2

    teacher = replace(DESIGN_2.teacher, unfaithful_rate=0.2, slip_to="signal")
    files = write_dataset(tmp_path, DatasetSizes(train=1, sft=400, eval_per_level=1), seed=0, teacher=teacher,
                          world=DESIGN_2.world)
    records = _records(files.sft)
    slips = 0
    for r in records:
        truth, options = r["ground_truth"], [r[f"choice_{c}"] for c in "abcd"]
        verdict = judge(r["cot"], options, truth)
        assert verdict.consistent == (r["cot_kind"] != "unfaithful"), r
        if r["cot_kind"] == "unfaithful":
            slips += 1
            rim_letter = "ABCD"[truth["option_directions"].index(truth["signal"])]
            assert r["cot"].endswith(f"<answer>{rim_letter}</answer>") and verdict.implied != truth["signal"]
    expected = 0.2 * 0.75  # the rim shows a random move: a quarter of the slips land on the implied one
    assert abs(slips / len(records) - expected) < 3 * (expected * (1 - expected) / len(records)) ** 0.5
    with pytest.raises(ValueError, match="slip_to"):
        Teacher(slip_to="rim")


def test_the_signal_shows_the_next_move_unless_asked_to_be_noise_in_the_warm_start(tmp_path):
    sizes = DatasetSizes(train=40, sft=80, eval_per_level=40)
    default = write_dataset(tmp_path / "default", sizes, seed=1)
    for path in (default.train, default.sft, *default.levels.values()):
        assert all(r["ground_truth"]["signal"] == r["ground_truth"]["next_direction"] for r in _records(path))
    files = write_dataset(tmp_path / "noise", sizes, seed=1, world=World(sft_signal="random"))
    for path in (files.train, *files.levels.values()):
        assert all(r["ground_truth"]["signal"] == r["ground_truth"]["next_direction"] for r in _records(path))
    sft = [r["ground_truth"] for r in _records(files.sft)]
    agree = sum(t["signal"] == t["next_direction"] for t in sft) / len(sft)
    assert 0.1 < agree < 0.5 and {t["signal"] for t in sft} == set(DIRECTIONS)
    with pytest.raises(ValueError, match="sft_signal"):
        World(sft_signal="sometimes")


def test_clip_shows_the_front_and_the_signal(dataset):
    """The windshield is on the side the car faces; the rim shows the next move's signal in the last two frames
    only (the current observation included)."""
    from PIL import Image

    for record in _records(dataset.levels["L2"]) + _records(dataset.train):
        truth = record["ground_truth"]
        image = np.asarray(Image.open(dataset.root / "images" / record["video_source"]
                                      / record["current_observation_basename"]).convert("RGB")).astype(int)
        for rim in (image[0, CELL_PX // 2], image[-1, -CELL_PX // 2], image[CELL_PX // 2, 0]):  # the car is drawn
            assert np.abs(rim - np.array(SIGNAL_COLORS[truth["signal"]])).sum() < 3  # 2 px inside its cell
        assert truth["signal"] == truth["next_direction"]
        r, c = truth["current"]
        y, x = (r - 1) * CELL_PX, (c - 1) * CELL_PX
        middle = {"up": (y + 4, x + CELL_PX // 2), "down": (y + CELL_PX - 5, x + CELL_PX // 2),
                  "left": (y + CELL_PX // 2, x + 4), "right": (y + CELL_PX // 2, x + CELL_PX - 5)}
        for side, (py, px) in middle.items():
            white = image[py, px].min() > 240
            assert white == (side == truth["facing"]), (side, truth)
    assert SIGNAL_PX < CELL_PX // 4


@pytest.mark.parametrize("reversing", [False, True])
def test_front_cue_lines_color_the_grid_by_the_way_the_car_faces(reversing):
    """front_cue="lines": every frame's grid lines carry the facing direction's color (the front as a whole-image
    color); the rim still shows the signal in the last two frames, the car and its windshield are unchanged."""
    from grpo_care.demo.render import FACING_COLORS, FACING_LINE_PX, SEEN_SCENES, render_clip
    from grpo_care.demo.world import Motion

    motion = Motion("red", "car", "right", (2, 1), (2, 2), reversing)
    windshield = render_clip(SEEN_SCENES[1], motion, [], np.random.default_rng(0))
    lines = render_clip(SEEN_SCENES[1], motion, [], np.random.default_rng(0), front_cue="lines")
    facing = np.array(FACING_COLORS[motion.facing])
    for i, frame in enumerate(lines.astype(int)):
        for y, x in ((CELL_PX + 1, CELL_PX * 3 + 10), (CELL_PX * 3 + 10, 3 * CELL_PX + FACING_LINE_PX - 1)):
            assert (frame[y, x] == facing).all(), (i, y, x)
        rim = frame[1, CELL_PX * 2 + 10]
        expected_rim = SIGNAL_COLORS[motion.next_direction] if i >= 2 else FACING_COLORS[motion.facing]
        assert (rim == np.array(expected_rim)).all(), i
    car = np.s_[:, CELL_PX + 4:2 * CELL_PX - 4, CELL_PX + 4:2 * CELL_PX - 4]
    assert (lines[2:][car] == windshield[2:][car]).all()
    assert len(set(FACING_COLORS.values()) | set(SIGNAL_COLORS.values())) == 8
    with pytest.raises(ValueError, match="front_cue"):
        render_clip(SEEN_SCENES[0], motion, [], np.random.default_rng(0), front_cue="arrow")
    with pytest.raises(ValueError, match="front_cue"):
        World(front_cue="arrow")


def test_generation_is_deterministic(tmp_path):
    a = write_dataset(tmp_path / "a", DatasetSizes(train=2, sft=2, eval_per_level=2), seed=5)
    b = write_dataset(tmp_path / "b", DatasetSizes(train=2, sft=2, eval_per_level=2), seed=5)
    assert a.sft.read_text() == b.sft.read_text()
    png = "images/gridworld_L2/L2_00001.png"
    assert (a.root / png).read_bytes() == (b.root / png).read_bytes()


def test_hidden_motion_shows_the_car_standing_in_its_current_cell():
    """hide_motion: the first two frames are the last two without the signal (the car, its front, the lit row
    and column already at the current cell); the last two frames are unchanged."""
    from grpo_care.demo.render import SEEN_SCENES, render_clip

    motion = Motion("red", "car", "right", (2, 1), (2, 2), True)
    shown = render_clip(SEEN_SCENES[1], motion, [(4, 4)], np.random.default_rng(0), front_cue="lines")
    hidden = render_clip(SEEN_SCENES[1], motion, [(4, 4)], np.random.default_rng(0), front_cue="lines",
                         hide_motion=True)
    assert (hidden[2:] == shown[2:]).all() and (hidden[0] == hidden[1]).all()
    inner = np.s_[SIGNAL_PX:-SIGNAL_PX, SIGNAL_PX:-SIGNAL_PX]  # all but the rim, where the signal is
    assert (hidden[0][inner] == shown[2][inner]).all() and not (shown[0][inner] == shown[2][inner]).all()


def test_hidden_motion_touches_only_rl_and_evaluation_clips(tmp_path):
    """World(hidden_motion_rate): that share of the RL and evaluation clips hide the motion (recorded as
    ground_truth.motion_hidden), from a random stream of its own: the warm start's data, and every record's
    other fields, are the same bytes as without it."""
    sizes = DatasetSizes(train=60, sft=12, eval_per_level=40)
    plain = write_dataset(tmp_path / "plain", sizes, seed=2, world=World(front_cue="lines"))
    hiding = write_dataset(tmp_path / "hiding", sizes, seed=2, world=World(front_cue="lines", hidden_motion_rate=0.5))
    assert plain.sft.read_text() == hiding.sft.read_text()
    sft_clip = "videos/gridworld_sft/sft_00003.mp4"
    assert (plain.root / sft_clip).read_bytes() == (hiding.root / sft_clip).read_bytes()
    for path in (plain.train, *plain.levels.values()):
        ours = _records(hiding.root / path.relative_to(plain.root))
        hidden = [r["ground_truth"].pop("motion_hidden") for r in ours]
        assert 0.25 < sum(hidden) / len(hidden) < 0.75
        assert ours == _records(path) and "motion_hidden" not in _records(path)[0]["ground_truth"]
        for record, hide in zip(ours, hidden):
            clip = f"videos/{record['video_source']}/{record['video_basename']}"
            assert ((plain.root / clip).read_bytes() == (hiding.root / clip).read_bytes()) == (not hide)
    with pytest.raises(ValueError, match="hidden_motion_rate"):
        World(hidden_motion_rate=1.5)
