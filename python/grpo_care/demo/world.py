"""The demo's world: a colored car driving on a 4 x 4 board, and the rule that says what it does next.

    motion = Motion(color="red", shape="car", direction="right", previous=(2, 2), current=(2, 3))
    next_move("right", (2, 3))    # -> ("right", False): it keeps driving right, to (2, 4)
    next_move("right", (2, 4))    # -> ("left", True): it is at the right wall, so it turns back

Cells are (row, column), 1-based, row 1 at the top. The car drives one cell per step in a straight line; at
the wall it turns back. This rule is the programmatic ground truth of both the answer and the reasoning: a
`<think>` that states the direction the car drove and the cell it is in implies exactly one next move.

Some cars back up (`reversing`): they drive the way their tail points, so the way a car faces (`facing`, where
the clip draws its windshield) is the way it drove only when it drives forward.
"""

from __future__ import annotations

from dataclasses import dataclass

GRID = 4
DIRECTIONS = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
OPPOSITE = {"up": "down", "down": "up", "left": "right", "right": "left"}
COLORS = {"red": (215, 35, 35), "blue": (35, 75, 225), "green": (25, 165, 60), "yellow": (235, 200, 25)}
SHAPES = ("car",)  # drawn as a triangle pointing the way it drives

Cell = tuple[int, int]


def inside(cell: Cell, grid: int = GRID) -> bool:
    return 1 <= cell[0] <= grid and 1 <= cell[1] <= grid


def step(cell: Cell, direction: str) -> Cell:
    dr, dc = DIRECTIONS[direction]
    return cell[0] + dr, cell[1] + dc


def next_move(direction: str, current: Cell, grid: int = GRID) -> tuple[str, bool]:
    """(direction of the next move, at_wall): straight on, or back the way it came when the wall is ahead."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {sorted(DIRECTIONS)}, got {direction!r}")
    if not inside(current, grid):
        raise ValueError(f"current must be a cell of the {grid}x{grid} grid (1-based), got {current}")
    if inside(step(current, direction), grid):
        return direction, False
    return OPPOSITE[direction], True


def next_cell(direction: str, current: Cell, grid: int = GRID) -> Cell:
    return step(current, next_move(direction, current, grid)[0])


@dataclass(frozen=True)
class Motion:
    """What the clip shows: the car at `previous` (first half of the video), then at `current`."""

    color: str
    shape: str
    direction: str
    previous: Cell
    current: Cell
    reversing: bool = False

    @property
    def facing(self) -> str:
        """The way the car's front points: where it drives, or the opposite way when it backs up."""
        return OPPOSITE[self.direction] if self.reversing else self.direction

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def next_direction(self) -> str:
        return next_move(self.direction, self.current)[0]

    @property
    def at_wall(self) -> bool:
        return next_move(self.direction, self.current)[1]


def cell_text(cell: Cell) -> str:
    return f"row {cell[0]}, column {cell[1]}"
