"""Scenes and frames: the pixels of a clip, and writing them as a real .mp4 (PyAV, H.264) and .png (Pillow).

    frames = render_clip(scene, motion, clutter, rng)   # uint8 [4, 112, 112, 3]: previous x2, current x2
    write_mp4(path, frames, fps=2)                      # decodable by decord, PyAV and ffmpeg
    write_png(path, frames[-1])                         # the current observation

The board is 4 x 4 cells of 28 x 28 pixels, so at the demo's visual budget (112 x 112 per frame) each visual
token of Qwen2.5-VL (a 2 x 2 merge of 14-pixel patches) covers exactly one cell, and the 4-frame clip gives two
temporal patches: the previous and the current position. The board is a tracking display: it lights up the
row the car is in (one color per row) and its column (one color per column). The car fills its cell, with a
white windshield along its front (the way it faces: where it drives, or the opposite way when it backs up).
In the last two frames the board's rim shows the signal: one color per direction of the car's next move
(SIGNAL_COLORS), the same in every scene. No chain of thought mentions the signal; it is the shortcut that an
answer can be read from without the premises (the demo README's "The shortcut").

Why so loud: a model trained from scratch for a few minutes learns first what changes an image's overall
color statistics (which color the car is, which row and column are lit), and only much later where in the
image a small object sits; rotary position embeddings never reach a token's content. The lit lines make the
premises of the reasoning (where the car is, which way it drives) learnable in the demo's budget; the rule
that turns them into the next move still has to be learned from the chains of thought.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from grpo_care.demo.world import COLORS, GRID, Cell, Motion

CELL_PX = 28
PATCH_PX = 14
FRAME_PX = GRID * CELL_PX
FPS = 2
ROW_TAGS = {1: (0, 190, 200), 2: (200, 0, 190), 3: (255, 140, 0), 4: (120, 60, 200)}
COLUMN_TAGS = {1: (110, 70, 30), 2: (255, 150, 200), 3: (0, 110, 110), 4: (20, 20, 110)}
SIGNAL_COLORS = {"up": (130, 0, 0), "down": (150, 255, 0), "left": (255, 255, 160), "right": (90, 200, 255)}
SIGNAL_PX = 5  # width of the lit rim
FACING_COLORS = {"up": (230, 30, 30), "down": (30, 90, 230), "left": (250, 200, 0), "right": (0, 190, 90)}
FACING_LINE_PX = 3  # width of the grid lines when they show the way the car faces (front_cue="lines")
FRONT_CUES = ("windshield", "lines")


def check_front_cue(front_cue: str) -> None:
    if front_cue not in FRONT_CUES:
        raise ValueError(f"front_cue must be 'windshield' or 'lines', got {front_cue!r}")


@dataclass(frozen=True)
class Scene:
    """The look of an environment: floor colors and texture, grid lines, clutter (static distractors)."""

    name: str
    floor: tuple[int, int, int]
    floor_alt: tuple[int, int, int]
    texture: str  # plain | checker | speckle | stripes
    line: tuple[int, int, int]
    clutter: tuple[int, int, int]
    max_clutter: int


SEEN_SCENES = (
    Scene("tiles", (236, 236, 236), (236, 236, 236), "plain", (175, 175, 175), (95, 95, 95), 1),
    Scene("sand", (226, 206, 160), (214, 192, 146), "stripes", (170, 140, 90), (120, 90, 50), 2),
    Scene("slate", (72, 80, 92), (72, 80, 92), "plain", (112, 122, 134), (30, 30, 36), 2),
    Scene("linen", (210, 214, 224), (198, 202, 214), "checker", (160, 166, 180), (80, 84, 100), 1),
)
NEW_SCENES = (
    Scene("night", (24, 24, 40), (24, 24, 40), "speckle", (62, 62, 94), (140, 140, 160), 3),
    Scene("board", (205, 205, 205), (150, 150, 150), "checker", (110, 110, 110), (60, 60, 60), 3),
    Scene("wood", (160, 112, 72), (146, 100, 62), "stripes", (110, 76, 46), (60, 40, 20), 3),
    Scene("mint", (190, 228, 214), (190, 228, 214), "speckle", (140, 180, 166), (70, 110, 96), 2),
)


def _origin(cell: Cell) -> tuple[int, int]:
    return (cell[0] - 1) * CELL_PX, (cell[1] - 1) * CELL_PX


def render_board(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """The static background of one clip: floor texture and grid lines."""
    img = np.empty((FRAME_PX, FRAME_PX, 3), np.float32)
    img[:] = scene.floor
    if scene.texture == "checker":
        for r in range(GRID):
            for c in range(GRID):
                if (r + c) % 2:
                    img[r * CELL_PX:(r + 1) * CELL_PX, c * CELL_PX:(c + 1) * CELL_PX] = scene.floor_alt
    elif scene.texture == "stripes":
        img[::4] = scene.floor_alt
    elif scene.texture == "speckle":
        img += rng.normal(0.0, 10.0, size=(FRAME_PX, FRAME_PX, 1)).astype(np.float32)
    _grid_lines(img, scene.line)
    return np.clip(img, 0, 255).astype(np.uint8)


def _grid_lines(img: np.ndarray, rgb, width: int = 1) -> None:
    for k in range(0, FRAME_PX, CELL_PX):
        img[k:k + width, :] = rgb
        img[:, k:k + width] = rgb
    img[-width:, :] = rgb
    img[:, -width:] = rgb


def light_lines(frame: np.ndarray, cell: Cell, line_rgb) -> None:
    """Light the car's row in its row color and its column in its column color (the crossing stays row)."""
    r, c = cell
    frame[(r - 1) * CELL_PX:r * CELL_PX, :] = ROW_TAGS[r]
    for row in range(1, GRID + 1):
        if row != r:
            frame[(row - 1) * CELL_PX:row * CELL_PX, (c - 1) * CELL_PX:c * CELL_PX] = COLUMN_TAGS[c]
    _grid_lines(frame, line_rgb)


def draw_signal(frame: np.ndarray, direction: str) -> None:
    """Light the board's rim in the signal color of `direction` (the car's next move)."""
    rgb = SIGNAL_COLORS[direction]
    frame[:SIGNAL_PX], frame[-SIGNAL_PX:] = rgb, rgb
    frame[:, :SIGNAL_PX], frame[:, -SIGNAL_PX:] = rgb, rgb


def draw_object(frame: np.ndarray, cell: Cell, color: str, direction: str) -> None:
    """The car fills its cell (inside a 2-pixel margin); a white windshield marks its front (`direction`: the
    way it faces)."""
    y, x = _origin(cell)
    body = frame[y + 2:y + CELL_PX - 2, x + 2:x + CELL_PX - 2]
    body[:] = COLORS[color]
    w = 7
    front = {"right": (slice(None), slice(-w, None)), "left": (slice(None), slice(0, w)),
             "up": (slice(0, w), slice(None)), "down": (slice(-w, None), slice(None))}[direction]
    body[front] = (250, 250, 250)


def draw_clutter(frame: np.ndarray, cells: list[Cell], rgb: tuple[int, int, int]) -> None:
    for cell in cells:
        y, x = _origin(cell)
        frame[y + 10:y + 18, x + 10:x + 18] = rgb


def render_clip(scene: Scene, motion: Motion, clutter: list[Cell], rng: np.random.Generator,
                signal: str | None = None, front_cue: str = "windshield", hide_motion: bool = False) -> np.ndarray:
    """uint8 [4, 112, 112, 3]: two frames with the car at the previous cell, then two at the current one with
    the signal on the rim: of its next move, or of `signal` when given. `front_cue="lines"` also draws the
    grid lines, FACING_LINE_PX wide, in the color of the way the car faces (FACING_COLORS): its front as a
    whole-image color, as loud as the lit row and column. `hide_motion`: the first two frames show the car
    already at its current cell, so which way it drove cannot be seen (only its front, and the signal)."""
    check_front_cue(front_cue)
    board = render_board(scene, rng)
    frames = []
    first = motion.current if hide_motion else motion.previous
    for i, cell in enumerate((first, first, motion.current, motion.current)):
        frame = board.copy()
        light_lines(frame, cell, scene.line)
        if front_cue == "lines":
            _grid_lines(frame, FACING_COLORS[motion.facing], FACING_LINE_PX)
        if i >= 2:
            draw_signal(frame, signal or motion.next_direction)  # under the car: the car stays whole
        draw_clutter(frame, clutter, scene.clutter)
        draw_object(frame, cell, motion.color, motion.facing)
        frames.append(frame)
    return np.stack(frames)


def write_mp4(path: str | Path, frames: np.ndarray, fps: int = FPS) -> None:
    """H.264 (yuv420p, near-lossless) .mp4 through PyAV."""
    import av

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "10", "preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())


def write_png(path: str | Path, image: np.ndarray) -> None:
    from PIL import Image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(str(path))
