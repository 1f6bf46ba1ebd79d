"""ShapesWorld: determinism, scene/pixel/text consistency, negatives, labels, splits, holdout, cache, bad config."""
from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest

from experiments.data import shapesworld as sw
from experiments.data.shapesworld import (
    COLOUR_WORDS,
    COLOURS,
    HARD_NEGATIVE_KINDS,
    REL_MARGIN,
    RELATION_WORDS,
    REVERSE_RELATION,
    SHAPE_WORDS,
    SHAPES,
    SIZE_WORDS,
    WHERE_WORDS,
    ShapesWorld,
    ShapesWorldConfig,
    load_shapesworld,
)

N, SIZE = 200, 128


@pytest.fixture(scope="module")
def world() -> ShapesWorld:
    return load_shapesworld(n_scenes=N, image_size=SIZE, seed=3, use_cache=False)


# --- an independent reading of the facts, from object coordinates only -------------------------------------


def _fits(o: dict, d: dict) -> bool:
    return o["colour"] == d["colour"] and o["shape"] == d["shape"] and d["size"] in (None, o["size"])


def _rel(a: dict, r: str, b: dict) -> bool:
    return {
        "left_of": a["x"] + REL_MARGIN < b["x"], "right_of": b["x"] + REL_MARGIN < a["x"],
        "above": a["y"] + REL_MARGIN < b["y"], "below": b["y"] + REL_MARGIN < a["y"],
        "in_front_of": a["depth"] < b["depth"], "behind": b["depth"] < a["depth"],
    }[r]


def _region(o: dict) -> str:
    row = ("top", "", "bottom")[min(int(o["y"] * 3), 2)]
    col = ("left", "", "right")[min(int(o["x"] * 3), 2)]
    return f"{row} {col}".strip() or "centre"


def _true(scene: dict, f: dict) -> bool:
    objs = scene["objects"]
    if f["type"] == "exists":
        return any(_fits(o, f["a"]) for o in objs)
    if f["type"] == "count":
        return len(objs) == f["n"]
    if f["type"] == "at":
        return any(_fits(o, f["a"]) and _region(o) == f["region"] for o in objs)
    if f["type"] == "nearest":
        return _fits(min(objs, key=lambda o: o["depth"]), f["a"])
    assert f["type"] == "relation"
    return any(_fits(a, f["a"]) and _fits(b, f["b"]) and _rel(a, f["relation"], b)
               for a in objs for b in objs if a is not b)


def _mentions(facts: list[dict]) -> list[dict]:
    return [f[k] for f in facts for k in ("a", "b") if k in f]


def _names_in(text: str, d: dict) -> bool:
    ok = any(w in text for w in COLOUR_WORDS[d["colour"]]) and any(w in text for w in SHAPE_WORDS[d["shape"]])
    return ok and (d["size"] is None or any(w in text for w in SIZE_WORDS[d["size"]]))


# --- tests ----------------------------------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_data_and_other_seed_differs(world):
    again = load_shapesworld(n_scenes=N, image_size=SIZE, seed=3, use_cache=False)
    assert world.images.tobytes() == again.images.tobytes()
    assert world.depth.tobytes() == again.depth.tobytes()
    assert world.captions == again.captions and world.hard_negatives == again.hard_negatives
    assert world.noisy_captions == again.noisy_captions and world.scenes == again.scenes
    other = load_shapesworld(n_scenes=20, image_size=SIZE, seed=4, use_cache=False)
    assert other.images.tobytes() != world.images[:20].tobytes()
    assert other.captions != world.captions[:20]


def test_smaller_dataset_is_a_prefix_of_a_larger_one(world):
    small = load_shapesworld(n_scenes=30, image_size=SIZE, seed=3, use_cache=False)
    assert small.images.tobytes() == world.images[:30].tobytes()
    assert small.captions == world.captions[:30] and small.scenes == world.scenes[:30]


def test_shapes_counts_and_vocabulary(world):
    assert world.images.shape == (N, SIZE, SIZE, 3) and world.images.dtype == np.uint8
    assert world.depth.shape == (N, SIZE, SIZE) and world.depth.dtype == np.uint8
    assert len(world) == N == len(world.captions) == len(world.hard_negatives) == len(world.noisy_captions)
    for caps, negs, kinds in zip(world.captions, world.hard_negatives, world.hard_negative_kinds):
        assert len(caps) >= 5 and len(set(caps)) == len(caps)
        assert len(negs) == len(kinds) >= 3 and set(kinds) <= set(HARD_NEGATIVE_KINDS)
        assert not set(caps) & set(negs)
    n_objects = Counter(len(s["objects"]) for s in world.scenes)
    assert set(n_objects) == {1, 2, 3, 4}
    objs = [o for s in world.scenes for o in s["objects"]]
    assert {o["shape"] for o in objs} == set(SHAPES) and len(SHAPES) >= 5
    assert {o["colour"] for o in objs} == set(COLOURS) and len(COLOURS) >= 6
    assert {o["size"] for o in objs} == {"small", "large"}
    for s in world.scenes:  # every (colour, shape) names one object of its scene
        combos = [(o["colour"], o["shape"]) for o in s["objects"]]
        assert len(set(combos)) == len(combos)
    json.dumps(world.scenes)
    json.dumps(world.caption_facts)
    json.dumps(world.hard_negative_facts)


def test_captions_are_varied_and_use_synonyms(world):
    texts = [c for caps in world.captions for c in caps]
    for phrase in ("disc", "little", "tiny", "crimson", "left of", "there is", "in the top left", "; to its left sits"):
        assert any(phrase in t for t in texts), phrase
    singles = [caps for caps, s in zip(world.captions, world.scenes) if len(s["objects"]) == 1]
    assert singles and all(len(set(c)) >= 5 for c in singles)


def test_positive_captions_are_true_and_name_their_facts(world):
    for scene, caps, facts in zip(world.scenes, world.captions, world.caption_facts):
        assert len(caps) == len(facts)
        for text, fs in zip(caps, facts):
            assert fs and all(_true(scene, f) for f in fs), (text, fs)
            assert sw.holds(scene, fs)
            assert all(_names_in(text, d) for d in _mentions(fs)), (text, fs)
            for f in fs:
                if f["type"] == "relation":
                    words = RELATION_WORDS[f["relation"]] + WHERE_WORDS[f["relation"]]
                    assert any(w in text for w in words), text


def test_hard_negatives_are_false_and_minimal_edits_of_true_captions(world):
    seen = Counter()
    for scene, negs, kinds, srcs, facts in zip(world.scenes, world.hard_negatives, world.hard_negative_kinds,
                                               world.hard_negative_sources, world.hard_negative_facts):
        single = len(scene["objects"]) == 1
        if single:
            assert set(kinds) == {"change_attribute"}
        for text, kind, fs in zip(negs, kinds, facts):
            seen[kind] += 1
            assert not all(_true(scene, f) for f in fs), (text, scene)
            assert not sw.holds(scene, fs)
            assert all(_names_in(text, d) for d in _mentions(fs)), (text, fs)
        assert all(s not in negs for s in srcs)
        if not single:
            assert len(set(kinds)) >= 2
    assert all(seen[k] > 50 for k in HARD_NEGATIVE_KINDS), seen


def test_hard_negative_kinds_edit_what_they_say(world):
    """Regenerate the (negative, source) pairs of a few scenes and compare their facts field by field."""
    checked = Counter()
    for scene in world.scenes[:60]:
        rng = sw._Stream([0, 9, len(checked)])
        for neg, kind, src in sw._hard_negatives(scene, rng, 3, set()):
            a, b = neg.json_facts(), src.json_facts()
            assert sw.holds(scene, b) and not sw.holds(scene, a)
            if kind == "reverse_relation":
                assert a[0]["relation"] == REVERSE_RELATION[b[0]["relation"]]
                assert (a[0]["a"], a[0]["b"]) == (b[0]["a"], b[0]["b"])
            else:
                ma, mb = _mentions(a), _mentions(b)
                diffs = [(x, y) for x, y in zip(ma, mb) if x != y]
                if kind == "change_attribute":
                    assert len(diffs) == 1 and sum(x[k] != y[k] for x, y in diffs for k in x) == 1
                else:  # swap: two mentions trade one attribute, the multiset of values is unchanged
                    assert len(diffs) == 2
                    (k,) = {k for x, y in diffs for k in x if x[k] != y[k]}
                    assert sorted(str(m[k]) for m in ma) == sorted(str(m[k]) for m in mb)
            checked[kind] += 1
    assert set(checked) == set(HARD_NEGATIVE_KINDS)


def test_depth_map_and_pixels_match_the_scene_record(world):
    s = SIZE
    for img, depth, scene in zip(world.images[:80], world.depth[:80], world.scenes[:80]):
        objs = scene["objects"]
        values = [o["depth_value"] for o in objs]
        assert len(set(values)) == len(values)
        assert set(np.unique(depth).tolist()) == set(values) | {255}
        nearest = objs[scene["nearest"]]
        assert nearest["depth_value"] == depth.min() == min(values)
        ys, xs = np.nonzero(depth == nearest["depth_value"])
        assert len(ys) > 0
        for o in objs:
            ys, xs = np.nonzero(depth == o["depth_value"])
            assert abs(xs.mean() + 0.5 - o["x"] * s) < 1.5 and abs(ys.mean() + 0.5 - o["y"] * s) < 1.5
            # equal-area shapes: pixel area is that of the disc of radius `radius`, whatever the shape
            assert abs(len(ys) / (np.pi * (o["radius"] * s) ** 2) - 1) < 0.15, o
            # the RGB pixels of the object carry its colour (up to the +-8 noise)
            rgb = img[depth == o["depth_value"]].astype(int)
            assert np.abs(rgb.mean(0) - np.array(o["rgb"])).max() < 3
        bg = img[depth == 255].astype(int)
        assert 40 < bg.mean() < 220 and bg.std() > 2  # textured, not flat
    objs = [o for sc in world.scenes for o in sc["objects"]]
    r = np.corrcoef([o["radius"] for o in objs], [o["depth"] for o in objs])[0, 1]
    assert abs(r) < 0.15  # apparent size carries no depth cue


def test_labels_match_the_scene(world):
    lab, names = world.labels, world.class_names
    for task in ("nearest_colour", "largest_shape", "shape_colour", "n_objects"):
        assert lab[task].shape == (N,) and lab[task].dtype == np.int64
        assert 0 <= lab[task].min() and lab[task].max() < len(names[task])
    for i, scene in enumerate(world.scenes):
        objs = scene["objects"]
        near = min(objs, key=lambda o: o["depth"])
        big = max(objs, key=lambda o: o["radius"])
        assert names["nearest_colour"][lab["nearest_colour"][i]] == near["colour"]
        assert names["largest_shape"][lab["largest_shape"][i]] == big["shape"]
        assert names["shape_colour"][lab["shape_colour"][i]] == f"{big['colour']} {big['shape']}"
        assert lab["n_objects"][i] == len(objs) - 1
        areas = {o["depth_value"]: int((world.depth[i] == o["depth_value"]).sum()) for o in objs}
        assert max(areas, key=areas.get) == big["depth_value"]  # "largest" is visible in the pixels
    assert len(np.unique(lab["nearest_colour"])) == len(COLOURS)


def test_noisy_captions_are_corrupted_at_the_configured_rate(world):
    rate = world.noisy_corrupted.mean()
    assert abs(rate - world.config.caption_noise) < 3 * np.sqrt(0.25 * 0.75 / N)
    for text, bad, scene in zip(world.noisy_captions, world.noisy_corrupted, world.scenes):
        shape = scene["objects"][scene["largest"]]["shape"]
        named = [s for s in SHAPES if any(w in text.split() or w in text for w in SHAPE_WORDS[s])]
        assert len(named) == 1 and (named[0] != shape) == bool(bad), (text, shape)
    clean = load_shapesworld(n_scenes=30, image_size=32, caption_noise=0.0, use_cache=False)
    assert not clean.noisy_corrupted.any()


def test_splits_are_disjoint_cover_everything_and_are_fixed_by_seed(world):
    sp = world.splits
    assert set(sp) == {"train", "val", "test", "zeroshot"} and len(sp["zeroshot"]) == 0
    allidx = np.concatenate(list(sp.values()))
    assert np.array_equal(np.sort(allidx), np.arange(N))
    assert (len(sp["train"]), len(sp["val"]), len(sp["test"])) == (160, 20, 20)
    assert all(np.all(np.diff(v) > 0) for v in sp.values() if len(v))
    again = load_shapesworld(n_scenes=N, image_size=32, seed=3, use_cache=False)
    assert all(np.array_equal(sp[k], again.splits[k]) for k in sp)
    other = load_shapesworld(n_scenes=N, image_size=32, seed=5, use_cache=False)
    assert not np.array_equal(sp["train"], other.splits["train"])


def test_holdout_combinations_never_reach_train_val_or_test(world):
    held = {("red", "circle"), ("blue", "square")}
    data = load_shapesworld(n_scenes=N, image_size=SIZE, seed=3, holdout=[("red", "circle"), "blue square"],
                            use_cache=False)
    assert data.images.tobytes() == world.images.tobytes()  # a holdout only moves scenes between splits

    def has(i: int) -> bool:
        return any((o["colour"], o["shape"]) in held for o in data.scenes[i]["objects"])

    zs = data.splits["zeroshot"]
    assert len(zs) > 0 and all(has(i) for i in zs)
    for name in ("train", "val", "test"):
        assert not any(has(i) for i in data.splits[name]), name
    allidx = np.concatenate(list(data.splits.values()))
    assert np.array_equal(np.sort(allidx), np.arange(N))


def test_flat_captions_hard_negatives_and_subset(world):
    idx = world.splits["val"]
    texts, t2i = world.flat_captions("val")
    assert len(texts) == len(t2i) == sum(len(world.captions[i]) for i in idx)
    assert t2i.min() == 0 and t2i.max() == len(idx) - 1 and np.all(np.diff(t2i) >= 0)
    for t, j in zip(texts, t2i):
        assert t in world.captions[idx[j]]
    negs, n2i, kinds = world.flat_hard_negatives("val")
    assert len(negs) == len(n2i) == len(kinds) and n2i.max() == len(idx) - 1
    sub = world.subset("val")
    assert len(sub) == len(idx) and np.array_equal(sub.images, world.images[idx])
    assert sub.flat_captions("val")[0] == texts
    assert np.array_equal(sub.labels["nearest_colour"], world.labels["nearest_colour"][idx])
    with pytest.raises(KeyError, match="known splits"):
        world.flat_captions("nope")


def test_cache_round_trip_reads_the_cache_the_second_time(tmp_path, monkeypatch):
    first = load_shapesworld(n_scenes=40, image_size=48, seed=1, cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [f"shapesworld-{first.fingerprint}"]
    files = {p.relative_to(first.cache_path).as_posix() for p in first.cache_path.rglob("*") if p.is_file()}
    assert {"images.npy", "depth.npy", "scenes.json", "text.json", "meta.json", "splits/train.npy"} <= files

    def no_generation(*a, **k):
        raise AssertionError("regenerated instead of reading the cache")

    monkeypatch.setattr(sw, "generate_shapesworld", no_generation)
    second = load_shapesworld(n_scenes=40, image_size=48, seed=1, cache_dir=tmp_path)
    assert second.images.tobytes() == first.images.tobytes() and second.depth.tobytes() == first.depth.tobytes()
    assert second.captions == first.captions and second.scenes == first.scenes
    assert second.hard_negatives == first.hard_negatives and second.caption_facts == first.caption_facts
    assert second.noisy_captions == first.noisy_captions
    assert all(np.array_equal(second.labels[k], first.labels[k]) for k in first.labels)
    assert all(np.array_equal(second.splits[k], first.splits[k]) for k in first.splits)
    assert second.class_names == first.class_names and second.config == first.config


def test_interrupted_cache_write_leaves_no_cache(tmp_path, monkeypatch):
    real = sw.dataset.save_json  # ShapesWorld.save writes through it

    def crash(path, obj):
        if path.name == "scenes.json":
            raise KeyboardInterrupt("simulated crash while writing")
        real(path, obj)

    monkeypatch.setattr(sw.dataset, "save_json", crash)
    with pytest.raises(KeyboardInterrupt):
        load_shapesworld(n_scenes=10, image_size=32, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither a half cache nor a temporary directory
    monkeypatch.setattr(sw.dataset, "save_json", real)
    data = load_shapesworld(n_scenes=10, image_size=32, cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [f"shapesworld-{data.fingerprint}"]


def test_unreadable_cache_is_regenerated(tmp_path):
    first = load_shapesworld(n_scenes=10, image_size=32, cache_dir=tmp_path)
    os.remove(first.cache_path / "images.npy")
    again = load_shapesworld(n_scenes=10, image_size=32, cache_dir=tmp_path)
    assert again.images.tobytes() == first.images.tobytes()
    assert (first.cache_path / "images.npy").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [first.cache_path.name]


def test_fingerprint_follows_the_config():
    a = sw.shapesworld_fingerprint(ShapesWorldConfig(n_scenes=10))
    assert a == sw.shapesworld_fingerprint(ShapesWorldConfig(n_scenes=10))
    assert a != sw.shapesworld_fingerprint(ShapesWorldConfig(n_scenes=10, seed=1))
    assert a != sw.shapesworld_fingerprint(ShapesWorldConfig(n_scenes=10, holdout=[("red", "star")]))
    assert ShapesWorldConfig(holdout="red star").holdout == (("red", "star"),)


@pytest.mark.parametrize("kw, match", [
    ({"n_scenes": 0}, "n_scenes must be positive"),
    ({"image_size": 16}, "image_size must be at least 32"),
    ({"holdout": [("pink", "circle")]}, "unknown colour 'pink'"),
    ({"holdout": [("red", "blob")]}, "unknown shape 'blob'"),
    ({"holdout": ["red"]}, r"\(colour, shape\) pairs"),
    ({"caption_noise": 1.5}, "caption_noise"),
    ({"max_objects": 5}, "max_objects"),
    ({"train_fraction": 0.9}, "sum to 1"),
    ({"n_scenes": 2.5}, "n_scenes must be an integer"),
    ({"colour_count": 3}, "unknown ShapesWorld option"),
])
def test_bad_config_raises_a_clear_error(kw, match):
    with pytest.raises(ValueError, match=match):
        load_shapesworld(use_cache=False, **kw)
