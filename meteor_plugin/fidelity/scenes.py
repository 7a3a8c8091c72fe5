"""Scenes of the fidelity testbed (v2): what is in an image, how it is drawn, and per-token labels.

A scene is a 96x96 RGB image built to have what makes pruning hard on real photographs, which the
v1 testbed lacked (objects on a 4x4 cell grid that 4x4 average pooling hit exactly, 75% flat grey):

- a **textured background** of one of four named tints (the global property a question asks about):
  a random low-frequency gradient, stripes of random period and direction, and per-pixel noise, so a
  token's distance from the mean token is not a foreground detector;
- **clutter**: 4-10 thin marks and dots in a darker shade of the background, which are not objects;
- 3-7 **objects** (circle, square, triangle; 10-18 px; six colours with +-20 jitter) at arbitrary
  pixel positions, never overlapping (2 px apart at least), so they align with no pooling grid;
- an optional small dark **digit** (Pillow's default font drawn at twice its size, about 10x16 px, 2% of
  the image) at an arbitrary position. The low-resolution encoder sees the image at a third of its
  size, where the digit is a 3x5 smudge. (At the font's own 5x8 px, inside one 8 px ConvNeXt patch, a
  90-minute CPU run read it at chance.)

`Scene` is the ground truth: answers (`questions.py`) and the dense labels (`token_labels`) are
computed from it, never from pixels. `render` is a pure function of the scene (texture and noise come
from ``scene.texture_seed``), so the same scene always gives the same bytes.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 96

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
# Base colours far apart (>= 85 on some channel) so that +-20 jitter never makes two meet, and all far
# from every background tint.
COLOUR_RGB = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 80, 215),
    "yellow": (235, 220, 35),
    "purple": (140, 55, 185),
    "orange": (245, 125, 20),
}
COLOUR_JITTER = 20
BACKGROUNDS = ("grey", "cream", "sky", "rose")
BACKGROUND_RGB = {
    "grey": (190, 190, 190),
    "cream": (235, 222, 180),
    "sky": (175, 205, 238),
    "rose": (236, 188, 204),
}
GRADIENT = 14  # +- across the image
STRIPES = 9  # +- amplitude
NOISE = 6  # +- per pixel and channel
CLUTTER = (4, 10)  # inclusive range of marks
CLUTTER_SHADE = (45, 75)  # how much darker than the background tint a mark is
SHAPE_SIZES = (10, 18)  # inclusive range of a shape's side, px
GAP = 2  # px between any two things
DIGIT_INK = (20, 60)  # inclusive range of the digit's grey level
DIGIT_SCALE = 2  # the default font's glyph, each pixel drawn as a DIGIT_SCALE x DIGIT_SCALE block
MAX_PER_COLOUR = 3  # so that every count question has an answer in 0-3

# Dense label classes; index 0 is always "nothing here".
WHAT_CLASSES = ("none",) + SHAPES + ("digit",)
COLOUR_CLASSES = ("none",) + COLOURS
DIGIT_CLASSES = ("none",) + tuple(str(d) for d in range(10))
LABELS = ("what", "colour", "digit", "centre")

Box = Tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, end exclusive


@dataclass(frozen=True)
class SceneObject:
    """One shape: its kind, colour name, jittered RGB and pixel box."""

    shape: str
    colour: str
    rgb: Tuple[int, int, int]
    box: Box

    @property
    def centre(self) -> Tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass(frozen=True)
class Digit:
    """The digit: its value (0-9), grey level and the pixel box of its ink."""

    value: int
    ink: int
    box: Box


@dataclass(frozen=True)
class Scene:
    """Everything an image shows. Objects and the digit never overlap."""

    objects: Tuple[SceneObject, ...]
    digit: Optional[Digit]
    background: str
    texture_seed: int

    def count(self, colour: str) -> int:
        return sum(obj.colour == colour for obj in self.objects)

    def with_shape(self, shape: str) -> Tuple[SceneObject, ...]:
        return tuple(obj for obj in self.objects if obj.shape == shape)


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
    """Float (h, w) coverage in [0, 1] of a digit's ink, cropped to the ink, from the default font,
    enlarged ``DIGIT_SCALE`` times (nearest neighbour: the font's own pixels, not a smoother glyph).

    The default font differs across Pillow versions (FreeType in recent ones, a bitmap font before
    10.1), so the glyph is measured here rather than assumed.
    """
    if not (isinstance(value, int) and 0 <= value <= 9):
        raise ValueError(f"digit value={value!r} is invalid: allowed an int in [0, 9]")
    font = ImageFont.load_default()
    canvas = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(canvas).text((8, 8), str(value), fill=255, font=font)
    bbox = canvas.getbbox()
    if bbox is None:
        raise RuntimeError(f"Pillow's default font drew nothing for digit {value}")
    alpha = np.asarray(canvas.crop(bbox), dtype=np.float32) / 255.0
    alpha = np.kron(alpha, np.ones((DIGIT_SCALE, DIGIT_SCALE), dtype=np.float32))
    if alpha.shape[0] > 20 or alpha.shape[1] > 20:
        raise RuntimeError(f"digit glyph {alpha.shape} is not a small glyph (at most 20 px)")
    alpha.setflags(write=False)
    return alpha


# ---- building scenes --------------------------------------------------------------------------------

def _free(box: Box, taken: Sequence[Box]) -> bool:
    x0, y0, x1, y1 = box
    return all(x1 + GAP <= a0 or a1 + GAP <= x0 or y1 + GAP <= b0 or b1 + GAP <= y0 for a0, b0, a1, b1 in taken)


def _place(rng: random.Random, w: int, h: int, taken: Sequence[Box], what: str) -> Box:
    """A box of ``w`` x ``h`` at a uniformly random free position (1 px from the border)."""
    for _ in range(400):
        x = rng.randint(1, IMAGE_SIZE - 1 - w)
        y = rng.randint(1, IMAGE_SIZE - 1 - h)
        box = (x, y, x + w, y + h)
        if _free(box, taken):
            return box
    raise RuntimeError(f"no free place for the {what} after 400 tries ({len(taken)} things placed)")


def make_scene(rng: random.Random, objects: Sequence[Tuple[str, str]], digit: Optional[int] = None,
               background: Optional[str] = None) -> Scene:
    """A scene of ``(shape, colour)`` objects and an optional digit value, on ``background`` (random when
    None). Sizes, positions, jitter, clutter and texture are drawn from ``rng``."""
    if background is None:
        background = rng.choice(BACKGROUNDS)
    if background not in BACKGROUND_RGB:
        raise ValueError(f"background={background!r} is invalid: allowed {', '.join(BACKGROUNDS)}")
    over = [k for k in COLOURS if sum(c == k for _, c in objects) > MAX_PER_COLOUR]
    if over:
        raise ValueError(f"at most {MAX_PER_COLOUR} objects per colour are allowed, {over} has more")
    taken = []
    d = None
    if digit is not None:  # placed first: the smallest thing, never crowded out
        h, w = digit_alpha(digit).shape
        box = _place(rng, w, h, taken, "digit")
        taken.append(box)
        d = Digit(digit, rng.randint(*DIGIT_INK), box)
    placed = []
    for shape, colour in objects:
        if colour not in COLOUR_RGB:
            raise ValueError(f"colour={colour!r} is invalid: allowed {', '.join(COLOURS)}")
        size = rng.randint(*SHAPE_SIZES)
        shape_mask(shape, size)  # validates shape
        box = _place(rng, size, size, taken, f"{colour} {shape}")
        taken.append(box)
        rgb = tuple(min(255, max(0, v + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for v in COLOUR_RGB[colour])
        placed.append(SceneObject(shape, colour, rgb, box))
    return Scene(tuple(placed), d, background, rng.getrandbits(63))


# ---- drawing and labels -------------------------------------------------------------------------------

def _background(scene: Scene, np_rng: np.random.Generator) -> np.ndarray:
    """The textured background: tint + gradient + stripes, float (3, H, W)."""
    n = IMAGE_SIZE
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / (n - 1) - 0.5
    angle, stripe_angle = np_rng.uniform(0, 2 * math.pi, size=2)
    period, phase = np_rng.uniform(6, 20), np_rng.uniform(0, 2 * math.pi)
    gradient = 2 * GRADIENT * (xx * math.cos(angle) + yy * math.sin(angle))
    along = (xx * math.cos(stripe_angle) + yy * math.sin(stripe_angle)) * (n - 1)
    stripes = STRIPES * np.sin(2 * math.pi * along / period + phase)
    tint = np.array(BACKGROUND_RGB[scene.background], dtype=np.float32)[:, None, None]
    return tint + (gradient + stripes)[None]


def _clutter(img: np.ndarray, scene: Scene, np_rng: np.random.Generator, free) -> None:
    """Thin marks and dots, a darker shade of the tint, where nothing else is (``free``: bool (H, W))."""
    tint = np.array(BACKGROUND_RGB[scene.background], dtype=np.float32)
    for _ in range(int(np_rng.integers(CLUTTER[0], CLUTTER[1] + 1))):
        shade = tint - np_rng.uniform(*CLUTTER_SHADE)
        x, y = np_rng.integers(0, IMAGE_SIZE, size=2)
        if np_rng.random() < 0.5:  # a dot of 2-3 px
            s = int(np_rng.integers(2, 4))
            ys, xs = np.mgrid[y:y + s, x:x + s]
        else:  # a straight mark, 4-12 px long, 1 px wide
            length, angle = int(np_rng.integers(4, 13)), np_rng.uniform(0, math.pi)
            t = np.arange(length)
            xs, ys = np.rint(x + t * math.cos(angle)).astype(int), np.rint(y + t * math.sin(angle)).astype(int)
        ok = (xs >= 0) & (xs < IMAGE_SIZE) & (ys >= 0) & (ys < IMAGE_SIZE)
        xs, ys = xs[ok], ys[ok]
        ok = free[ys, xs]
        img[:, ys[ok], xs[ok]] = shade[:, None]


def render(scene: Scene) -> np.ndarray:
    """The scene's image as a uint8 array (3, 96, 96), channels first."""
    np_rng = np.random.default_rng(scene.texture_seed)
    img = _background(scene, np_rng)
    free = np.ones((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for x0, y0, x1, y1 in [o.box for o in scene.objects] + ([scene.digit.box] if scene.digit else []):
        free[max(0, y0 - GAP):y1 + GAP, max(0, x0 - GAP):x1 + GAP] = False
    _clutter(img, scene, np_rng, free)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        img[:, y0:y1, x0:x1][:, shape_mask(obj.shape, x1 - x0)] = np.array(obj.rgb, dtype=np.float32)[:, None]
    if scene.digit is not None:
        d = scene.digit
        x0, y0, x1, y1 = d.box
        a = digit_alpha(d.value)
        region = img[:, y0:y1, x0:x1]
        region[...] = region * (1.0 - a) + a * d.ink
    img += np_rng.integers(-NOISE, NOISE + 1, size=img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _coverage(box: Box, mask: np.ndarray, grid: int) -> np.ndarray:
    """Pixels of ``mask`` (placed at ``box``) inside each token of a ``grid`` x ``grid`` patch grid."""
    full = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    x0, y0, x1, y1 = box
    full[y0:y1, x0:x1] = mask
    p = IMAGE_SIZE // grid
    return full.reshape(grid, p, grid, p).sum(axis=(1, 3))


def _check_grid(grid: int) -> None:
    if not (isinstance(grid, int) and grid >= 1 and IMAGE_SIZE % grid == 0):
        raise ValueError(f"grid={grid!r} is invalid: allowed a divisor of {IMAGE_SIZE}")


def token_labels(scene: Scene, grids: Sequence[int]) -> Dict[str, np.ndarray]:
    """Dense labels of what each token holds, for an auxiliary per-token loss, for encoders whose maps
    are ``grids`` (tokens per side, in fusion order): int64 arrays of ``sum(g * g)`` entries, each grid
    row-major, one after the other.

    A token is labelled with the thing (object or digit) that covers most of it, when it covers at
    least a tenth of the token or a third of the thing (and the digit always labels its best token that
    holds no object's centre); ``centre`` is 1 on the token that holds an
    object's centre (what counting reads: one per object per encoder), else 0, and that token is
    labelled with its object.
    """
    out = {name: [] for name in LABELS}
    for grid in grids:
        _check_grid(grid)
        area = (IMAGE_SIZE // grid) ** 2
        best = np.zeros((grid, grid), dtype=np.float32)
        what = np.zeros((grid, grid), dtype=np.int64)
        colour = np.zeros((grid, grid), dtype=np.int64)
        digit = np.zeros((grid, grid), dtype=np.int64)
        centre = np.zeros((grid, grid), dtype=np.int64)
        things = [(o.box, shape_mask(o.shape, o.box[2] - o.box[0]), o) for o in scene.objects]
        if scene.digit is not None:
            things.append((scene.digit.box, digit_alpha(scene.digit.value) > 0.3, scene.digit))
        for box, mask, thing in things:
            cov = _coverage(box, mask, grid)
            wins = (cov > best) & ((cov >= 0.1 * area) | (cov >= mask.sum() / 3))
            best = np.where(wins, cov, best)
            if isinstance(thing, Digit):
                what[wins], colour[wins], digit[wins] = WHAT_CLASSES.index("digit"), 0, 1 + thing.value
            else:
                what[wins], colour[wins], digit[wins] = (WHAT_CLASSES.index(thing.shape),
                                                         COLOUR_CLASSES.index(thing.colour), 0)
        p = IMAGE_SIZE // grid
        for thing in scene.objects:
            # An object's centre token is its own even where a neighbour covers more of it, so that the
            # token counting reads names the object it counts. (Objects are >= 10 px and 2 px apart, so
            # no two centres share a token of <= 12 px.)
            cx, cy = thing.centre
            r, c = min(grid - 1, int(cy // p)), min(grid - 1, int(cx // p))
            what[r, c], colour[r, c], digit[r, c] = (WHAT_CLASSES.index(thing.shape),
                                                     COLOUR_CLASSES.index(thing.colour), 0)
            centre[r, c] = 1
        if scene.digit is not None and not digit.any():
            # a small digit split over four tokens, or beside an object, still labels its best token
            cov = _coverage(scene.digit.box, digit_alpha(scene.digit.value) > 0.3, grid).reshape(-1)
            free = [i for i in np.argsort(-cov, kind="stable") if cov[i] > 0 and not centre.reshape(-1)[i]]
            if free:
                r, c = divmod(int(free[0]), grid)
                what[r, c], colour[r, c], digit[r, c] = WHAT_CLASSES.index("digit"), 0, 1 + scene.digit.value
        for name, a in zip(LABELS, (what, colour, digit, centre)):
            out[name].append(a.reshape(-1))
    return {name: np.concatenate(parts) for name, parts in out.items()}


def box_tokens(box: Box, grid: int) -> np.ndarray:
    """Boolean (grid, grid) mask of the tokens of a ``grid`` x ``grid`` patch grid that a box overlaps."""
    _check_grid(grid)
    patch = IMAGE_SIZE // grid
    x0, y0, x1, y1 = box
    mask = np.zeros((grid, grid), dtype=bool)
    mask[y0 // patch:(y1 - 1) // patch + 1, x0 // patch:(x1 - 1) // patch + 1] = True
    return mask
