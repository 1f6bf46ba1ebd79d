"""A multimodal LM: frozen vision features → trainable connector → frozen causal LM.

Sequence layout of one sample (unified embedding-decoder connectors)::

    [prefix] [image tokens × M] [prompt] [caption tokens] [eos] [pad ...]
     bos if     connector(x)     "Caption:"  " a red circle ..."
     the tokenizer adds one (+ the prompt's text before an ``{image}`` placeholder, if it has one)

Labels are the caption's token ids (and its eos) and ``-100`` everywhere else: prefix, image
positions, prompt and padding. With a gated cross-attention connector (``kind == "xattn"``) there
are no image positions; the LM's layers attend to the features through the connector's blocks.
Every sample of a batch has the same prefix length, so captions are right-padded and start at
the same position, and logits are computed for the caption positions only.

Batches (what :meth:`MultimodalLM.loss` takes; the Trainer's default collation builds them
from :class:`ImageCaptionDataset`): ``"image"`` features ``[B, N, d_v]`` (or raw images when a
``vision`` callable is given) and either ``"input_ids"``/``"attention_mask"`` ``[B, T]`` from
:func:`tokenize_captions` or ``"text"``, a list of B caption strings tokenised on the fly.

Only the connector is trainable: the LM (and a vision module) are frozen and stay in eval mode
whatever ``train()`` is called with, and ``state_dict()`` holds the connector only (keys
``connector.*``), so a Trainer checkpoint of a MultimodalLM is a few MB, not the LM.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from align.llm import freeze

log = logging.getLogger(__name__)

ImageMode = Literal["image", "none", "shuffled"]
IMAGE_MODES = ("image", "none", "shuffled")
DEFAULT_PROMPT = "Caption:"


def tokenize_captions(tokenizer: Any, captions: Sequence[str], max_tokens: int = 48, pad_to: int | None = None,
                      leading_space: bool = True) -> dict[str, Tensor]:
    """Caption token ids as the LM will read them after the prompt: ``" " + caption`` (``caption`` without
    ``leading_space``, for prompts that end in whitespace) then eos.

    Returns ``input_ids`` and ``attention_mask`` ``[N, T]`` (long), right-padded with the
    tokenizer's pad id to the longest caption (or ``pad_to``); captions longer than
    ``max_tokens`` (eos included) are truncated, keeping the eos.
    """
    if isinstance(captions, str):
        raise ValueError("tokenize_captions expects a list of strings, got one string")
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2 (a token and the eos), got {max_tokens}")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is None or pad is None:
        raise ValueError("the tokenizer needs an eos token and a pad token (load_llm sets pad = eos)")
    space = " " if leading_space else ""
    rows = tokenizer([space + c.strip() for c in captions], add_special_tokens=False)["input_ids"]
    rows = [list(r[: max_tokens - 1]) + [eos] for r in rows]
    width = max((len(r) for r in rows), default=1)
    if pad_to is not None:
        if pad_to < width:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest caption ({width} tokens)")
        width = pad_to
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def caption_leading_space(prompt: str) -> bool:
    """Whether captions read ``" " + caption`` after ``prompt``: unless the prompt ends in whitespace."""
    return not prompt.replace("{image}", "")[-1:].isspace()


class ImageCaptionDataset(Dataset):
    """(image features, caption) pairs: ``ds[i] = {"image": [N, d_v] float32, "input_ids": [T], "attention_mask": [T]}``.

    ``features`` ``[n_images, N, d_v]`` (numpy, memory-mapped or not, or a tensor; any float
    dtype) is stored once; ``text_to_image`` ``[n_captions]`` says which image row each caption
    describes. Captions are tokenised up front with :func:`tokenize_captions` (pass the model's
    ``caption_leading_space``).
    """

    def __init__(self, features: np.ndarray | Tensor, captions: Sequence[str], text_to_image: np.ndarray | Tensor,
                 tokenizer: Any, max_tokens: int = 48, leading_space: bool = True) -> None:
        self.features = features
        self.text_to_image = np.asarray(text_to_image, dtype=np.int64)
        if len(captions) != len(self.text_to_image):
            raise ValueError(f"{len(captions)} captions but text_to_image has {len(self.text_to_image)} rows")
        if len(self.text_to_image) and (self.text_to_image.min() < 0 or self.text_to_image.max() >= len(features)):
            raise ValueError(f"text_to_image must index the {len(features)} feature rows, "
                             f"got values in [{self.text_to_image.min()}, {self.text_to_image.max()}]")
        self.tokens = tokenize_captions(tokenizer, captions, max_tokens, leading_space=leading_space)

    def __len__(self) -> int:
        return len(self.text_to_image)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        x = self.features[int(self.text_to_image[i])]
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).float()
        return {"image": x, "input_ids": self.tokens["input_ids"][i], "attention_mask": self.tokens["attention_mask"][i]}


class MultimodalLM(nn.Module):
    """Frozen LM + trainable connector (+ optional frozen vision callable), trained on caption loss.

    Args:
        llm: a Hugging Face causal LM (frozen here).
        tokenizer: its tokenizer (needs eos and pad tokens).
        connector: a module from :mod:`align.connectors` with ``vision_dim``/``lm_dim``/``kind``.
        prompt: text between the image and the caption; with an ``{image}`` placeholder, the text before
            it goes before the image tokens (e.g. a chat template's user turn) and the rest after.
            Captions get a leading space unless the prompt ends in whitespace.
        max_caption_tokens: captions (eos included) are truncated to this many tokens.
        vision: ``None`` when batches carry features ``[B, N, d_v]``; otherwise a callable (e.g. a
            trained aligner's image tower, an open_clip visual tower wrapped to return tokens) mapping
            ``batch["image"]`` to such features; an ``nn.Module`` is frozen.
    """

    def __init__(self, llm: nn.Module, tokenizer: Any, connector: nn.Module, prompt: str = DEFAULT_PROMPT,
                 max_caption_tokens: int = 48, vision: Callable[[Any], Tensor] | None = None) -> None:
        super().__init__()
        d_lm = llm.get_input_embeddings().embedding_dim
        if connector.lm_dim != d_lm:
            raise ValueError(f"connector outputs width {connector.lm_dim} but the LM's embeddings are {d_lm} wide")
        self.llm = freeze(llm)
        self.connector = connector
        self.vision = freeze(vision) if isinstance(vision, nn.Module) else None  # registered: moves with .to()
        self._vision_fn = None if isinstance(vision, nn.Module) else vision
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.max_caption_tokens = max_caption_tokens
        if prompt.count("{image}") > 1:
            raise ValueError(f"prompt has more than one {{image}} placeholder: {prompt!r}")
        before, after = prompt.split("{image}") if "{image}" in prompt else ("", prompt)
        prefix = tokenizer("", add_special_tokens=True)["input_ids"]  # bos, if the tokenizer adds one
        prefix = list(prefix) + (tokenizer(before, add_special_tokens=False)["input_ids"] if before else [])
        prompt_ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        self.caption_leading_space = caption_leading_space(prompt)
        self.register_buffer("prefix_ids", torch.tensor(list(prefix), dtype=torch.long), persistent=False)
        self.register_buffer("prompt_ids", torch.tensor(list(prompt_ids), dtype=torch.long), persistent=False)
        if getattr(connector, "kind", "tokens") == "xattn":
            connector.attach(llm)
        n_train = sum(p.numel() for p in self.parameters() if p.requires_grad)
        n_frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        log.info("MultimodalLM: %s trainable parameters (connector %s), %s frozen", f"{n_train:,}",
                 getattr(connector, "name", type(connector).__name__), f"{n_frozen:,}")

    # ------------------------------------------------------------------ module plumbing
    @property
    def kind(self) -> str:
        return getattr(self.connector, "kind", "tokens")

    def train(self, mode: bool = True) -> "MultimodalLM":
        """Train mode for the connector only; the LM and the vision module stay in eval mode."""
        self.training = mode
        self.connector.train(mode)
        self.llm.eval()
        if self.vision is not None:
            self.vision.eval()
        return self

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False
                   ) -> dict[str, Any]:
        """The connector's state only (keys ``connector.*``): the LM and vision are frozen, loaded from their files."""
        if args:
            raise TypeError("MultimodalLM.state_dict takes keyword arguments only")
        out = {} if destination is None else destination
        self.connector.state_dict(destination=out, prefix=prefix + "connector.", keep_vars=keep_vars)
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load a :meth:`state_dict` (``connector.*`` keys); other keys are an error under ``strict``."""
        inner = {k[len("connector."):]: v for k, v in state_dict.items() if k.startswith("connector.")}
        other = [k for k in state_dict if not k.startswith("connector.")]
        if other and strict:
            raise RuntimeError(f"MultimodalLM state dicts hold connector.* keys only; unexpected: {other[:5]}")
        return self.connector.load_state_dict(inner, strict=strict, assign=assign)

    def detach(self) -> None:
        """Remove a gated cross-attention connector's hooks from the LM (no-op for token connectors)."""
        if self.kind == "xattn":
            self.connector.detach()

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    # ------------------------------------------------------------------ inputs
    def image_features(self, image: Any) -> Tensor:
        """Features ``[B, N, d_v]`` on the LM's device: ``vision(image)`` (no grad) or ``image`` itself."""
        vision = self.vision if self.vision is not None else self._vision_fn
        if vision is not None:
            with torch.no_grad():
                image = vision(image)
        x = torch.as_tensor(image).to(self.device)
        if not x.is_floating_point():
            raise ValueError(f"image features must be floating point, got {x.dtype} (pass vision= for raw images)")
        return x.to(self.llm.get_input_embeddings().weight.dtype)

    def _caption_tokens(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        if "input_ids" in batch:
            ids, mask = batch["input_ids"], batch.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask
        elif "text" in batch:
            tok = self.tokenize(batch["text"])
            ids, mask = tok["input_ids"], tok["attention_mask"]
        else:
            raise KeyError(f"batch needs 'input_ids' (+ 'attention_mask') or 'text'; it has {sorted(batch)}")
        if ids.dim() != 2 or ids.shape != mask.shape:
            raise ValueError(f"input_ids {tuple(ids.shape)} and attention_mask {tuple(mask.shape)} must be equal [B, T]")
        width = max(int(mask.sum(1).max()), 1) if mask.numel() else 1  # drop all-padding columns
        return ids[:, :width].to(self.device), mask[:, :width].to(self.device)

    def tokenize(self, captions: Sequence[str]) -> dict[str, Tensor]:
        """:func:`tokenize_captions` with this model's caption length and leading-space rule."""
        return tokenize_captions(self.tokenizer, captions, self.max_caption_tokens,
                                 leading_space=self.caption_leading_space)

    def _image_tokens(self, features: Tensor, image_mode: ImageMode) -> Tensor | None:
        """Connector output for ``image_mode``: ``[B, M, d_lm]`` (tokens), features (xattn) or None."""
        if image_mode not in IMAGE_MODES:
            raise ValueError(f"image_mode must be one of {IMAGE_MODES}, got {image_mode!r}")
        if image_mode == "none":
            return None
        if image_mode == "shuffled":
            if features.shape[0] < 2:
                raise ValueError("image_mode='shuffled' needs a batch of at least 2 rows")
            features = torch.roll(features, shifts=1, dims=0)  # each row gets the previous row's image
        return self.connector(features)

    def build_inputs(self, image_tokens: Tensor | None, input_ids: Tensor, attention_mask: Tensor
                     ) -> dict[str, Tensor | int]:
        """``inputs_embeds [B, L, d]``, ``attention_mask [B, L]``, ``labels [B, L]`` and ``caption_start``.

        ``image_tokens`` ``[B, M, d_lm]`` go between the prefix and the prompt (``None``: no image
        positions). ``labels`` are the caption ids where ``attention_mask`` is 1, ``-100`` elsewhere.
        """
        B = input_ids.shape[0]
        emb = self.llm.get_input_embeddings()
        pieces = [emb(self.prefix_ids).expand(B, -1, -1)]
        if image_tokens is not None:
            if image_tokens.dim() != 3 or image_tokens.shape[0] != B or image_tokens.shape[-1] != emb.embedding_dim:
                raise ValueError(f"image tokens must be [{B}, M, {emb.embedding_dim}], got {tuple(image_tokens.shape)}")
            pieces.append(image_tokens.to(emb.weight.dtype))
        pieces.append(emb(self.prompt_ids).expand(B, -1, -1))
        start = sum(p.shape[1] for p in pieces)
        pieces.append(emb(input_ids))
        embeds = torch.cat(pieces, dim=1)
        mask = torch.cat([attention_mask.new_ones(B, start), attention_mask], dim=1)
        labels = torch.cat([input_ids.new_full((B, start), -100), input_ids.masked_fill(attention_mask == 0, -100)],
                           dim=1)
        return {"inputs_embeds": embeds, "attention_mask": mask, "labels": labels, "caption_start": start}

    # ------------------------------------------------------------------ likelihoods
    def token_nll(self, batch: Mapping[str, Any], image_mode: ImageMode = "image") -> tuple[Tensor, Tensor]:
        """Per-token NLL ``[B, T]`` of the caption tokens (eos included) and their mask ``[B, T]`` (float)."""
        ids, mask = self._caption_tokens(batch)
        features = self.image_features(batch["image"])
        if features.shape[0] != ids.shape[0]:
            raise ValueError(f"batch has {features.shape[0]} images but {ids.shape[0]} captions")
        tokens = self._image_tokens(features, image_mode)
        xattn = self.kind == "xattn"
        inputs = self.build_inputs(None if xattn else tokens, ids, mask)
        start, T = int(inputs["caption_start"]), ids.shape[1]
        keep = torch.arange(start - 1, start + T - 1, device=ids.device)  # logits that predict the caption
        ctx = self.connector.conditioned(tokens) if xattn else contextlib.nullcontext()
        with ctx:
            logits = self.llm(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"],
                              logits_to_keep=keep, use_cache=False).logits
        m = mask.to(logits.dtype)
        nll = F.cross_entropy(logits.float().transpose(1, 2), ids, reduction="none") * m
        return nll, m

    def loss(self, batch: Mapping[str, Any]) -> Tensor:
        """Mean NLL per caption token (the captioning loss of LLaVA's stage 1)."""
        nll, m = self.token_nll(batch, "image")
        return nll.sum() / m.sum().clamp_min(1.0)

    def caption_nll(self, batch: Mapping[str, Any], image_mode: ImageMode = "image") -> Tensor:
        """Per-caption mean NLL per token ``[B]`` with the image (``"image"``), without any image
        (``"none"``: no image positions / no cross-attention) or with the previous row's image
        (``"shuffled"``; order the batch so that neighbouring rows show different images)."""
        nll, m = self.token_nll(batch, image_mode)
        return nll.sum(1) / m.sum(1).clamp_min(1.0)

    @torch.no_grad()
    def score_captions(self, images: Any, captions: Sequence[str], image_mode: ImageMode = "image") -> Tensor:
        """Log-likelihood ``[B]`` (summed over tokens, eos included) of ``captions[i]`` given ``images[i]``."""
        nll, _ = self.token_nll({"image": images, "text": list(captions)}, image_mode)
        return -nll.sum(1)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, images: Any, max_new_tokens: int = 24, image_mode: ImageMode = "image") -> list[str]:
        """Greedy captions (strings) of ``images`` ``[B, N, d_v]`` (or raw images with ``vision``)."""
        features = self.image_features(images)
        B = features.shape[0]
        tokens = self._image_tokens(features, image_mode)
        xattn = self.kind == "xattn"
        empty = torch.zeros((B, 0), dtype=torch.long, device=features.device)
        inputs = self.build_inputs(None if xattn else tokens, empty, empty)
        ctx = self.connector.conditioned(tokens) if xattn else contextlib.nullcontext()
        with ctx:
            out = self.llm.generate(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"],
                                    max_new_tokens=max_new_tokens, do_sample=False,
                                    eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
