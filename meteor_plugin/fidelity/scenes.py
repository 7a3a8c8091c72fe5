"""Scenes of the fidelity testbed: what is in an image, how it is drawn, and per-cell labels.

A scene is a 64x64 RGB image on a 4x4 grid of 16 px cells. Each cell holds at most one thing: a
shape (circle, square or triangle, 9-13 px, one of six colours with +-20 per-channel jitter) or a
small dark-grey digit drawn with Pillow's default font (about 6x8 px in Pillow 13, so at 32x32 it
is a 3x4 smudge: only a full-resolution encoder can read it). Everything lies wholly inside its
cell, so a cell's label is exact. The background is one grey level (215-250) with +-6 noise on every
pixel and channel.

`Scene` is the ground truth: answers (`questions.py`) and the dense labels (`cell_labels`) are
computed from it, never from pixels. `render` is a pure function of the scene (the noise comes from
`scene.noise_seed`), so the same scene always gives the same bytes.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 64
GRID = 4
CELL = IMAGE_SIZE // GRID  # 16 px

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
# Base colours far apart (>= 85 on some channel) so that +-20 jitter never makes two meet, and all far
# from the grey background.
COLOUR_RGB = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 80, 215),
    "yellow": (235, 220, 35),
    "purple": (140, 55, 185),
    "orange": (245, 125, 20),
}
COLOUR_JITTER = 20
SHAPE_SIZES = (9, 13)  # inclusive range of a shape's side, px
BACKGROUND = (215, 250)  # inclusive range of the grey level
NOISE = 6  # +- per pixel and channel
DIGIT_INK = (30, 70)  # inclusive range of the digit's grey level
MAX_PER_COLOUR = 3  # so that every count question has an answer in 0-3

# Dense label classes; index 0 is always "nothing here".
WHAT_CLASSES = ("none",) + SHAPES + ("digit",)
COLOUR_CLASSES = ("none",) + COLOURS
DIGIT_CLASSES = ("none",) + tuple(str(d) for d in range(10))

Box = Tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, end exclusive


@dataclass(frozen=True)
class SceneObject:
    """One shape: its cell, kind, colour name, jittered RGB and pixel box (inside the cell)."""

    row: int
    col: int
    shape: str
    colour: str
    rgb: Tuple[int, int, int]
    box: Box


@dataclass(frozen=True)
class Digit:
    """The digit: its cell, value (0-9), grey level and the pixel box of its ink (inside the cell)."""

    row: int
    col: int
    value: int
    ink: int
    box: Box


@dataclass(frozen=True)
class Scene:
    """Everything an image shows. Objects occupy distinct cells; the digit, if any, an empty one."""

    objects: Tuple[SceneObject, ...]
    digit: Optional[Digit]
    background: int
    noise_seed: int

    def object_at(self, row: int, col: int) -> Optional[SceneObject]:
        for obj in self.objects:
            if obj.row == row and obj.col == col:
                return obj
        return None

    def count(self, colour: str) -> int:
        return sum(obj.colour == colour for obj in self.objects)

    def with_shape(self, shape: str) -> Tuple[SceneObject, ...]:
        return tuple(obj for obj in self.objects if obj.shape == shape)


def _check_cell(name: str, row: int, col: int) -> None:
    if not (0 <= row < GRID and 0 <= col < GRID):
        raise ValueError(f"{name} cell ({row}, {col}) is invalid: row and col must be in [0, {GRID - 1}]")


# ---- masks, rendered once with Pillow and then pasted with numpy (fast and exact) ----------------

@functools.lru_cache(maxsize=None)
def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean (size, size) mask of a shape."""
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r} is invalid: allowed {', '.join(SHAPES)}")
    if not SHAPE_SIZES[0] <= size <= SHAPE_SIZES[1]:
        raise ValueError(f"size={size} is invalid: allowed [{SHAPE_SIZES[0]}, {SHAPE_SIZES[1]}]")
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    last = size - 1
    if shape == "circle":
        draw.ellipse((0, 0, last, last), fill=255)
    elif shape == "square":
        draw.rectangle((0, 0, last, last), fill=255)
    else:
        draw.polygon([(last / 2, 0), (0, last), (last, last)], fill=255)
    mask = np.asarray(img) > 0
    mask.setflags(write=False)
    return mask


@functools.lru_cache(maxsize=None)
def digit_alpha(value: int) -> np.ndarray:
    """Float (h, w) coverage in [0, 1] of a digit's ink, cropped to the ink, from the default font.

    The default font differs across Pillow versions (FreeType in recent ones, a bitmap font before
    10.1), so the glyph is measured here rather than assumed.
    """
    if not (isinstance(value, int) and 0 <= value <= 9):
        raise ValueError(f"digit value={value!r} is invalid: allowed an int in [0, 9]")
    font = ImageFont.load_default()
    canvas = Image.new("L", (2 * CELL, 2 * CELL), 0)
    ImageDraw.Draw(canvas).text((CELL // 2, CELL // 2), str(value), fill=255, font=font)
    bbox = canvas.getbbox()
    if bbox is None:
        raise RuntimeError(f"Pillow's default font drew nothing for digit {value}")
    alpha = np.asarray(canvas.crop(bbox), dtype=np.float32) / 255.0
    if alpha.shape[0] > CELL - 2 or alpha.shape[1] > CELL - 2:
        raise RuntimeError(f"digit glyph {alpha.shape} does not fit a {CELL} px cell with a margin")
    alpha.setflags(write=False)
    return alpha


# ---- building scenes --------------------------------------------------------------------------------

def place_object(rng: random.Random, row: int, col: int, shape: str, colour: str) -> SceneObject:
    """A shape of random size, position inside the cell and colour jitter."""
    _check_cell("object", row, col)
    if colour not in COLOUR_RGB:
        raise ValueError(f"colour={colour!r} is invalid: allowed {', '.join(COLOURS)}")
    size = rng.randint(*SHAPE_SIZES)
    shape_mask(shape, size)  # validates shape
    x = col * CELL + rng.randint(0, CELL - size)
    y = row * CELL + rng.randint(0, CELL - size)
    rgb = tuple(min(255, max(0, v + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for v in COLOUR_RGB[colour])
    return SceneObject(row, col, shape, colour, rgb, (x, y, x + size, y + size))


def place_digit(rng: random.Random, row: int, col: int, value: int) -> Digit:
    """A digit at a random position inside the cell, keeping a 1 px margin from the cell's edge."""
    _check_cell("digit", row, col)
    h, w = digit_alpha(value).shape
    x = col * CELL + rng.randint(1, CELL - 1 - w)
    y = row * CELL + rng.randint(1, CELL - 1 - h)
    ink = rng.randint(*DIGIT_INK)
    return Digit(row, col, value, ink, (x, y, x + w, y + h))


def make_scene(rng: random.Random, objects: Sequence[Tuple[int, int, str, str]],
               digit: Optional[Tuple[int, int, int]] = None) -> Scene:
    """A scene from ``(row, col, shape, colour)`` objects and an optional ``(row, col, value)`` digit.

    Sizes, positions, jitter, background and noise are drawn from ``rng``.
    """
    cells = [(r, c) for r, c, _, _ in objects] + ([digit[:2]] if digit is not None else [])
    if len(set(cells)) != len(cells):
        raise ValueError(f"objects and digit must occupy distinct cells, got {cells}")
    placed = tuple(place_object(rng, r, c, s, k) for r, c, s, k in objects)
    over = [k for k in COLOURS if sum(o.colour == k for o in placed) > MAX_PER_COLOUR]
    if over:
        raise ValueError(f"at most {MAX_PER_COLOUR} objects per colour are allowed, {over} has more")
    d = place_digit(rng, *digit) if digit is not None else None
    return Scene(placed, d, rng.randint(*BACKGROUND), rng.getrandbits(63))


# ---- drawing and labels -------------------------------------------------------------------------------

def render(scene: Scene) -> np.ndarray:
    """The scene's image as a uint8 array (3, 64, 64), channels first."""
    img = np.full((3, IMAGE_SIZE, IMAGE_SIZE), scene.background, dtype=np.int16)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        img[:, y0:y1, x0:x1][:, shape_mask(obj.shape, x1 - x0)] = np.array(obj.rgb, dtype=np.int16)[:, None]
    if scene.digit is not None:
        d = scene.digit
        x0, y0, x1, y1 = d.box
        a = digit_alpha(d.value)
        region = img[:, y0:y1, x0:x1]
        region[...] = np.rint(region * (1.0 - a) + a * d.ink)
    img += _noise(scene.noise_seed)
    return np.clip(img, 0, 255).astype(np.uint8)


def _noise(seed: int) -> np.ndarray:
    """Integer noise in [-NOISE, NOISE], shape (3, 64, 64), from ``seed``. Drawn as raw bytes, about
    2x faster than ``integers``; 256 byte values onto 13 levels (19 or 20 each) is near enough uniform."""
    raw = np.frombuffer(np.random.default_rng(seed).bytes(3 * IMAGE_SIZE * IMAGE_SIZE), dtype=np.uint8)
    levels = 2 * NOISE + 1
    return ((raw.astype(np.int16) * levels) >> 8).reshape(3, IMAGE_SIZE, IMAGE_SIZE) - NOISE


def cell_labels(scene: Scene, grid: int = GRID) -> Dict[str, np.ndarray]:
    """Dense labels of what each cell holds, for an auxiliary per-token loss.

    Returns int64 arrays (grid, grid): ``what`` (index into WHAT_CLASSES), ``colour`` (COLOUR_CLASSES)
    and ``digit`` (DIGIT_CLASSES). A finer ``grid`` (a multiple of 4, e.g. 8 for 8x8-px tokens) gives
    each token the label of the cell it lies in, which is what the note's working aux loss used.
    """
    if not (isinstance(grid, int) and grid >= GRID and grid % GRID == 0 and IMAGE_SIZE % grid == 0):
        raise ValueError(f"grid={grid!r} is invalid: allowed 4, 8, 16, 32 or 64")
    what = np.zeros((GRID, GRID), dtype=np.int64)
    colour = np.zeros((GRID, GRID), dtype=np.int64)
    digit = np.zeros((GRID, GRID), dtype=np.int64)
    for obj in scene.objects:
        what[obj.row, obj.col] = WHAT_CLASSES.index(obj.shape)
        colour[obj.row, obj.col] = COLOUR_CLASSES.index(obj.colour)
    if scene.digit is not None:
        what[scene.digit.row, scene.digit.col] = WHAT_CLASSES.index("digit")
        digit[scene.digit.row, scene.digit.col] = 1 + scene.digit.value
    rep = grid // GRID
    return {name: np.repeat(np.repeat(a, rep, axis=0), rep, axis=1)
            for name, a in (("what", what), ("colour", colour), ("digit", digit))}


def box_tokens(box: Box, grid: int) -> np.ndarray:
    """Boolean (grid, grid) mask of the tokens of a ``grid`` x ``grid`` patch grid that a box overlaps."""
    if not (isinstance(grid, int) and grid >= 1 and IMAGE_SIZE % grid == 0):
        raise ValueError(f"grid={grid!r} is invalid: allowed a divisor of {IMAGE_SIZE}")
    patch = IMAGE_SIZE // grid
    x0, y0, x1, y1 = box
    mask = np.zeros((grid, grid), dtype=bool)
    mask[y0 // patch:(y1 - 1) // patch + 1, x0 // patch:(x1 - 1) // patch + 1] = True
    return mask
