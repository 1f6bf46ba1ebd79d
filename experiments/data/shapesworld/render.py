"""ShapesWorld rendering: scene records to RGB images and depth maps (a pure function of the records)."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from experiments.data.shapesworld.scenes import _CROSS_ARM, _EXTENT, _NOISE_TILES, _STAR_INNER


def render_scenes(
    scenes: Sequence[dict],
    image_size: int,
    seed: int = 0,
    images: np.ndarray | None = None,
    depth: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 [B, S, S, 3] and depth uint8 [B, S, S] of scene records, written into ``images``/``depth`` if given.

    A pure function of the records (and of ``seed``, which draws the bank of noise tiles). Masks are computed
    from coordinate grids for all objects of one shape and size class at once (a patch around each centre; a
    pixel belongs to a shape when its centre is inside), then pasted object by object. Background: a tinted grey
    with a separable low-frequency pattern. Every pixel gets luminance noise in [-8, 7]; object colours are kept
    in [16, 239] when sampled, so the uint8 arithmetic never wraps.
    """
    b, s = len(scenes), image_size
    images = np.empty((b, s, s, 3), dtype=np.uint8) if images is None else images
    depth = np.empty((b, s, s), dtype=np.uint8) if depth is None else depth

    # background: (grey + tint - 22) + noise[0, 15] + wave_y[0, 14] + wave_x[0, 14], all uint8
    bank = _noise_bank(seed, s)
    noise = np.empty((b, s, s), dtype=np.uint8)
    for r, sc in enumerate(scenes):
        tile, u, v = sc["background"]["noise"]
        oy, ox = int(v * s), int(u * s)
        noise[r] = bank[tile, oy:oy + s, ox:ox + s]
    bg = [sc["background"] for sc in scenes]
    base = (np.array([x["grey"] for x in bg])[:, None] + np.array([x["tint"] for x in bg]) - 22).astype(np.uint8)
    freq, phase, amp = np.array([x["waves"] for x in bg]).transpose(2, 0, 1)[..., None]  # each [b, 2, 1]
    t = (np.arange(s) + 0.5) / s
    waves = (np.rint(amp * np.sin(2 * np.pi * freq * t + phase)) + 7).astype(np.uint8)  # [b, 2, S]
    lum = noise + waves[:, 0, :, None]
    lum += waves[:, 1, None, :]
    for c in range(3):  # one channel at a time: numpy is slow when the innermost broadcast axis has length 3
        np.add(lum, base[:, c, None, None], out=images[..., c])
    depth.fill(255)

    # objects, grouped by (shape, size class) so one patch size fits the group
    placed = [(r, o) for r, sc in enumerate(scenes) for o in sc["objects"]]
    groups: dict[tuple[str, str], list[tuple[int, dict]]] = {}
    for r, o in placed:
        groups.setdefault((o["shape"], o["size"]), []).append((r, o))
    for (shape, _), members in groups.items():
        objs = [o for _, o in members]
        cx = np.array([o["x"] for o in objs]) * s
        cy = np.array([o["y"] for o in objs]) * s
        ext = np.array([o["radius"] for o in objs]) * (_EXTENT[shape] * s)
        half = int(math.ceil(ext.max())) + 1
        patch = np.arange(-half, half + 1)
        x0 = np.floor(cx).astype(np.int64) - half  # patch origin (may lie outside the image)
        y0 = np.floor(cy).astype(np.int64) - half
        dx = ((x0 + half + 0.5 - cx)[:, None] + patch)[:, None, :].astype(np.float32)  # pixel centre - object centre
        dy = ((y0 + half + 0.5 - cy)[:, None] + patch)[:, :, None].astype(np.float32)
        theta = np.radians(np.array([o["angle"] for o in objs], dtype=np.float32))[:, None, None]
        inv = (1.0 / ext).astype(np.float32)[:, None, None]
        cos, sin = np.cos(theta) * inv, np.sin(theta) * inv
        masks = _shape_mask(shape, cos * dx + sin * dy, cos * dy - sin * dx)  # object frame, bounding radius 1
        for (r, o), m, px, py in zip(members, masks, x0.tolist(), y0.tolist()):
            xa, ya = max(px, 0), max(py, 0)
            xb, yb = min(px + 2 * half + 1, s), min(py + 2 * half + 1, s)
            m = m[ya - py:yb - py, xa - px:xb - px]
            depth[r, ya:yb, xa:xb][m] = o["depth_value"]
            colour = np.array(o["rgb"], dtype=np.uint8) - np.uint8(8)
            images[r, ya:yb, xa:xb][m] = colour + noise[r, ya:yb, xa:xb][m][:, None]
    return images, depth


def _noise_bank(seed: int, size: int) -> np.ndarray:
    """uint8 [_NOISE_TILES, 2 * size, 2 * size] of values in [0, 15]; scenes crop their noise from it."""
    rng = np.random.default_rng([seed, 1, size])
    raw = np.frombuffer(rng.bytes(_NOISE_TILES * 4 * size * size), dtype=np.uint8)
    return raw.reshape(_NOISE_TILES, 2 * size, 2 * size) & np.uint8(15)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test in the object frame (bounding radius 1, y down, points/apex up)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 1.0 / math.sqrt(2.0)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "triangle":  # equilateral, apex up: three half-planes at distance 1/2 from the centre
        c = math.sqrt(3.0) / 2.0
        return (v <= 0.5) & (-c * u - 0.5 * v <= 0.5) & (c * u - 0.5 * v <= 0.5)
    if shape == "star":  # fold the angle into one half-spike [0, 36 deg], test against its outer edge
        rho = np.sqrt(u * u + v * v)
        phi = np.mod(np.arctan2(v, u) + math.pi / 2.0, 2.0 * math.pi / 5.0)
        phi = np.minimum(phi, 2.0 * math.pi / 5.0 - phi)
        return rho * (np.cos(phi) * _STAR_NORMAL[0] + np.sin(phi) * _STAR_NORMAL[1]) <= _STAR_NORMAL[2]
    if shape == "cross":
        arm = 1.0 / math.sqrt(1.0 + _CROSS_ARM**2)
        w = _CROSS_ARM * arm
        au, av = np.abs(u), np.abs(v)
        return ((au <= w) & (av <= arm)) | ((av <= w) & (au <= arm))
    raise ValueError(f"unknown shape {shape!r}")


def _star_edge() -> tuple[float, float, float]:
    # edge from the outer vertex (1, 0) to the inner vertex at 36 deg; outward unit normal (nx, ny) and offset d
    p1 = np.array([1.0, 0.0])
    p2 = _STAR_INNER * np.array([math.cos(math.radians(36.0)), math.sin(math.radians(36.0))])
    e = p2 - p1
    nrm = np.array([-e[1], e[0]]) / np.linalg.norm(e)
    if nrm @ p1 < 0:
        nrm = -nrm
    return float(nrm[0]), float(nrm[1]), float(nrm @ p1)


_STAR_NORMAL = _star_edge()
