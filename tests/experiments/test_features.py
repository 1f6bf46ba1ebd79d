"""Frozen encoders and the feature cache (experiments/features.py, encoders.py, encoders_open_clip.py, feature_cache.py)."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.features import (
    ENCODERS,
    MOBILENET_V2_SHA256,
    FeatureCache,
    FrozenEncoder,
    MiniLMEncoder,
    MobileNetV2Encoder,
    OpenClipImageEncoder,
    OpenClipTextEncoder,
    build_encoder,
    encode_batched,
    extract_features,
    fuse_conv_bn,
)

SENTENCES = [
    "a red square",
    "two small blue circles to the left of a large green star, near the top of the picture",
    "A yellow triangle above a purple cross.",
    "nothing",
    "the green star is behind the red square, which is in front of it",
]

# A tiny open_clip CLIP (ViT image tower), so the open_clip paths run in well under a second.
TINY_CLIP = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
    text_cfg=dict(context_length=16, vocab_size=49408, width=64, heads=2, layers=2),
)


def _images(n: int, size: int = 128, seed: int = 0) -> np.ndarray:
    """Smooth random images (blurred noise + a bright square), uint8 [n, size, size, 3]."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (n, size // 16, size // 16, 3)).astype(np.uint8)
    images = low.repeat(16, axis=1).repeat(16, axis=2)
    images[:, size // 4: size // 2, size // 4: size // 2] = 255
    return images


class CountingEncoder(FrozenEncoder):
    """A cheap deterministic image encoder that counts calls; optionally fails or emits NaN."""

    modality = "image"
    kinds = ("pooled", "grid")
    default_kinds = ("pooled", "grid")
    dims = {"pooled": 3, "grid": 3}

    def __init__(self, fail_after: int | None = None, nan_row: int | None = None) -> None:
        self.name = "counting"
        self.calls = 0
        self.rows_seen = 0
        self.fail_after = fail_after
        self.nan_row = nan_row

    def encode(self, images, kinds=None):
        kinds = self.check_kinds(kinds)
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("interrupted")
        self.calls += 1
        x = np.asarray(images, dtype=np.float32)
        pooled = x.mean(axis=(1, 2))
        if self.nan_row is not None and self.rows_seen <= self.nan_row < self.rows_seen + len(x):
            pooled[self.nan_row - self.rows_seen, 0] = np.nan
        self.rows_seen += len(x)
        out = {"pooled": pooled, "grid": x[:, ::8, ::8].reshape(len(x), -1, 3).astype(np.float16)}
        return {k: out[k] for k in kinds}


# ----------------------------------------------------------------------------------------- MobileNetV2


@pytest.fixture(scope="module")
def mobilenet() -> MobileNetV2Encoder:
    return MobileNetV2Encoder()


@pytest.fixture(scope="module")
def reference_mobilenet():
    """Plain torchvision MobileNetV2 with the package weights, loaded strictly."""
    import torchvision

    from align.weights import MOBILENET_V2, package_file

    model = torchvision.models.mobilenet_v2()
    state = torch.load(package_file(*MOBILENET_V2), map_location="cpu", weights_only=True)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model.eval()


def test_mobilenet_weights_are_torchvisions_imagenet_checkpoint(reference_mobilenet):
    import torchvision

    from align.weights import MOBILENET_V2, package_file

    path = package_file(*MOBILENET_V2)
    official = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    # torchvision names checkpoints <arch>-<first 8 hex of sha256>.pth; the full digest pins the file.
    assert path.name == Path(official.url).name
    assert hashlib.sha256(path.read_bytes()).hexdigest() == MOBILENET_V2_SHA256
    assert MOBILENET_V2_SHA256.startswith(path.stem.split("-")[-1])
    # every parameter and buffer comes from the file (strict load above), and it is not an init
    torch.manual_seed(0)
    random_model = torchvision.models.mobilenet_v2().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(reference_mobilenet(x), random_model(x), atol=1e-2)
    bn = reference_mobilenet.features[0][1]
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))  # trained BN statistics


def test_mobilenet_outputs_match_plain_torchvision(mobilenet, reference_mobilenet):
    images = _images(4)
    out = mobilenet.encode(images)
    assert out["pooled"].shape == (4, 1280) and out["pooled"].dtype == np.float32
    assert out["grid"].shape == (4, 16, 1280) and out["grid"].dtype == np.float16

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.no_grad():
        fmap = reference_mobilenet.features(x)
        logits = reference_mobilenet(x)
    ref_grid = fmap.flatten(2).transpose(1, 2).numpy()
    np.testing.assert_allclose(out["pooled"], fmap.mean(dim=(2, 3)).numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out["grid"].astype(np.float32), ref_grid, atol=4e-3, rtol=2e-3)
    # the grid is row-major: position i*w + j is row i, column j of the feature map
    np.testing.assert_allclose(out["grid"][:, 1 * 4 + 2].astype(np.float32), fmap[:, :, 1, 2].numpy(),
                               atol=4e-3, rtol=2e-3)
    # pooled is exactly the classifier's input
    np.testing.assert_allclose(mobilenet.logits(out["pooled"]), logits.numpy(), atol=1e-3, rtol=1e-4)


def test_mobilenet_optimisations_keep_outputs_and_fold_every_batchnorm(mobilenet, reference_mobilenet):
    import copy

    fused = copy.deepcopy(reference_mobilenet.features)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert fuse_conv_bn(fused) == n_bn == 52
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    plain = MobileNetV2Encoder(optimize=False)
    images = _images(2, seed=1)
    assert mobilenet.optimize and plain.name == mobilenet.name
    a, b = plain.encode(images), mobilenet.encode(images)
    np.testing.assert_allclose(a["pooled"], b["pooled"], atol=1e-4, rtol=1e-4)


def test_mobilenet_inputs_pil_resize_and_errors(mobilenet):
    from PIL import Image

    images = _images(2)
    pil = [Image.fromarray(im) for im in images]
    np.testing.assert_array_equal(mobilenet.encode(pil)["pooled"], mobilenet.encode(images)["pooled"])

    small = MobileNetV2Encoder(image_size=64)
    assert small.name == "mobilenet_v2-imagenet-64px" != mobilenet.name
    mixed = [Image.fromarray(images[0]), Image.fromarray(images[1]).resize((96, 80))]
    out = small.encode(mixed, kinds=["grid"])
    assert list(out) == ["grid"] and out["grid"].shape == (2, 4, 1280)

    with pytest.raises(ValueError, match="different sizes"):
        mobilenet.encode(mixed)
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
        mobilenet.encode(images.astype(np.float32))
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
        mobilenet.encode(images[..., :1])
    with pytest.raises(ValueError, match="has no output"):
        mobilenet.encode(images, kinds=["tokens"])


# ---------------------------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm() -> MiniLMEncoder:
    return MiniLMEncoder()


def test_minilm_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(minilm.model_dir), device="cpu")
    expected = reference.encode(SENTENCES, batch_size=2, convert_to_numpy=True)
    got = minilm.encode(SENTENCES)["pooled"]
    assert got.shape == (5, 384) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=2e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    assert reference.max_seq_length == minilm.max_length == 256


def test_minilm_tokens_and_batching_in_length_order(minilm):
    whole = minilm.encode(SENTENCES, kinds=["pooled", "tokens", "mask"])
    tokens, mask = whole["tokens"], whole["mask"]
    assert tokens.shape[:2] == mask.shape and tokens.shape[2] == 384 and tokens.dtype == np.float16
    assert mask.dtype == bool and (mask.sum(1) > 2).all()
    assert not tokens[~mask].any()  # padding positions are zero
    mean = tokens.astype(np.float32).sum(1) / mask.sum(1, keepdims=True)
    np.testing.assert_allclose(mean / np.linalg.norm(mean, axis=1, keepdims=True), whole["pooled"], atol=2e-3)

    order = minilm.batch_order(SENTENCES)
    assert order[0] == 1 and order[-1] == 3  # longest first
    batched = encode_batched(minilm, SENTENCES, batch_size=2, kinds=["pooled", "tokens", "mask"], progress=False)
    np.testing.assert_allclose(batched["pooled"], whole["pooled"], atol=1e-5)
    np.testing.assert_array_equal(batched["mask"], mask)  # padded back to the longest, in input order
    np.testing.assert_allclose(batched["tokens"].astype(np.float32), tokens.astype(np.float32), atol=2e-2)

    with pytest.raises(ValueError, match="single str"):
        minilm.encode("a red square")


# -------------------------------------------------------------------------------------------- open_clip


def test_open_clip_towers_match_the_clip_model(caplog):
    import open_clip
    from PIL import Image

    with caplog.at_level(logging.WARNING, logger="experiments.encoders_open_clip"):
        image_enc = OpenClipImageEncoder(TINY_CLIP, pretrained=None, seed=3)
    assert "random" in caplog.text
    text_enc = build_encoder("open_clip_text", model_name=TINY_CLIP, seed=3)
    assert image_enc.name.endswith("random-s3-image") and text_enc.name.endswith("random-s3-text")
    assert image_enc.dims == {"pooled": 32, "grid": 64} and text_enc.dims == {"pooled": 32}

    with torch.random.fork_rng():
        torch.manual_seed(3)
        clip = open_clip.CLIP(**TINY_CLIP).eval()
    images = _images(3, size=40)
    out = image_enc.encode(images)
    assert out["grid"].shape == (3, 16, 64) and out["grid"].dtype == np.float16
    x = torch.stack([image_enc.preprocess(Image.fromarray(im)) for im in images])
    assert x.shape == (3, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(out["pooled"], clip.encode_image(x).numpy(), atol=1e-5)
        tokens = open_clip.SimpleTokenizer(context_length=16)(SENTENCES)
        np.testing.assert_allclose(text_enc.encode(SENTENCES)["pooled"], clip.encode_text(tokens).numpy(), atol=1e-5)
        np.testing.assert_allclose(image_enc.encode(images, kinds=["pooled"])["pooled"], out["pooled"], atol=1e-6)

    # same seed, same model; another seed, another model and another cache key
    other = OpenClipImageEncoder(TINY_CLIP, seed=4)
    assert other.name != image_enc.name
    assert not np.allclose(other.encode(images)["pooled"], out["pooled"])
    np.testing.assert_array_equal(OpenClipImageEncoder(TINY_CLIP, seed=3).encode(images)["pooled"], out["pooled"])


def test_open_clip_loads_a_local_checkpoint(tmp_path):
    import open_clip

    torch.manual_seed(7)
    clip = open_clip.CLIP(**TINY_CLIP)
    ckpt = tmp_path / "tiny.pt"
    torch.save(clip.state_dict(), ckpt)
    enc = OpenClipTextEncoder(TINY_CLIP, pretrained=str(ckpt))
    assert "tiny-" in enc.name and "random" not in enc.name
    with torch.no_grad():
        expected = clip.eval().encode_text(open_clip.SimpleTokenizer(context_length=16)(SENTENCES[:2])).numpy()
    np.testing.assert_allclose(enc.encode(SENTENCES[:2])["pooled"], expected, atol=1e-5)
    with pytest.raises(ValueError, match="checkpoint file"):
        OpenClipTextEncoder(TINY_CLIP, pretrained="laion2b_s34b_b79k")


def test_unknown_encoder_lists_known_names():
    with pytest.raises(KeyError, match="mobilenet_v2"):
        build_encoder("resnet9000")
    assert {"mobilenet_v2", "minilm", "open_clip_image", "open_clip_text"} <= set(ENCODERS.names())


# ----------------------------------------------------------------------------------------------- cache


def test_cache_hit_skips_compute_and_loads_memory_mapped(tmp_path):
    cache, enc, images = FeatureCache(tmp_path), CountingEncoder(), _images(10, size=32)
    first = extract_features(images, enc, cache, dataset_fingerprint="fp1", split="train", batch_size=4)
    assert enc.calls == 3
    second = extract_features(images, enc, cache, dataset_fingerprint="fp1", split="train", batch_size=4)
    assert enc.calls == 3  # nothing computed the second time
    for out in (first, second):
        assert isinstance(out["pooled"], np.memmap) and not out["pooled"].flags.writeable
        np.testing.assert_array_equal(out["pooled"], images.mean(axis=(1, 2), dtype=np.float32))
    assert out["grid"].shape == (10, 16, 3) and out["grid"].dtype == np.float16

    meta = json.loads((cache.entry_dir("counting", "fp1", "train") / "meta.json").read_text())
    assert meta["encoder"] == "counting" and meta["split"] == "train" and meta["n_rows"] == 10
    grid_file = cache.entry_dir("counting", "fp1", "train") / "grid.npy"
    assert meta["kinds"]["grid"] == {"file": "grid.npy", "shape": [10, 16, 3], "dtype": "float16",
                                     "size": grid_file.stat().st_size,
                                     "sha256": hashlib.sha256(grid_file.read_bytes()).hexdigest(),
                                     "sampled_sha256": meta["kinds"]["grid"]["sampled_sha256"]}
    assert "created" in meta

    # other split, other fingerprint, other kinds: misses
    extract_features(images, enc, cache, dataset_fingerprint="fp1", split="val", batch_size=16)
    extract_features(images, enc, cache, dataset_fingerprint="fp2", split="train", batch_size=16)
    assert enc.calls == 5
    assert set(cache.load("counting", "fp1", "train")) == {"pooled", "grid"}
    assert cache.load("counting", "fp1", "test") is None

    with pytest.raises(ValueError, match="10 rows but 4 inputs"):
        extract_features(images[:4], enc, cache, dataset_fingerprint="fp1", split="train")


def test_cache_get_or_compute_merges_kinds_and_checks_them(tmp_path):
    cache = FeatureCache(tmp_path)
    calls = []

    def compute(kinds):
        calls.append(kinds)
        return {k: np.full((5, 2), i, np.float32) for i, k in enumerate(kinds)}

    cache.get_or_compute("enc", "fp", "all", lambda: compute(["pooled"]), kinds=["pooled"])
    out = cache.get_or_compute("enc", "fp", "all", lambda: compute(["tokens", "mask"]), kinds=["tokens", "mask"])
    assert list(out) == ["tokens", "mask"] and len(calls) == 2
    assert set(cache.load("enc", "fp", "all")) == {"pooled", "tokens", "mask"}  # earlier kind kept
    cache.get_or_compute("enc", "fp", "all", lambda: compute(["x"]), kinds=["pooled", "mask"])
    assert len(calls) == 2
    with pytest.raises(ValueError, match="missing"):
        cache.get_or_compute("enc", "fp", "all", lambda: compute(["a"]), kinds=["b"])
    cache.save("enc", "fp", "all", {"pooled": np.zeros((6, 2), np.float32)})  # new rows: other kinds are stale
    assert set(cache.load("enc", "fp", "all")) == {"pooled"}
    assert sorted(p.name for p in cache.entry_dir("enc", "fp", "all").iterdir()) == ["meta.json", "pooled.npy"]
    with pytest.raises(ValueError, match="different numbers of rows"):
        cache.save("enc", "fp", "x", {"a": np.zeros(3), "b": np.zeros(4)})
    assert cache.remove("enc", "fp", "all") and cache.load("enc", "fp", "all") is None


def test_interrupted_computation_leaves_nothing_cached(tmp_path):
    cache, images = FeatureCache(tmp_path), _images(10, size=32)
    with pytest.raises(RuntimeError, match="interrupted"):
        extract_features(images, CountingEncoder(fail_after=2), cache, dataset_fingerprint="fp", split="train",
                         batch_size=4)
    assert cache.load("counting", "fp", "train") is None
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_interrupted_write_leaves_no_entry_and_no_temp_files(tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path)
    real_save, saved = np.save, []

    def flaky_save(f, arr, **kw):
        if saved:
            f.write(b"partial")
            raise OSError("disk full")
        saved.append(arr.shape)
        real_save(f, arr, **kw)

    monkeypatch.setattr(np, "save", flaky_save)
    with pytest.raises(OSError, match="disk full"):
        cache.save("enc", "fp", "all", {"a": np.zeros((3, 2), np.float32), "b": np.ones((3, 2), np.float32)})
    monkeypatch.undo()
    assert cache.load("enc", "fp", "all") is None  # no sidecar: the finished a.npy alone is no entry
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["a.npy"]  # no temporary or partial file


def test_nan_features_raise_naming_encoder_dataset_and_split(tmp_path):
    cache, images = FeatureCache(tmp_path), _images(10, size=32)
    with pytest.raises(ValueError, match=r"'counting'.*'shapes-123'.*'val'.*'pooled'.*1 NaN.*first bad row 6"):
        extract_features(images, CountingEncoder(nan_row=6), cache, dataset_fingerprint="shapes-123", split="val",
                         batch_size=4)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    with pytest.raises(ValueError, match="Inf"):
        cache.save("enc", "fp", "all", {"a": np.array([[1.0, np.inf]], np.float16)})
    with pytest.raises(ValueError, match="NaN"):  # also without a cache
        extract_features(images, CountingEncoder(nan_row=0), batch_size=4)


def test_cache_keys_are_safe_directory_names(tmp_path):
    cache = FeatureCache(tmp_path)
    d = cache.entry_dir("open_clip-ViT-B-32-laion2b", "../../etc", "train/x")
    assert tmp_path in d.parents and ".." not in d.relative_to(tmp_path).parts
    assert cache.entry_dir("a/b", "f", "s") != cache.entry_dir("a_b", "f", "s")
    with pytest.raises(ValueError, match="dataset_fingerprint"):
        cache.entry_dir("enc", "", "train")
    with pytest.raises(ValueError, match="needs a dataset_fingerprint"):
        extract_features(_images(2, size=32), CountingEncoder(), cache)


def test_extract_features_with_real_encoder_and_cache(tmp_path, mobilenet):
    cache, images = FeatureCache(tmp_path), _images(3)
    out = extract_features(images, mobilenet, cache, dataset_fingerprint="fp", split="train", batch_size=2)
    assert out["pooled"].shape == (3, 1280) and out["grid"].shape == (3, 16, 1280)
    np.testing.assert_allclose(out["pooled"], mobilenet.encode(images)["pooled"], atol=1e-5)
    assert (tmp_path / "mobilenet_v2-imagenet" / "fp" / "train" / "grid.npy").is_file()

    # a second run loads no weights at all: the encoder's model is built on first use only
    fresh = MobileNetV2Encoder()
    again = extract_features(images, fresh, cache, dataset_fingerprint="fp", split="train")
    assert "model" not in vars(fresh)
    np.testing.assert_array_equal(again["grid"], out["grid"])
    text = MiniLMEncoder()
    assert text.dims == {"pooled": 384, "tokens": 384} and "model" not in vars(text)
