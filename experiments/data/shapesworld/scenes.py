"""ShapesWorld scenes: the random stream every generator draws from, scene sampling, and the geometric facts.

A scene record is a JSON-serialisable dict (see the package docstring); :func:`relation_holds` and
:func:`object_region` are the ground truth that captions (:mod:`.captions`) are written from and checked against.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from experiments.data.shapesworld.vocab import COLOUR_RGB, COLOURS, REGIONS, RELATIONS, SHAPES, SIZES

# Geometry, in fractions of the image side. ``radius`` is that of the disc with the object's area; a shape's
# bounding radius is radius * _EXTENT[shape] (equal areas: circle pi r^2 = square 2 R^2 = ...).
_SIZE_RADIUS = {"small": (0.05, 0.07), "large": (0.09, 0.12)}
_STAR_INNER = 0.5  # inner/outer radius of the five-pointed star
_CROSS_ARM = 1.0 / 3.0  # half-width / half-length of the cross's arms
_EXTENT = {
    "circle": 1.0,
    "square": math.sqrt(math.pi / 2.0),
    "diamond": math.sqrt(math.pi / 2.0),
    "triangle": math.sqrt(math.pi / (3.0 * math.sqrt(3.0) / 4.0)),
    "star": math.sqrt(math.pi / (5.0 * _STAR_INNER * math.sin(math.radians(36.0)))),
    "cross": math.sqrt(math.pi * (1.0 + _CROSS_ARM**2) / (8.0 * _CROSS_ARM - 4.0 * _CROSS_ARM**2)),
}
_GAP = 0.02  # minimum distance between bounding circles (no overlap, no touching)
_BORDER = 0.01  # objects stay this far inside the image
_LARGEST_RATIO = 1.1  # the largest object's radius is at least this times the second largest one's
_DEPTH_GAP = 0.15  # minimum depth difference between two objects of a scene
_DEPTH_NEAR, _DEPTH_SPAN = 16, 200  # depth_value = 16 + 200 * depth  (background 255)
REL_MARGIN = 0.06  # "A left of B" needs x_A < x_B - REL_MARGIN (so the reverse is clearly false)
_REGION_MARGIN = 0.04  # an object within this of a third-line has no stated region
_MAX_TILT = 15.0  # degrees; keeps squares apart from diamonds
_NOISE_TILES = 16  # background noise tiles a scene picks one of (drawn by the renderer)
MAX_OBJECTS = 4


class _Stream:
    """Cheap scalar draws for the per-scene Python logic: uniforms pre-drawn in blocks from a numpy Generator."""

    def __init__(self, seed: Sequence[int]) -> None:
        self._rng = np.random.default_rng(list(seed))
        self._buf: list[float] = []
        self._i = 0

    def random(self) -> float:
        if self._i == len(self._buf):
            self._buf = self._rng.random(4096).tolist()
            self._i = 0
        self._i += 1
        return self._buf[self._i - 1]

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * self.random()

    def below(self, n: int) -> int:
        return min(int(self.random() * n), n - 1)

    def choice(self, seq: Sequence[Any]) -> Any:
        return seq[self.below(len(seq))]

    def shuffled(self, seq: Sequence[Any]) -> list:
        out = list(seq)
        for i in range(len(out) - 1, 0, -1):
            j = self.below(i + 1)
            out[i], out[j] = out[j], out[i]
        return out


def relation_holds(a: dict, relation: str, b: dict) -> bool:
    """Whether ``a relation b`` holds for two object records (spatial ones need a margin of REL_MARGIN)."""
    if relation == "left_of":
        return a["x"] < b["x"] - REL_MARGIN
    if relation == "right_of":
        return a["x"] > b["x"] + REL_MARGIN
    if relation == "above":
        return a["y"] < b["y"] - REL_MARGIN
    if relation == "below":
        return a["y"] > b["y"] + REL_MARGIN
    if relation == "in_front_of":
        return a["depth"] < b["depth"]
    if relation == "behind":
        return a["depth"] > b["depth"]
    raise ValueError(f"unknown relation {relation!r}; known: {', '.join(RELATIONS)}")


def object_region(obj: dict, margin: float = 0.0) -> str | None:
    """Region of the image (thirds) holding the object's centre; None if within ``margin`` of a third-line."""
    def third(v: float) -> int | None:
        if min(abs(v - 1 / 3), abs(v - 2 / 3)) < margin:
            return None
        return 0 if v < 1 / 3 else (2 if v > 2 / 3 else 1)

    col, row = third(obj["x"]), third(obj["y"])
    if col is None or row is None:
        return None
    return REGIONS[3 * row + col]


def _sample_scene(rng: _Stream, max_objects: int) -> dict:
    n = 1 + rng.below(max_objects)
    combos: list[tuple[str, str]] = []
    while len(combos) < n:  # (colour, shape) unique within a scene, so every mention names one object
        c = (rng.choice(COLOURS), rng.choice(SHAPES))
        if c not in combos:
            combos.append(c)
    sizes = [rng.choice(SIZES) for _ in range(n)]
    while True:
        radii = [round(rng.uniform(*_SIZE_RADIUS[z]), 4) for z in sizes]
        top = sorted(radii, reverse=True)
        if n == 1 or top[0] >= _LARGEST_RATIO * top[1]:
            break
    extents = [r * _EXTENT[s] for r, (_, s) in zip(radii, combos)]
    order = sorted(range(n), key=lambda i: -extents[i])
    for _attempt in range(1000):
        pos: dict[int, tuple[float, float]] = {}
        for i in order:
            lo, hi = extents[i] + _BORDER, 1.0 - extents[i] - _BORDER
            for _try in range(50):
                x, y = round(rng.uniform(lo, hi), 4), round(rng.uniform(lo, hi), 4)
                if all((x - px) ** 2 + (y - py) ** 2 >= (extents[i] + extents[j] + _GAP) ** 2
                       for j, (px, py) in pos.items()):
                    pos[i] = (x, y)
                    break
            else:
                break
        if len(pos) == n:
            break
    else:  # pragma: no cover - four largest objects always fit; kept as a guard
        raise RuntimeError("could not place the objects of a scene without overlap")
    # depths at least _DEPTH_GAP apart: sorted uniforms on a shortened range, spread by i * gap, then shuffled
    span = 1.0 - (n - 1) * _DEPTH_GAP
    depths = [u + i * _DEPTH_GAP for i, u in enumerate(sorted(rng.uniform(0.0, span) for _ in range(n)))]
    depths = rng.shuffled([round(d, 4) for d in depths])
    objects = []
    for i, (colour, shape) in enumerate(combos):
        tilt = 0.0 if shape == "circle" else round(rng.uniform(-_MAX_TILT, _MAX_TILT), 2)
        rgb = [min(239, max(16, v + rng.below(25) - 12)) for v in COLOUR_RGB[colour]]
        objects.append({
            "shape": shape, "colour": colour, "size": sizes[i], "x": pos[i][0], "y": pos[i][1],
            "depth": depths[i], "depth_value": int(round(_DEPTH_NEAR + _DEPTH_SPAN * depths[i])),
            "radius": radii[i], "extent": round(extents[i], 4), "angle": tilt, "rgb": rgb,
        })
    relations = [[i, r, j] for i in range(n) for j in range(n) if i != j
                 for r in RELATIONS if relation_holds(objects[i], r, objects[j])]
    background = {  # rendering only: grey level, tint, two waves (freq, phase, amplitude), noise tile and offset
        "grey": 90 + rng.below(91),
        "tint": [rng.below(17) - 8 for _ in range(3)],
        "waves": [[round(rng.uniform(1.0, 3.0), 3), round(rng.uniform(0.0, 2 * math.pi), 3),
                   round(rng.uniform(3.0, 7.0), 3)] for _ in range(2)],
        "noise": [rng.below(_NOISE_TILES), round(rng.random(), 4), round(rng.random(), 4)],
    }
    return {
        "objects": objects,
        "relations": relations,
        "nearest": min(range(n), key=lambda i: depths[i]),
        "largest": max(range(n), key=lambda i: radii[i]),
        "background": background,
    }
