"""ShapesWorld: a deterministic, procedurally generated image–depth–text world that needs no download.

Each scene holds 1–4 objects, each with a shape, a colour, a size (small/large), a position and a depth.
A scene is rendered to an RGB image and a depth map, and described by captions, compositional hard-negative
captions and a structured record (objects, attributes, relations), so that alignment, binding and fusion
methods can be told apart on it:

* objects never overlap and their apparent size does not depend on depth, so depth order is in the depth map
  only; colour is in the RGB image only. ``labels["nearest_colour"]`` (colour of the object nearest the
  camera) therefore needs both: a *complementary* fusion task.
* ``labels["largest_shape"]`` (shape of the object with the largest area) is readable from the image, from the
  depth map's silhouettes and from ``noisy_captions`` (whose shape word is wrong with probability
  ``caption_noise``): a *redundant*, noisy fusion task.
* every shape is drawn with the same area for the same ``radius`` (the radius of the disc of equal area), so
  "largest" means the same in pixels as in the scene record.

Scene record (``scenes[i]``, JSON-serialisable)::

    {"objects": [{"shape", "colour", "size", "x", "y", "depth", "depth_value", "radius", "extent", "angle", "rgb"}],
     "relations": [[i, "left_of", j], ...],   # every relation that holds, both directions
     "nearest": i, "largest": i, "background": {...}}   # background: rendering parameters only

``x``, ``y`` are the object's centre as fractions of the image side, ``y`` pointing down (``y=0`` is the top
row); ``depth`` is in [0, 1], 0 nearest; ``depth_value`` is that object's value in the depth map (uint8,
0 near .. 255 far; the background is 255); ``radius`` is that of the disc with the object's area, ``extent``
its bounding radius. Within a scene, every (colour, shape) names one object, so captions are unambiguous.

Each caption and hard negative comes with its facts (``caption_facts``, ``hard_negative_facts``), a conjunction
of ``{"type": "exists" | "count" | "at" | "nearest" | "relation", "a": {"size", "colour", "shape"}, ...}``
(``size`` None when the caption does not say it); :func:`holds` evaluates them against a scene record.
Hard negatives are minimal edits of a true caption (``hard_negative_sources``, not necessarily one of
``captions``): attributes swapped between two objects, a relation reversed, or one attribute changed; every one
is checked false for its scene. One-object scenes only get changed attributes.

Held-out attribute combinations (``holdout=[("red", "circle")]``): every scene containing an object with such a
(colour, shape) goes to the split ``"zeroshot"`` and to no other split, so train, val and test never show it.
``splits["zeroshot"]`` is always present (empty without a holdout); all splits together cover every scene once.

The data are cached under ``cache_root()/datasets/shapesworld-<fingerprint>/`` (``.npy`` arrays, JSON text),
written to a temporary directory and renamed, so a crash never leaves half a cache. Generation is chunked with
one random stream per chunk and purpose: the output is byte-identical for equal configs.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np

from experiments.data._common import (
    CaptionedSplits,
    check_fractions,
    check_manifest,
    fingerprint as _fingerprint,
    gc_paused,
    load_json,
    replace_config,
    save_json,
    seeded_splits,
    write_manifest,
)
from align.weights import clean_stale_temps, temp_prefix, write_dir_atomically

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump when the output for a given config changes (invalidates caches)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left_of", "right_of", "above", "below", "in_front_of", "behind")
REVERSE_RELATION = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above",
                    "in_front_of": "behind", "behind": "in_front_of"}
SPATIAL_RELATIONS = ("left_of", "right_of", "above", "below")
DEPTH_RELATIONS = ("in_front_of", "behind")
REGIONS: tuple[str, ...] = ("top left", "top", "top right", "left", "centre", "right",
                            "bottom left", "bottom", "bottom right")
HARD_NEGATIVE_KINDS: tuple[str, ...] = ("swap_attributes", "reverse_relation", "change_attribute")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")

COLOUR_RGB = {"red": (210, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215),
              "yellow": (230, 210, 50), "purple": (140, 60, 180), "orange": (240, 135, 30)}
COLOUR_WORDS = {"red": ("red", "crimson", "scarlet"), "green": ("green", "emerald"), "blue": ("blue", "cobalt"),
                "yellow": ("yellow", "golden"), "purple": ("purple", "violet"), "orange": ("orange", "tangerine")}
SHAPE_WORDS = {"circle": ("circle", "disc"), "square": ("square",), "triangle": ("triangle",), "star": ("star",),
               "diamond": ("diamond", "rhombus"), "cross": ("cross", "plus sign")}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
RELATION_WORDS = {
    "left_of": ("left of", "to the left of", "on the left of"),
    "right_of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "in_front_of": ("in front of", "closer to the camera than", "nearer to the viewer than"),
    "behind": ("behind", "farther from the camera than", "further back than"),
}
WHERE_WORDS = {  # "there is B; <where> sits A"
    "left_of": ("to its left", "on its left"), "right_of": ("to its right", "on its right"),
    "above": ("above it",), "below": ("below it", "beneath it"),
    "in_front_of": ("in front of it",), "behind": ("behind it",),
}
REGION_WORDS = {
    "top left": ("in the top left", "in the top left corner"), "top": ("at the top", "near the top"),
    "top right": ("in the top right", "in the top right corner"), "left": ("on the left", "at the left side"),
    "centre": ("in the centre", "in the middle"), "right": ("on the right", "at the right side"),
    "bottom left": ("in the bottom left", "in the bottom left corner"), "bottom": ("at the bottom", "near the bottom"),
    "bottom right": ("in the bottom right", "in the bottom right corner"),
}

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
_CHUNK = 128  # scenes per random stream (fixed: the output must not depend on it)
_NOISE_TILES = 16
MIN_IMAGE_SIZE = 32
MAX_OBJECTS = 4


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ShapesWorldConfig:
    """Everything that determines a ShapesWorld (and its cache fingerprint).

    ``holdout`` lists (colour, shape) combinations (or ``"red circle"`` strings) whose scenes go to the
    ``"zeroshot"`` split only. The remaining scenes are split ``train_fraction/val_fraction/test_fraction``.
    """

    n_scenes: int = 10000
    image_size: int = 128
    seed: int = 0
    max_objects: int = 4
    captions_per_image: int = 5
    negatives_per_image: int = 3
    caption_noise: float = 0.25
    holdout: tuple[tuple[str, str], ...] = ()
    train_fraction: float = 0.8
    val_fraction: float = 0.1
    test_fraction: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "holdout", _normalise_holdout(self.holdout))
        for name in ("n_scenes", "image_size", "seed", "max_objects", "captions_per_image", "negatives_per_image"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.n_scenes <= 0:
            raise ValueError(f"n_scenes must be positive, got {self.n_scenes}")
        if self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE} pixels, got {self.image_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")
        if not 1 <= self.max_objects <= MAX_OBJECTS:
            raise ValueError(f"max_objects must be in 1..{MAX_OBJECTS}, got {self.max_objects}")
        if not 1 <= self.captions_per_image <= 20:
            raise ValueError(f"captions_per_image must be in 1..20, got {self.captions_per_image}")
        if not 0 <= self.negatives_per_image <= 10:
            raise ValueError(f"negatives_per_image must be in 0..10, got {self.negatives_per_image}")
        if not 0.0 <= self.caption_noise <= 1.0:
            raise ValueError(f"caption_noise must be in [0, 1], got {self.caption_noise}")
        check_fractions({"train_fraction": self.train_fraction, "val_fraction": self.val_fraction,
                         "test_fraction": self.test_fraction})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["holdout"] = [list(p) for p in self.holdout]
        return d


def _normalise_holdout(holdout: Iterable[Any] | None) -> tuple[tuple[str, str], ...]:
    if holdout is None:
        return ()
    if isinstance(holdout, str) or (isinstance(holdout, (tuple, list)) and len(holdout) == 2
                                    and all(isinstance(h, str) and " " not in h.strip() for h in holdout)):
        holdout = [holdout]  # a single combination given on its own: "red circle" or ("red", "circle")
    pairs = []
    for item in holdout:
        pair = tuple(item.split()) if isinstance(item, str) else tuple(item)
        if len(pair) != 2:
            raise ValueError(f"holdout entries must be (colour, shape) pairs, got {item!r}")
        colour, shape = pair
        if colour not in COLOURS:
            raise ValueError(f"unknown colour {colour!r} in holdout {item!r}; known colours: {', '.join(COLOURS)}")
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r} in holdout {item!r}; known shapes: {', '.join(SHAPES)}")
        if pair not in pairs:
            pairs.append(pair)
    return tuple(sorted(pairs))


# --------------------------------------------------------------------------------------------- dataset


@dataclass(eq=False)
class ShapesWorld(CaptionedSplits):
    """A generated ShapesWorld. Arrays are row-aligned with ``scenes`` (N rows).

    images: uint8 [N, H, W, 3]; depth: uint8 [N, H, W] (0 near .. 255 far/background);
    captions: N lists of ``captions_per_image`` true captions; caption_facts: their structured facts;
    hard_negatives / hard_negative_kinds / hard_negative_sources / hard_negative_facts: N lists of false captions,
    the kind of each (see ``HARD_NEGATIVE_KINDS``), the true caption each was perturbed from, and its facts;
    scenes: N JSON-serialisable dicts (objects, relations, nearest, largest, background; see the module doc);
    labels: task -> int64 [N] indexing ``class_names[task]``;
    noisy_captions: N strings naming the largest object's shape, wrong where ``noisy_corrupted`` [N] is true;
    splits: split name -> sorted int64 indices ("train", "val", "test", "zeroshot").
    """

    config: ShapesWorldConfig
    images: np.ndarray
    depth: np.ndarray
    captions: list[list[str]]
    caption_facts: list[list[list[dict]]]
    hard_negatives: list[list[str]]
    hard_negative_kinds: list[list[str]]
    hard_negative_sources: list[list[str]]
    hard_negative_facts: list[list[list[dict]]]
    scenes: list[dict]
    labels: dict[str, np.ndarray]
    class_names: dict[str, list[str]]
    noisy_captions: list[str]
    noisy_corrupted: np.ndarray
    splits: dict[str, np.ndarray]
    fingerprint: str
    cache_path: Path | None = field(default=None, compare=False)

    def __len__(self) -> int:
        return len(self.scenes)

    def flat_hard_negatives(self, split: str | np.ndarray | None = None) -> tuple[list[str], np.ndarray, list[str]]:
        """Hard negatives of ``split`` flattened in image order, their ``text_to_image`` (split rows) and kinds."""
        idx = self.indices(split)
        texts = [t for i in idx for t in self.hard_negatives[i]]
        kinds = [k for i in idx for k in self.hard_negative_kinds[i]]
        t2i = np.repeat(np.arange(len(idx), dtype=np.int64), [len(self.hard_negatives[i]) for i in idx])
        return texts, t2i, kinds

    def subset(self, split: str | np.ndarray) -> "ShapesWorld":
        """The rows of one split (or index array) as a ShapesWorld whose only split, named alike, is all rows."""
        idx = self.indices(split)
        name = split if isinstance(split, str) else "subset"

        def pick(xs: list) -> list:
            return [xs[i] for i in idx]

        return dataclasses.replace(
            self,
            images=np.asarray(self.images[idx]), depth=np.asarray(self.depth[idx]),
            captions=pick(self.captions), caption_facts=pick(self.caption_facts),
            hard_negatives=pick(self.hard_negatives), hard_negative_kinds=pick(self.hard_negative_kinds),
            hard_negative_sources=pick(self.hard_negative_sources), hard_negative_facts=pick(self.hard_negative_facts),
            scenes=pick(self.scenes), labels={k: v[idx] for k, v in self.labels.items()},
            noisy_captions=pick(self.noisy_captions), noisy_corrupted=self.noisy_corrupted[idx],
            splits={name: np.arange(len(idx), dtype=np.int64)},
            fingerprint=f"{self.fingerprint}-{name}" if isinstance(split, str) else f"{self.fingerprint}-subset",
            cache_path=None,
        )

    # ---- persistence

    _TEXT_FIELDS = ("captions", "hard_negatives", "hard_negative_kinds", "hard_negative_sources", "noisy_captions")
    _FACT_FIELDS = ("caption_facts", "hard_negative_facts")

    def save(self, path: str | Path) -> Path:
        """Write the dataset to directory ``path`` atomically (temporary sibling, then rename)."""

        def write(tmp: Path) -> None:
            np.save(tmp / "images.npy", np.ascontiguousarray(self.images))
            np.save(tmp / "depth.npy", np.ascontiguousarray(self.depth))
            np.save(tmp / "noisy_corrupted.npy", self.noisy_corrupted)
            for group in ("labels", "splits"):
                (tmp / group).mkdir()
                for name, arr in getattr(self, group).items():
                    np.save(tmp / group / f"{name}.npy", arr)
            save_json(tmp / "text.json", {k: getattr(self, k) for k in self._TEXT_FIELDS})
            save_json(tmp / "facts.json", {k: getattr(self, k) for k in self._FACT_FIELDS})
            save_json(tmp / "scenes.json", self.scenes)
            save_json(tmp / "meta.json", {"name": "shapesworld", "version": GENERATOR_VERSION,
                                          "fingerprint": self.fingerprint, "config": self.config.to_dict(),
                                          "class_names": self.class_names, "labels": list(self.labels),
                                          "splits": list(self.splits)})
            write_manifest(tmp)  # last: size + sha256 of every file, checked by load

        return write_dir_atomically(Path(path), write)

    @classmethod
    def load(cls, path: str | Path, mmap: bool = True) -> "ShapesWorld":
        """Read a dataset written by :meth:`save`; images and depth are memory-mapped (read-only) if ``mmap``.

        Every file is checked against the directory's manifest first (size; sha256 once per process): a damaged,
        truncated or swapped file raises ``ValueError`` naming it.
        """
        path = Path(path)
        problem = check_manifest(path)
        if problem is not None:
            raise ValueError(f"ShapesWorld directory {path}: {problem}")
        meta = load_json(path / "meta.json")
        mode = "r" if mmap else None
        text = load_json(path / "text.json")
        facts = load_json(path / "facts.json")
        return cls(
            config=ShapesWorldConfig(**meta["config"]),
            images=np.load(path / "images.npy", mmap_mode=mode),
            depth=np.load(path / "depth.npy", mmap_mode=mode),
            scenes=load_json(path / "scenes.json"),
            labels={k: np.load(path / "labels" / f"{k}.npy") for k in meta["labels"]},
            class_names=meta["class_names"],
            noisy_corrupted=np.load(path / "noisy_corrupted.npy"),
            splits={k: np.load(path / "splits" / f"{k}.npy") for k in meta["splits"]},
            fingerprint=meta["fingerprint"],
            cache_path=path,
            **{k: text[k] for k in cls._TEXT_FIELDS},
            **{k: facts[k] for k in cls._FACT_FIELDS},
        )


def shapesworld_fingerprint(config: ShapesWorldConfig) -> str:
    """Cache key of a config (and of the generator version)."""
    return _fingerprint("shapesworld", GENERATOR_VERSION, config.to_dict())


def load_shapesworld(
    config: ShapesWorldConfig | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    **overrides: Any,
) -> ShapesWorld:
    """Load ShapesWorld for ``config`` (fields may be overridden by keyword), from the cache or by generating it.

    ``cache_dir`` holds one ``shapesworld-<fingerprint>`` directory per config (default
    ``align.weights.cache_root()/datasets``). ``use_cache=False`` neither reads nor writes it. Arrays read from
    the cache are memory-mapped read-only. Unknown option names or invalid values raise ValueError.
    """
    config = replace_config(config or ShapesWorldConfig(), overrides, "ShapesWorld")
    fp = shapesworld_fingerprint(config)
    if not use_cache:
        return generate_shapesworld(config)
    if cache_dir is None:
        from align.weights import cache_root

        cache_dir = cache_root() / "datasets"
    path = Path(cache_dir) / f"shapesworld-{fp}"
    clean_stale_temps(path.parent)  # temporaries of killed writers
    if path.exists():
        try:
            data = ShapesWorld.load(path)
            if data.fingerprint == fp:
                log.info("ShapesWorld: %d scenes from cache %s", len(data), path)
                return data
            log.warning("ShapesWorld cache %s has fingerprint %s, expected %s; regenerating",
                        path, data.fingerprint, fp)
        except (OSError, EOFError, ValueError, KeyError, TypeError) as e:
            log.warning("ShapesWorld cache %s is damaged or unreadable (%s); regenerating", path, e)
        _remove_stale(path)
    data = generate_shapesworld(config)
    data.save(path)
    data.cache_path = path
    log.info("ShapesWorld: cached %d scenes in %s", len(data), path)
    return data


def _remove_stale(path: Path) -> None:
    # renamed first (atomic: readers never see a half-deleted cache) onto an empty directory named like a temporary
    # of this process, so that a kill during the rmtree leaves something clean_stale_temps removes
    stale = Path(tempfile.mkdtemp(prefix=temp_prefix(path.name, directory=True), dir=path.parent))
    try:
        os.rename(path, stale)
    except FileNotFoundError:  # another process got there first
        pass
    shutil.rmtree(stale, ignore_errors=True)


# --------------------------------------------------------------------------------------------- generation


def generate_shapesworld(config: ShapesWorldConfig) -> ShapesWorld:
    """Generate the dataset in memory (no cache); byte-identical for equal configs.

    Work goes in chunks of ``_CHUNK`` scenes, each with its own random streams (scenes, pixels, captions,
    noisy captions), so the first scenes of a larger dataset equal those of a smaller one with the same seed.
    """
    from tqdm.auto import tqdm

    n, size = config.n_scenes, config.image_size
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    depth = np.empty((n, size, size), dtype=np.uint8)
    records: list[dict] = []
    log.info("ShapesWorld: generating %d scenes at %d px", n, size)
    with gc_paused():
        for chunk in tqdm(range(-(-n // _CHUNK)), desc="ShapesWorld", unit="chunk", disable=None):
            lo = chunk * _CHUNK
            hi = min(n, lo + _CHUNK)
            records.append(_generate_chunk(config, chunk, images[lo:hi], depth[lo:hi]))

    def cat(key: str) -> list:
        return [x for r in records for x in r[key]]

    scenes = cat("scenes")
    labels, class_names = scene_labels(scenes, config.max_objects)
    holdout = set(config.holdout)
    held = np.array([any((o["colour"], o["shape"]) in holdout for o in s["objects"]) for s in scenes], dtype=bool)
    splits = seeded_splits(
        n, {"train": config.train_fraction, "val": config.val_fraction, "test": config.test_fraction},
        seed=[config.seed, 4], excluded=held, excluded_name="zeroshot",
    )
    if holdout and len(splits["train"]) == 0:
        log.warning("ShapesWorld: every scene contains a held-out combination; the train split is empty")
    return ShapesWorld(
        config=config, images=images, depth=depth,
        captions=cat("captions"), caption_facts=cat("caption_facts"),
        hard_negatives=cat("hard_negatives"), hard_negative_kinds=cat("hard_negative_kinds"),
        hard_negative_sources=cat("hard_negative_sources"), hard_negative_facts=cat("hard_negative_facts"),
        scenes=scenes, labels=labels, class_names=class_names,
        noisy_captions=cat("noisy_captions"), noisy_corrupted=np.array(cat("noisy_corrupted"), dtype=bool),
        splits=splits, fingerprint=shapesworld_fingerprint(config),
    )


def scene_labels(
    scenes: Sequence[dict], max_objects: int = MAX_OBJECTS
) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """Fusion-task labels (int64 [N] each) and their class names, computed from scene records.

    nearest_colour: colour of the nearest object (complementary: colour in RGB, nearness in depth);
    largest_shape: shape of the largest object (redundant: image, depth silhouettes, noisy caption);
    shape_colour: "colour shape" of the largest object (for zero-shot over attribute combinations);
    n_objects: number of objects minus one (redundant).
    """
    combos = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    near = [s["objects"][s["nearest"]] for s in scenes]
    big = [s["objects"][s["largest"]] for s in scenes]
    labels = {
        "nearest_colour": np.array([COLOURS.index(o["colour"]) for o in near], dtype=np.int64),
        "largest_shape": np.array([SHAPES.index(o["shape"]) for o in big], dtype=np.int64),
        "shape_colour": np.array([combos.index(f"{o['colour']} {o['shape']}") for o in big], dtype=np.int64),
        "n_objects": np.array([len(s["objects"]) - 1 for s in scenes], dtype=np.int64),
    }
    class_names = {"nearest_colour": list(COLOURS), "largest_shape": list(SHAPES), "shape_colour": combos,
                   "n_objects": list(NUMBER_WORDS[1:max_objects + 1])}
    return labels, class_names


def _generate_chunk(config: ShapesWorldConfig, chunk: int, images: np.ndarray, depth: np.ndarray) -> dict:
    """Scenes and text of scenes [chunk*_CHUNK, ...), pixels rendered into ``images``/``depth``."""
    lo = chunk * _CHUNK
    hi = min(config.n_scenes, lo + _CHUNK)
    scene_rng = _Stream([config.seed, 0, chunk])
    text_rng = _Stream([config.seed, 2, chunk])
    noisy_rng = _Stream([config.seed, 3, chunk])
    out: dict[str, list] = {k: [] for k in (
        "scenes", "captions", "caption_facts", "hard_negatives", "hard_negative_kinds", "hard_negative_sources",
        "hard_negative_facts", "noisy_captions", "noisy_corrupted")}
    for _ in range(lo, hi):
        scene = _sample_scene(scene_rng, config.max_objects)
        out["scenes"].append(scene)
        caps = _positive_captions(scene, text_rng, config.captions_per_image)
        out["captions"].append([c.text for c in caps])
        out["caption_facts"].append([c.json_facts() for c in caps])
        negs = _hard_negatives(scene, text_rng, config.negatives_per_image, {c.text for c in caps})
        out["hard_negatives"].append([neg.text for neg, _, _ in negs])
        out["hard_negative_kinds"].append([kind for _, kind, _ in negs])
        out["hard_negative_sources"].append([src.text for _, _, src in negs])
        out["hard_negative_facts"].append([neg.json_facts() for neg, _, _ in negs])
        text, corrupted = _noisy_caption(scene, noisy_rng, config.caption_noise)
        out["noisy_captions"].append(text)
        out["noisy_corrupted"].append(corrupted)
    render_scenes(out["scenes"], config.image_size, config.seed, images, depth)
    return out


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


# --------------------------------------------------------------------------------------------- scenes


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


# --------------------------------------------------------------------------------------------- rendering


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


# --------------------------------------------------------------------------------------------- text


class _Mention(NamedTuple):
    """An object as named in a caption; ``cw/sw/zw`` pick the synonym of colour/shape/size (modulo)."""

    colour: str
    shape: str
    size: str | None
    cw: int
    sw: int
    zw: int

    def words(self) -> str:
        w = _WORDS_CACHE.get(self)
        if w is None:
            ws = COLOUR_WORDS[self.colour]
            w = ws[self.cw % len(ws)]
            ws = SHAPE_WORDS[self.shape]
            w = f"{w} {ws[self.sw % len(ws)]}"
            if self.size:
                w = f"{SIZE_WORDS[self.size][self.zw % 3]} {w}"
            _WORDS_CACHE[self] = w
        return w

    def indefinite(self) -> str:
        w = self.words()
        return ("an " if w[0] in "aeiou" else "a ") + w

    def definite(self) -> str:
        return "the " + self.words()

    def desc(self) -> dict:
        return {"size": self.size, "colour": self.colour, "shape": self.shape}


_WORDS_CACHE: dict[_Mention, str] = {}  # pure function of the mention; bounded by the vocabulary


def _mention(obj: dict, rng: _Stream, p_size: float = 0.5) -> _Mention:
    size = obj["size"] if rng.random() < p_size else None
    return _Mention(obj["colour"], obj["shape"], size, rng.below(6), rng.below(6), rng.below(6))


class _Caption:
    """A caption as (kind, template, style, facts); facts are tuples holding _Mentions. Text rendered once."""

    __slots__ = ("kind", "template", "style", "facts", "text")

    def __init__(self, kind: str, template: int, style: int, facts: tuple) -> None:
        self.kind, self.template, self.style, self.facts = kind, template, style, facts
        self.text = _render(self)

    def with_facts(self, facts: tuple) -> "_Caption":
        return _Caption(self.kind, self.template, self.style, facts)

    def json_facts(self) -> list[dict]:
        return [_fact_json(f) for f in self.facts]

    def mentions(self) -> list[tuple[int, str]]:
        """(fact index, slot) of every mention in the facts."""
        out = []
        for i, f in enumerate(self.facts):
            if f[0] in ("exists", "at", "nearest"):
                out.append((i, "a"))
            elif f[0] == "rel":
                out += [(i, "a"), (i, "b")]
        return out


_TEMPLATES = {"list": 5, "rel": 4, "at": 3, "nearest": 3, "single": 6}


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _render(c: _Caption) -> str:
    t, st = c.template, c.style
    if c.kind == "list":
        ms = [f[1] for f in c.facts if f[0] == "exists"]
        lst = _join([m.indefinite() for m in ms])
        return (lst, f"a picture of {lst}", f"{NUMBER_WORDS[len(ms)]} shapes: {lst}", f"an image showing {lst}",
                f"a scene with {lst}")[t]
    if c.kind == "rel":
        _, a, r, b = c.facts[0]
        phrase = RELATION_WORDS[r][st % len(RELATION_WORDS[r])]
        if t == 0:
            return f"{a.indefinite()} {phrase} {b.indefinite()}"
        if t == 1:
            return f"{a.definite()} is {phrase} {b.definite()}"
        if t == 2:
            return f"there is {b.indefinite()}; {WHERE_WORDS[r][st % len(WHERE_WORDS[r])]} sits {a.indefinite()}"
        return f"{b.indefinite()} with {a.indefinite()} {phrase} it"
    if c.kind == "at":
        _, a, region = c.facts[0]
        phrase = REGION_WORDS[region][st % 2]
        return (f"{a.indefinite()} {phrase}", f"{a.definite()} is {phrase}", f"there is {a.indefinite()} {phrase}")[t]
    if c.kind == "nearest":
        a = c.facts[0][1]
        return (f"the nearest object is {a.indefinite()}", f"{a.definite()} is closest to the camera",
                f"closest to the viewer is {a.indefinite()}")[t]
    if c.kind == "single":
        a = c.facts[1][1]
        return (a.indefinite(), f"a single {a.words()}", f"one object: {a.indefinite()}",
                f"the only shape is {a.indefinite()}", f"{a.indefinite()} on its own",
                f"an image of {a.indefinite()}")[t]
    raise ValueError(f"unknown caption kind {c.kind!r}")


def _fact_json(f: tuple) -> dict:
    if f[0] == "exists":
        return {"type": "exists", "a": f[1].desc()}
    if f[0] == "count":
        return {"type": "count", "n": f[1]}
    if f[0] == "at":
        return {"type": "at", "a": f[1].desc(), "region": f[2]}
    if f[0] == "nearest":
        return {"type": "nearest", "a": f[1].desc()}
    if f[0] == "rel":
        return {"type": "relation", "a": f[1].desc(), "relation": f[2], "b": f[3].desc()}
    raise ValueError(f"unknown fact {f[0]!r}")


def matches(obj: dict, desc: dict) -> bool:
    """Whether an object record fits a description {colour, shape, size (None: any)}."""
    return (obj["colour"] == desc["colour"] and obj["shape"] == desc["shape"]
            and (desc.get("size") is None or obj["size"] == desc["size"]))


def fact_holds(scene: dict, fact: dict) -> bool:
    """Truth of one structured fact (as stored in ``caption_facts``) in a scene record."""
    objs = scene["objects"]
    kind = fact["type"]
    if kind == "exists":
        return any(matches(o, fact["a"]) for o in objs)
    if kind == "count":
        return len(objs) == fact["n"]
    if kind == "at":
        return any(matches(o, fact["a"]) and object_region(o) == fact["region"] for o in objs)
    if kind == "nearest":
        return matches(objs[scene["nearest"]], fact["a"])
    if kind == "relation":
        return any(i != j and matches(a, fact["a"]) and matches(b, fact["b"])
                   and relation_holds(a, fact["relation"], b)
                   for i, a in enumerate(objs) for j, b in enumerate(objs))
    raise ValueError(f"unknown fact type {kind!r}")


def holds(scene: dict, facts: Sequence[dict]) -> bool:
    """Truth of a caption's facts (a conjunction) in a scene record."""
    return all(fact_holds(scene, f) for f in facts)


def _true_caption(kind: str, scene: dict, rng: _Stream, relations: Sequence[str] = RELATIONS) -> _Caption | None:
    """A random true caption of ``kind`` about ``scene``, or None if the scene offers none."""
    objs = scene["objects"]
    style = rng.below(6)
    if kind == "list":
        order = rng.shuffled(range(len(objs)))
        ms = tuple(("exists", _mention(objs[i], rng)) for i in order)
        t = rng.below(_TEMPLATES["list"])
        return _Caption("list", t, style, ((("count", len(objs)),) if t == 2 else ()) + ms)
    if kind == "rel":
        rels = [r for r in scene["relations"] if r[1] in relations]
        if not rels:
            return None
        i, r, j = rng.choice(rels)
        return _Caption("rel", rng.below(_TEMPLATES["rel"]), style,
                        (("rel", _mention(objs[i], rng), r, _mention(objs[j], rng)),))
    if kind == "at":
        placed = [(o, object_region(o, _REGION_MARGIN)) for o in objs]
        placed = [(o, reg) for o, reg in placed if reg is not None]
        if not placed:
            return None
        o, reg = rng.choice(placed)
        return _Caption("at", rng.below(_TEMPLATES["at"]), style, (("at", _mention(o, rng), reg),))
    if kind == "nearest":
        return _Caption("nearest", rng.below(_TEMPLATES["nearest"]), style,
                        (("nearest", _mention(objs[scene["nearest"]], rng)),))
    if kind == "single":
        return _Caption("single", rng.below(_TEMPLATES["single"]), style,
                        (("count", 1), ("exists", _mention(objs[0], rng))))
    raise ValueError(f"unknown caption kind {kind!r}")


def _positive_captions(scene: dict, rng: _Stream, k: int) -> list[_Caption]:
    """``k`` distinct true captions; the first five use distinct kinds where the scene allows."""
    if len(scene["objects"]) == 1:
        kinds = ["single", "single", "single", "at", "at"]
    else:
        kinds = ["list", "rel:spatial", "rel:depth", "at", "nearest"]
    schedule = rng.shuffled(kinds)
    out: list[_Caption] = []
    texts: set[str] = set()
    for step in range(k):
        kind = schedule[step] if step < len(schedule) else rng.choice(kinds)
        for attempt in range(200):
            if attempt >= 20:  # that kind is exhausted or unavailable: any kind will do
                kind = rng.choice(kinds)
            name, _, which = kind.partition(":")
            rel = {"spatial": SPATIAL_RELATIONS, "depth": DEPTH_RELATIONS}.get(which, RELATIONS)
            cap = _true_caption(name, scene, rng, rel)
            if cap is not None and cap.text not in texts:
                out.append(cap)
                texts.add(cap.text)
                break
        else:  # pragma: no cover - synonyms and templates give far more than 20 distinct captions
            raise RuntimeError(f"could not write {k} distinct captions for scene {scene}")
    return out


def _replace_mention(cap: _Caption, at: tuple[int, str], new: _Mention) -> _Caption:
    i, slot = at
    f = list(cap.facts[i])
    f[1 if slot == "a" else 3] = new
    facts = list(cap.facts)
    facts[i] = tuple(f)
    return cap.with_facts(tuple(facts))


def _get_mention(cap: _Caption, at: tuple[int, str]) -> _Mention:
    i, slot = at
    return cap.facts[i][1 if slot == "a" else 3]


def _perturb(kind: str, scene: dict, rng: _Stream) -> tuple[_Caption, _Caption] | None:
    """(negative, source): a true caption and a perturbation of it of ``kind`` (maybe still true; checked later)."""
    multi = len(scene["objects"]) > 1
    if kind == "swap_attributes":
        src = _true_caption(rng.choice(("rel", "list")), scene, rng)
        if src is None:
            return None
        ments = src.mentions()
        p, q = rng.shuffled(range(len(ments)))[:2]
        a, b = _get_mention(src, ments[p]), _get_mention(src, ments[q])
        attrs = [x for x in ("colour", "shape", "size") if getattr(a, x) != getattr(b, x)
                 and getattr(a, x) is not None and getattr(b, x) is not None]
        if not attrs:
            return None
        attr = rng.choice(attrs)
        neg = _replace_mention(src, ments[p], a._replace(**{attr: getattr(b, attr)}))
        neg = _replace_mention(neg, ments[q], b._replace(**{attr: getattr(a, attr)}))
        return neg, src
    if kind == "reverse_relation":
        src = _true_caption("rel", scene, rng)
        if src is None:
            return None
        _, a, r, b = src.facts[0]
        return src.with_facts((("rel", a, REVERSE_RELATION[r], b),)), src
    if kind == "change_attribute":
        src = _true_caption(rng.choice(("rel", "list", "at", "nearest") if multi else ("single", "at")), scene, rng)
        if src is None:
            return None
        at = rng.choice(src.mentions())
        m = _get_mention(src, at)
        attr = rng.choice(("colour", "shape", "size"))
        if attr == "size":  # a mention without a size word gets the wrong one
            true_size = next(o["size"] for o in scene["objects"] if o["colour"] == m.colour and o["shape"] == m.shape)
            new = "large" if true_size == "small" else "small"
        else:
            values = COLOURS if attr == "colour" else SHAPES
            new = rng.choice([v for v in values if v != getattr(m, attr)])
        return _replace_mention(src, at, m._replace(**{attr: new})), src
    raise ValueError(f"unknown hard-negative kind {kind!r}")


def _hard_negatives(scene: dict, rng: _Stream, k: int, positives: set[str]) -> list[tuple[_Caption, str, _Caption]]:
    """``k`` distinct false captions as (negative, kind, source); one-object scenes only get changed attributes."""
    kinds = list(HARD_NEGATIVE_KINDS) if len(scene["objects"]) > 1 else ["change_attribute"]
    schedule = rng.shuffled(kinds)
    out: list[tuple[_Caption, str, _Caption]] = []
    texts = set(positives)
    for step in range(k):
        kind = schedule[step % len(schedule)]
        for attempt in range(300):
            if attempt == 30:  # e.g. no two objects differ in a swappable attribute
                kind = "change_attribute"
            pair = _perturb(kind, scene, rng)
            if pair is None:
                continue
            neg, src = pair
            if neg.text not in texts and not holds(scene, neg.json_facts()):
                out.append((neg, kind, src))
                texts.add(neg.text)
                break
        else:  # pragma: no cover
            raise RuntimeError(f"could not write {k} hard negatives for scene {scene}")
    return out


_NOISY_TEMPLATES = ("the largest object is {}", "the biggest shape is {}", "the largest shape in the picture is {}")


def _noisy_caption(scene: dict, rng: _Stream, noise: float) -> tuple[str, bool]:
    """A caption naming the largest object's shape; with probability ``noise`` the shape word is another shape's."""
    obj = scene["objects"][scene["largest"]]
    corrupted = rng.random() < noise
    shape = rng.choice([s for s in SHAPES if s != obj["shape"]]) if corrupted else obj["shape"]
    colours, shapes = COLOUR_WORDS[obj["colour"]], SHAPE_WORDS[shape]
    colour = colours[rng.below(len(colours))] + " " if rng.random() < 0.5 else ""
    words = colour + shapes[rng.below(len(shapes))]
    t = rng.below(len(_NOISY_TEMPLATES) + 1)
    if t == len(_NOISY_TEMPLATES):
        return f"the {words} is the largest object", corrupted
    return _NOISY_TEMPLATES[t].format(("an " if words[0] in "aeiou" else "a ") + words), corrupted
