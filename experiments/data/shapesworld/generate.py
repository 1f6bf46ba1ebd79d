"""ShapesWorld generation: scenes, text and pixels for a config, in chunks with one random stream per chunk and
purpose, so the output is byte-identical for equal configs (and a larger data set starts with a smaller one's
scenes)."""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from experiments.data._common import gc_paused, seeded_splits
from experiments.data.shapesworld.captions import _positive_captions
from experiments.data.shapesworld.dataset import ShapesWorld, ShapesWorldConfig, shapesworld_fingerprint
from experiments.data.shapesworld.negatives import _hard_negatives, _noisy_caption
from experiments.data.shapesworld.render import render_scenes
from experiments.data.shapesworld.scenes import MAX_OBJECTS, _sample_scene, _Stream
from experiments.data.shapesworld.vocab import COLOURS, NUMBER_WORDS, SHAPES

log = logging.getLogger(__name__)

_CHUNK = 128  # scenes per random stream (fixed: the output must not depend on it)


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
