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

The package, one thing per module (every name below imports from ``experiments.data.shapesworld`` as well):

=================  ===========================================================================================
``vocab``          colours, shapes, sizes, relations, regions and the words captions use for them
``scenes``         the random stream, scene sampling, geometry constants, ``relation_holds``/``object_region``
``render``         scene records to RGB images and depth maps (``render_scenes``)
``captions``       mentions, caption templates, structured facts (``holds``) and true captions
``negatives``      compositional hard negatives and the noisy captions
``dataset``        ``ShapesWorldConfig``, ``ShapesWorld`` (arrays, text, save/load) and the cache fingerprint
``generate``       ``generate_shapesworld`` (chunked, deterministic) and the fusion-task labels
this module        ``load_shapesworld``: the cache in front of ``generate_shapesworld``
=================  ===========================================================================================
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from align.weights import clean_stale_temps, temp_prefix
from experiments.data._common import replace_config
from experiments.data.shapesworld.captions import fact_holds, holds, matches
from experiments.data.shapesworld.dataset import (GENERATOR_VERSION, MIN_IMAGE_SIZE, ShapesWorld, ShapesWorldConfig,
                                                  shapesworld_fingerprint)
from experiments.data.shapesworld.generate import generate_shapesworld, scene_labels
from experiments.data.shapesworld.negatives import _hard_negatives  # noqa: F401  (experiments.qformer_data uses it)
from experiments.data.shapesworld.render import render_scenes
from experiments.data.shapesworld.scenes import _Stream  # noqa: F401  (experiments.qformer_data uses it)
from experiments.data.shapesworld.scenes import MAX_OBJECTS, REL_MARGIN, object_region, relation_holds
from experiments.data.shapesworld.vocab import (COLOUR_RGB, COLOUR_WORDS, COLOURS, DEPTH_RELATIONS,
                                                HARD_NEGATIVE_KINDS, NUMBER_WORDS, REGION_WORDS, REGIONS,
                                                RELATION_WORDS, RELATIONS, REVERSE_RELATION, SHAPE_WORDS, SHAPES,
                                                SIZE_WORDS, SIZES, SPATIAL_RELATIONS, WHERE_WORDS)

log = logging.getLogger(__name__)

__all__ = [
    "COLOURS", "COLOUR_RGB", "COLOUR_WORDS", "DEPTH_RELATIONS", "GENERATOR_VERSION", "HARD_NEGATIVE_KINDS",
    "MAX_OBJECTS", "MIN_IMAGE_SIZE", "NUMBER_WORDS", "REGIONS", "REGION_WORDS", "RELATIONS", "RELATION_WORDS",
    "REL_MARGIN", "REVERSE_RELATION", "SHAPES", "SHAPE_WORDS", "SIZES", "SIZE_WORDS", "SPATIAL_RELATIONS",
    "ShapesWorld", "ShapesWorldConfig", "WHERE_WORDS", "fact_holds", "generate_shapesworld", "holds",
    "load_shapesworld", "matches", "object_region", "relation_holds", "render_scenes", "scene_labels",
    "shapesworld_fingerprint",
]


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
