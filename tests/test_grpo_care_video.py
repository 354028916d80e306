"""grpo_care.video: frame sampling and pixel budgets of grpo_care.md 2.3, decord with a PyAV fallback."""

import numpy as np
import pytest
from grpo_care import video
from grpo_care.video import (
    VideoReadError,
    VisualBudget,
    frame_indices,
    num_frames,
    read_image,
    read_video,
    smart_resize,
)

pytest.importorskip("av", reason="writing test clips needs PyAV (pip install av)")


@pytest.mark.parametrize(
    ("total", "fps", "expected"),
    [
        (120, 30.0, 8),  # 4 s at 2 fps
        (600, 30.0, 16),  # capped at 16
        (165, 30.0, 10),  # 11 -> floored to even
        (10, 30.0, 4),  # raised to the minimum of 4
        (3, 30.0, 2),  # but never more than the video has (rounded down to even)
    ],
)
def test_num_frames(total, fps, expected):
    assert num_frames(total, fps, VisualBudget()) == expected


def test_too_short_video_and_indices():
    with pytest.raises(VideoReadError, match="too short"):
        num_frames(1, 30.0, VisualBudget())
    assert frame_indices(120, 8) == [0, 17, 34, 51, 68, 85, 102, 119]


def test_smart_resize_budgets():
    budget = VisualBudget()
    h, w = video.frame_pixels(480, 640, 16, budget)
    assert h % 28 == 0 and w % 28 == 0
    assert 128 * 28 * 28 * 0.85 < h * w <= int(128 * 28 * 28 * 1.05)  # 94k-105k px per frame
    h, w = smart_resize(1080, 1920, 28, budget.image_min_pixels, budget.image_max_pixels)
    assert h * w <= 256 * 28 * 28 and (h, w) == (336, 588)
    assert smart_resize(10, 10, 28, 4 * 28 * 28, 10**9) == (56, 56)


def test_read_video_with_decord_and_pyav_agree(tmp_path, monkeypatch):
    from grpo_care.synthetic import write_video

    path = str(tmp_path / "clip.mp4")
    write_video(path, num_frames=12, height=64, width=96, fps=4)
    budget = VisualBudget(video_min_pixels=28 * 28 * 4, video_max_pixels=28 * 28 * 4)
    frames = read_video(path, budget)
    assert frames.dtype == np.uint8 and frames.shape == (6, 28, 56, 3)  # 3 s at 2 fps
    clip = video.read_video_clip(path, budget)
    assert np.array_equal(clip.frames, frames) and clip.sampled_fps == 2.0
    capped = video.read_video_clip(path, VisualBudget(max_frames=4, video_min_pixels=3136, video_max_pixels=3136))
    assert clip.frames.shape[0] == 6 and capped.frames.shape[0] == 4 and capped.sampled_fps == pytest.approx(4 / 3)
    monkeypatch.setattr(video, "_read_decord", lambda *a: (_ for _ in ()).throw(ImportError("no decord")))
    fallback = read_video(path, budget)
    assert fallback.shape == frames.shape
    assert video.read_video_clip(path, budget).sampled_fps == 2.0  # PyAV: the same rate
    assert np.abs(fallback.astype(int) - frames.astype(int)).mean() < 2.0

    # the fallback keeps only the sampled frames; a container that states no count, or a wrong one, still
    # gets the frames that the true count samples
    decoded, kept = video._decode_pyav(path, keep={0, 5})
    assert decoded == 12 and sorted(kept) == [0, 5]
    import av

    for stated in (0, 30, 7):
        monkeypatch.setattr(av.video.stream.VideoStream, "frames", property(lambda self, n=stated: n))
        assert np.array_equal(read_video(path, budget), fallback), stated


def test_missing_or_corrupt_media_raise_video_read_error(tmp_path):
    with pytest.raises(VideoReadError, match="video not found"):
        read_video(str(tmp_path / "nope.mp4"), VisualBudget())
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00not a video" * 10)
    with pytest.raises(VideoReadError, match="cannot decode video"):
        read_video(str(bad), VisualBudget())
    with pytest.raises(VideoReadError, match="cannot read image"):
        read_image(str(tmp_path / "nope.png"), VisualBudget())


def test_read_image_budget(tmp_path):
    from grpo_care.synthetic import write_image

    write_image(tmp_path / "a.png", height=1080, width=1920)
    image = read_image(str(tmp_path / "a.png"), VisualBudget())
    assert image.shape == (336, 588, 3) and image.flags.writeable
