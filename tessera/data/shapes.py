"""The embedded image set: coloured shapes on textured backgrounds, drawn in code.

`ShapesSource(seed, split, image_size)[i] -> {"image": uint8 [S, S, 3], "label": int}` where the
label is the shape (`SHAPE_CLASSES`). Every example is drawn from a generator keyed by
`(seed, split, i)`, so the set needs no download, stores nothing and is the same everywhere; train
and eval use different keys, so they are different streams of images.

Each image varies the shape's position, size (radius 25-38% of the side), rotation and colour,
and the background's texture (value noise, stripes, gradient or checker) and two colours. To keep
the set learnable by a small ViT in minutes, the shape stands out: it is lighter than the
background (by `MIN_LIGHTER` luma), its colour is at least `MIN_CONTRAST` (RGB distance) from every
colour of the background, whose texture is fainter (`TEXTURE_CONTRAST`); pixel noise is added on
top. Shapes are drawn from signed distance functions with one pixel of
anti-aliasing, so rendering costs a few numpy ops on S x S pixels (~0.1 ms at 32 px).
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable

import numpy as np

TRAIN_SIZE = 50_000
EVAL_SIZE = 1_000
MIN_CONTRAST = 90.0  # least RGB distance between the shape's colour and the background's
MIN_LIGHTER = 50.0  # least luma (Rec. 601) by which the shape is lighter than its background
TEXTURE_CONTRAST = (20.0, 60.0)  # range of RGB distance between the background's two colours
_NOISE_STD = 8.0  # per-pixel Gaussian noise, in uint8 steps
_SPLIT_KEYS = {"train": 0, "eval": 1}


def _box(u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    """Signed distance to the axis-aligned box |u| <= a, |v| <= b."""
    qu, qv = np.abs(u) - a, np.abs(v) - b
    outside = np.hypot(np.maximum(qu, 0), np.maximum(qv, 0))
    return outside + np.minimum(np.maximum(qu, qv), 0)


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Equilateral triangle inscribed in the unit circle: the furthest of its three edge lines."""
    normals = -math.pi / 2 + 2 * math.pi / 3 * np.arange(3)
    return np.max([u * math.cos(a) + v * math.sin(a) for a in normals], axis=0) - 0.5


_STAR_INNER = 0.45
_STAR_EDGE = np.array(
    [_STAR_INNER * math.cos(math.pi / 5) - 1, _STAR_INNER * math.sin(math.pi / 5)]
)
_STAR_NORMAL = np.array([_STAR_EDGE[1], -_STAR_EDGE[0]]) / np.hypot(*_STAR_EDGE)


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Five-pointed star (tips on the unit circle): the point is folded into the half-sector from a
    tip (angle 0) to an inner corner (36 degrees) and measured against that edge's line."""
    sector = 2 * math.pi / 5
    angle = np.abs(np.mod(np.arctan2(v, u) + sector / 2, sector) - sector / 2)
    rho = np.hypot(u, v)
    nu, nv = _STAR_NORMAL.tolist()
    return rho * (np.cos(angle) * nu + np.sin(angle) * nv) - nu


_SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda u, v: np.hypot(u, v) - 0.85,
    "square": lambda u, v: _box(u, v, 0.72, 0.72),
    "triangle": _triangle,
    "cross": lambda u, v: np.minimum(_box(u, v, 0.95, 0.3), _box(u, v, 0.3, 0.95)),
    "ring": lambda u, v: np.abs(np.hypot(u, v) - 0.75) - 0.2,
    "star": _star,
}
SHAPE_CLASSES: tuple[str, ...] = tuple(_SHAPES)


@functools.lru_cache(maxsize=64)
def _upsample_matrix(size: int, k: int) -> np.ndarray:
    """[size, k] weights that linearly interpolate k grid values at `size` pixel centres."""
    pos = (np.arange(size) + 0.5) / size * (k - 1)
    return np.maximum(0, 1 - np.abs(pos[:, None] - np.arange(k)[None, :])).astype(np.float32)


def _value_noise(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, size: int) -> np.ndarray:
    """Smooth blotches: a random k x k grid in [0, 1], bilinearly upsampled."""
    up = _upsample_matrix(size, int(rng.integers(3, 7)))
    return up @ rng.random((up.shape[1], up.shape[1]), np.float32) @ up.T


def _stripes(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, size: int) -> np.ndarray:
    angle, period = rng.uniform(0, math.pi), size * rng.uniform(0.12, 0.35)
    phase = (x * math.cos(angle) + y * math.sin(angle)) / period * 2 * math.pi + rng.uniform(0, 7)
    return 0.5 + 0.5 * np.clip(3 * np.sin(phase), -1, 1)


def _gradient(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, size: int) -> np.ndarray:
    angle = rng.uniform(0, 2 * math.pi)
    along = (x - size / 2) * math.cos(angle) + (y - size / 2) * math.sin(angle)
    return np.clip(0.5 + along / (size * math.sqrt(2)), 0, 1)


def _checker(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, size: int) -> np.ndarray:
    cell = size * rng.uniform(0.1, 0.25)
    oy, ox = rng.uniform(0, cell, 2).tolist()
    return ((np.floor((y + oy) / cell) + np.floor((x + ox) / cell)) % 2).astype(np.float32)


_TEXTURES = (_value_noise, _stripes, _gradient, _checker)


def _segment_distance(p: list[float], a: list[float], b: list[float]) -> float:
    """Distance from the RGB point p to the segment a..b."""
    ab = [bi - ai for ai, bi in zip(a, b, strict=True)]
    along = sum((pi - ai) * d for pi, ai, d in zip(p, a, ab, strict=True))
    t = min(max(along / max(sum(d * d for d in ab), 1e-9), 0.0), 1.0)
    return math.dist(p, [ai + t * d for ai, d in zip(a, ab, strict=True)])


def _luma(c: list[float]) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _colours(rng: np.random.Generator) -> tuple[list[float], list[float], list[float]]:
    """(shape, background a, background b) RGB colours in [0, 255]: a and b are TEXTURE_CONTRAST
    apart, the shape is at least MIN_LIGHTER lighter than both and at least MIN_CONTRAST from
    every mix of them (rejection sampling, ~3 draws)."""
    while True:
        u = rng.random(10).tolist()
        fg, a = [255 * v for v in u[:3]], [255 * v for v in u[3:6]]
        if _luma(a) > _luma(fg):
            fg, a = a, fg
        low, high = TEXTURE_CONTRAST
        step = [2 * v - 1 for v in u[6:9]]  # b = a + step, rescaled to a length in [low, high]
        scale = (low + u[9] * (high - low)) / max(math.hypot(*step), 1e-9)
        b = [min(max(ai + scale * d, 0.0), 255.0) for ai, d in zip(a, step, strict=True)]
        lighter = _luma(fg) - max(_luma(a), _luma(b))
        if lighter >= MIN_LIGHTER and _segment_distance(fg, a, b) >= MIN_CONTRAST:
            return fg, a, b


@functools.lru_cache(maxsize=16)
def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) float32 [size, size] coordinates of the pixel centres."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + np.float32(0.5)
    return y, x


def render_shape(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """One image, uint8 [size, size, 3], of shape `SHAPE_CLASSES[label]` drawn with `rng`."""
    y, x = _pixel_centres(size)
    fg, bg_a, bg_b = (np.asarray(c, np.float32) for c in _colours(rng))
    texture = _TEXTURES[rng.integers(len(_TEXTURES))](rng, y, x, size)
    image = bg_a + texture[..., None] * (bg_b - bg_a)
    radius = size * rng.uniform(0.25, 0.38)
    margin = radius + size / 32  # 1 px at 32 px
    cy, cx = rng.uniform(margin, size - margin, 2).tolist()
    angle = rng.uniform(0, 2 * math.pi)
    cos, sin = math.cos(angle), math.sin(angle)
    u = ((x - cx) * cos + (y - cy) * sin) / radius
    v = ((y - cy) * cos - (x - cx) * sin) / radius
    coverage = np.clip(0.5 - _SHAPES[SHAPE_CLASSES[label]](u, v) * radius, 0, 1)[..., None]
    image += coverage * (fg - image) + _NOISE_STD * rng.standard_normal(image.shape, np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


class ShapesSource:
    """The embedded image set (module docstring): `TRAIN_SIZE` train or `EVAL_SIZE` eval images of
    `image_size` x `image_size` pixels, rendered on access."""

    classes: tuple[str, ...] = SHAPE_CLASSES

    def __init__(self, seed: int, split: str, image_size: int):
        if split not in _SPLIT_KEYS:
            raise ValueError(f"unknown split {split!r}; known: {', '.join(_SPLIT_KEYS)}")
        if seed < 0:
            raise ValueError(f"shapes seed must be >= 0, got {seed}")
        if image_size < 8:
            raise ValueError(f"shapes image_size must be >= 8, got {image_size}")
        self.seed, self.split, self.image_size = seed, split, image_size
        self._len = TRAIN_SIZE if split == "train" else EVAL_SIZE

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, np.ndarray | int]:
        index = operator.index(index)
        if not 0 <= index < self._len:
            raise IndexError(f"shapes index {index} out of range [0, {self._len})")
        rng = np.random.default_rng([self.seed, _SPLIT_KEYS[self.split], index])
        label = int(rng.integers(len(SHAPE_CLASSES)))
        return {"image": render_shape(rng, label, self.image_size), "label": label}
