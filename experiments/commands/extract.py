"""``alignfuse extract``: cache frozen-encoder features of a dataset (images or captions)."""
from __future__ import annotations

import argparse

NAME = "extract"
HELP = "compute and cache features of a dataset's images or captions with a frozen encoder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="shapesworld",
                        help="shapesworld, digits, csv:PATH (open_clip-style, tab-separated filepath/title) or "
                             "karpathy:PATH (COCO/Flickr Karpathy-split JSON)")
    parser.add_argument("--encoder", default="mobilenet_v2",
                        help="mobilenet_v2, minilm, open_clip_image or open_clip_text (images for *_image and "
                             "mobilenet_v2, captions for the others)")
    parser.add_argument("--model", default=None, help="open_clip model name for open_clip_* encoders (e.g. ViT-B-32)")
    parser.add_argument("--pretrained", default=None,
                        help="open_clip weights: a local checkpoint path, or a hub tag where you have the hub")
    parser.add_argument("--split", default="all", help="dataset split (Karpathy JSON: train/val/test/all)")
    parser.add_argument("--image-root", default=None, help="directory that image paths are relative to")
    parser.add_argument("--n-scenes", type=int, default=2000, help="ShapesWorld: number of scenes")
    parser.add_argument("--image-size", type=int, default=128, help="image side in pixels fed to the encoder")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cache-dir", default=None, help="feature cache root (default ~/.cache/alignfuse/features)")
    parser.add_argument("--npy-out", default=None, metavar="PREFIX",
                        help="also write PREFIX_<kind>.npy (and PREFIX_text_to_image.npy for captions)")


def run(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    from experiments.data import load_csv, load_digits, load_karpathy, load_shapesworld
    from experiments.features import FeatureCache, build_encoder, extract_features

    kind, _, path = args.dataset.partition(":")
    if kind == "shapesworld":
        ds = load_shapesworld(n_scenes=args.n_scenes, image_size=args.image_size)
        images = lambda: ds.images  # noqa: E731
    elif kind == "digits":
        ds = load_digits(image_size=args.image_size)
        images = lambda: ds.images_rgb  # noqa: E731
    elif kind in ("csv", "karpathy") and path:
        ds = load_csv(path, image_root=args.image_root) if kind == "csv" else \
            load_karpathy(path, args.image_root or ".", split=None if args.split == "all" else args.split)
        images = lambda: ds.load_images(args.image_size, args.batch_size)  # noqa: E731
    else:
        raise ValueError(f"--dataset must be shapesworld, digits, csv:PATH or karpathy:PATH, got {args.dataset!r}")

    enc_kwargs = {}
    if args.encoder.startswith("open_clip"):
        enc_kwargs = {"model_name": args.model or "ViT-B-32", "pretrained": args.pretrained}
    encoder = build_encoder(args.encoder, **enc_kwargs)
    text_side = args.encoder in ("minilm", "open_clip_text")
    cache = FeatureCache(args.cache_dir)
    if text_side:
        texts, t2i = ds.flat_captions() if kind in ("csv", "karpathy") else \
            ds.flat_captions(None if args.split == "all" else args.split)
        inputs, split = texts, f"captions-{args.split}"
    else:
        inputs = images()
        if kind in ("shapesworld", "digits") and args.split != "all":
            inputs = inputs[np.asarray(ds.splits[args.split])]
        split, t2i = args.split, None
    t0 = time.perf_counter()
    feats = extract_features(inputs, encoder, cache, ds.fingerprint, split, batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    n = len(inputs)
    print(f"{encoder.name}: {n} {'captions' if text_side else 'images'} of {args.dataset} [{split}] in {seconds:.1f} s "
          f"({n / max(seconds, 1e-9):.1f}/s; a cache hit costs ~0 s)")
    for k, v in feats.items():
        print(f"  {k}: {tuple(v.shape)} {v.dtype}  ({cache.entry_dir(encoder.name, ds.fingerprint, split)})")
        if args.npy_out:
            np.save(f"{args.npy_out}_{k}.npy", np.asarray(v))
    if args.npy_out and t2i is not None:
        np.save(f"{args.npy_out}_text_to_image.npy", np.asarray(t2i))
    return 0
