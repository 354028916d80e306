"""Frames and images at GRPO-CARE's visual budget (grpo_care.md 2.3, qwen_vl_utils' rules).

    frames = read_video(path, VisualBudget())     # uint8 [T, H, W, 3], T even, H and W multiples of 28
    clip = read_video_clip(path, VisualBudget())  # the same frames and the rate they were sampled at
    image = read_image(path, VisualBudget())      # uint8 [H, W, 3]

Frame count: `nframes = clamp(total / video_fps * fps, min_frames, min(max_frames, total))` floored to an even
number (min rounded up, max down), frames at `linspace(0, total - 1, nframes).round()`. Per-frame pixels:
`smart_resize` with `max_pixels = max(min(video_max_pixels, video_total_pixels / nframes * 2),
1.05 * video_min_pixels)`. Videos are decoded with decord, or PyAV when decord is missing or fails; both are
optional (`pip install care-kernels[video]`) and imported on first use. Frames are resized here (bicubic,
antialiased) and handed to the processor with its own resize off, so the budget lives in one place.

The sampled rate is `nframes / total * video_fps`, qwen_vl_utils' `sample_fps` (2.0 for a clip at the 2 fps
budget, less for a clip capped at max_frames); a container that states no frame rate gives `fps` (the rate
asked for). Evaluation can give it to M-RoPE (`eval_real_video_timing`, rollout.encode_prompts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

IMAGE_FACTOR = 28
FRAME_FACTOR = 2


class VideoReadError(RuntimeError):
    """A missing, unreadable or too short video or image; the trainer skips the sample and counts it."""


@dataclass(frozen=True)
class VisualBudget:
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 16
    video_min_pixels: int = 128 * 28 * 28
    video_max_pixels: int = 128 * 28 * 28
    video_total_pixels: int = int(128000 * 28 * 28 * 0.9)
    image_min_pixels: int = 4 * 28 * 28
    image_max_pixels: int = 256 * 28 * 28

    @classmethod
    def from_config(cls, config, max_frames: int | None = None) -> VisualBudget:
        return cls(
            fps=config.video_fps,
            min_frames=config.video_min_frames,
            max_frames=max_frames or config.video_max_frames,
            video_min_pixels=config.video_min_pixels,
            video_max_pixels=config.video_max_pixels,
            video_total_pixels=config.video_total_pixels,
            image_min_pixels=config.image_min_pixels,
            image_max_pixels=config.image_max_pixels,
        )


def smart_resize(
    height: int,
    width: int,
    factor: int = IMAGE_FACTOR,
    min_pixels: int = 4 * 28 * 28,
    max_pixels: int = 16384 * 28 * 28,
) -> tuple[int, int]:
    """(h, w) rounded to multiples of `factor` with `min_pixels <= h * w <= max_pixels`, aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise VideoReadError(
            f"aspect ratio must be below 200, got {max(height, width) / min(height, width):.0f}"
        )
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def num_frames(total_frames: int, video_fps: float, budget: VisualBudget) -> int:
    """How many frames to sample: fps-based, clamped to [min, min(max, total)], even."""
    min_frames = math.ceil(budget.min_frames / FRAME_FACTOR) * FRAME_FACTOR
    max_frames = math.floor(min(budget.max_frames, total_frames) / FRAME_FACTOR) * FRAME_FACTOR
    wanted = total_frames / video_fps * budget.fps if video_fps > 0 else min_frames
    n = math.floor(min(max(wanted, min_frames), max_frames) / FRAME_FACTOR) * FRAME_FACTOR
    if n < FRAME_FACTOR or n > total_frames:
        raise VideoReadError(f"video too short: {total_frames} frames, need at least {FRAME_FACTOR}")
    return n


def frame_indices(total_frames: int, n: int) -> list[int]:
    return torch.linspace(0, total_frames - 1, n).round().long().tolist()


def frame_pixels(height: int, width: int, n: int, budget: VisualBudget) -> tuple[int, int]:
    max_pixels = max(
        min(budget.video_max_pixels, budget.video_total_pixels / n * FRAME_FACTOR),
        int(budget.video_min_pixels * 1.05),
    )
    return smart_resize(height, width, IMAGE_FACTOR, budget.video_min_pixels, max_pixels)


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [T, H, W, 3] -> uint8 [T, height, width, 3], bicubic, antialiased (torchvision's default)."""
    if frames.shape[1:3] == (height, width):
        return np.ascontiguousarray(frames)
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(
        x, size=(height, width), mode="bicubic", antialias=True, align_corners=False
    )
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


@dataclass(frozen=True)
class VideoClip:
    frames: np.ndarray  # uint8 [T, H, W, 3]
    sampled_fps: float  # frames per second of video time that the T frames stand for


def sampled_fps(total_frames: int, video_fps: float, n: int, budget: VisualBudget) -> float:
    """qwen_vl_utils' sample_fps: n frames over total / video_fps seconds (the budget's fps when unknown)."""
    return n / total_frames * video_fps if video_fps > 0 and total_frames > 0 else budget.fps


def _read_decord(path: str, budget: VisualBudget) -> tuple[np.ndarray, float]:
    import decord

    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    total, fps = len(reader), float(reader.get_avg_fps())
    n = num_frames(total, fps, budget)
    return reader.get_batch(frame_indices(total, n)).asnumpy(), sampled_fps(total, fps, n, budget)


def _read_pyav(path: str, budget: VisualBudget) -> tuple[np.ndarray, float]:
    """Keeps only the sampled frames in memory (a long clip's decoded frames would not fit). The count comes from
    the container when it states one, else from a first decoding pass; a count that proves wrong is redone."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        total = int(stream.frames or 0)
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
    if total <= 0:
        total = _decode_pyav(path, keep=set())[0]
    if total <= 0:
        raise VideoReadError(f"no decodable frames in {path}")
    n = num_frames(total, fps, budget)
    picked = frame_indices(total, n)
    decoded, kept = _decode_pyav(path, keep=set(picked))
    if decoded != total:  # the container's count was off: sample from the true one
        if decoded <= 0:
            raise VideoReadError(f"no decodable frames in {path}")
        total, n = decoded, num_frames(decoded, fps, budget)
        picked = frame_indices(total, n)
        kept = _decode_pyav(path, keep=set(picked))[1]
    return np.stack([kept[i] for i in picked]), sampled_fps(total, fps, n, budget)


def _decode_pyav(path: str, keep: set[int]) -> tuple[int, dict[int, np.ndarray]]:
    """(frames decoded, {index: RGB uint8 [H, W, 3]} for the indices in `keep`)."""
    import av

    kept, count = {}, 0
    with av.open(path) as container:
        for count, frame in enumerate(container.decode(container.streams.video[0]), start=1):
            if count - 1 in keep:
                kept[count - 1] = frame.to_ndarray(format="rgb24")
    return count, kept


def read_video(path: str, budget: VisualBudget) -> np.ndarray:
    """Sampled, resized frames uint8 [T, H, W, 3]; VideoReadError if the file is missing or undecodable."""
    return read_video_clip(path, budget).frames


def read_video_clip(path: str, budget: VisualBudget) -> VideoClip:
    """read_video's frames and the rate they were sampled at; VideoReadError as read_video."""
    import os

    if not os.path.isfile(path):
        raise VideoReadError(f"video not found: {path}")
    errors = []
    for reader in (_read_decord, _read_pyav):
        try:
            frames, fps = reader(path, budget)
            break
        except VideoReadError:
            raise
        except ImportError as e:
            errors.append(f"{reader.__name__[6:]} not installed ({e.name})")
        except Exception as e:  # noqa: BLE001 - decoders raise anything on a corrupt file
            errors.append(f"{reader.__name__[6:]}: {type(e).__name__}: {e}")
    else:
        raise VideoReadError(f"cannot decode video {path}: " + "; ".join(errors))
    height, width = frame_pixels(frames.shape[1], frames.shape[2], frames.shape[0], budget)
    return VideoClip(resize_frames(frames, height, width), fps)


def read_image(path: str, budget: VisualBudget) -> np.ndarray:
    """RGB uint8 [H, W, 3] resized into [image_min_pixels, image_max_pixels]; VideoReadError if unreadable."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except ImportError:
        raise
    except Exception as e:  # noqa: BLE001
        raise VideoReadError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
    height, width = smart_resize(
        rgb.height, rgb.width, IMAGE_FACTOR, budget.image_min_pixels, budget.image_max_pixels
    )
    if (height, width) != (rgb.height, rgb.width):
        rgb = rgb.resize((width, height), Image.BICUBIC)
    return np.array(rgb, dtype=np.uint8)  # a writable copy (the processor wraps it in a tensor)
