"""A multimodal LM: frozen vision features → trainable connector → frozen causal LM (+ optional LoRA).

Sequence layout of one sample (unified embedding-decoder connectors)::

    [prefix] [image tokens × M] [style × S] [after-image tokens ...............] [pad ...]
     bos + text before {image}               captions: prompt, " a red circle", eos
     (dialogues: bos + the chat format's     dialogues (align.mllm_data): question, answer, end, ...
     user turn opening)

Labels are ``-100`` everywhere except the caption tokens (stage 1) or the answers (stage 2). Every
sample of a batch has the same prefix length, so batches are right-padded. ``S`` learned *style
tokens* (``style_tokens``, input-independent, trained with the connector) can absorb what every
caption shares, so the connector's tokens need only carry what differs between images.

**The step** (:meth:`loss`) runs the decoder for hidden states, keeps the positions that predict a
labelled token and applies the LM head there only (``[n_labelled, vocab]`` logits instead of
``[B, L, vocab]``); frozen weights never require gradients. :meth:`plain_loss` is the reference —
a plain transformers forward with ``labels`` — and gives the same loss and gradients
(``tests/align/test_mllm.py``; ``alignfuse bench bridge`` times both).

With a gated cross-attention connector (``kind == "xattn"``) there are no image positions; the LM's
layers attend to the features through the connector's blocks.

Trainable: the connector, the style tokens and, after :meth:`add_lora`, the LoRA adapter of the LM
(peft; base weights stay frozen). ``state_dict()`` holds those only (keys ``connector.*``,
``style``, ``adapter.*``), so a Trainer checkpoint is a few MB; :meth:`save_adapter` writes the
adapter in peft's format (``PeftModel.from_pretrained(llm, dir)`` loads it).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from align.llm import freeze
from align.mllm_data import (IGNORE, ChatFormat, ImageCaptionDataset, caption_leading_space, encode_question,
                             tokenize_captions)

__all__ = ["MultimodalLM", "ImageCaptionDataset", "tokenize_captions", "caption_leading_space", "IMAGE_MODES"]

log = logging.getLogger(__name__)

ImageMode = Literal["image", "none", "shuffled"]
IMAGE_MODES = ("image", "none", "shuffled")
DEFAULT_PROMPT = "Caption:"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class MultimodalLM(nn.Module):
    """Frozen LM + trainable connector (+ optional frozen vision callable), trained on caption or answer loss.

    Args:
        llm: a Hugging Face causal LM (frozen here).
        tokenizer: its tokenizer (needs eos and pad tokens).
        connector: a module from :mod:`align.connectors` with ``vision_dim``/``lm_dim``/``kind``.
        prompt: caption prompt: text between the image and the caption; with an ``{image}`` placeholder,
            the text before it goes before the image tokens and the rest after. Captions get a leading
            space unless the prompt ends in whitespace.
        max_caption_tokens: captions (eos included) are truncated to this many tokens.
        vision: ``None`` when batches carry features ``[B, N, d_v]``; otherwise a callable mapping
            ``batch["image"]`` to such features; an ``nn.Module`` is frozen.
        style_tokens: number of learned input-independent tokens after the image tokens (0: none).
        chat_format: the dialogue format of :meth:`chat` and stage-2 batches (default: from the tokenizer).
        head_dtype: dtype of the LM-head matmul in :meth:`loss` (``torch.bfloat16`` is faster on CPUs
            with bf16 units; ``None`` = the LM's dtype).
        token_weights: ``[vocab]`` loss weight per target token id in :meth:`loss` (e.g. more weight on
            content words); ``None``: every labelled token counts once. Evaluation NLLs are unweighted.
    """

    def __init__(self, llm: nn.Module, tokenizer: Any, connector: nn.Module, prompt: str = DEFAULT_PROMPT,
                 max_caption_tokens: int = 48, vision: Callable[[Any], Tensor] | None = None,
                 style_tokens: int = 0, chat_format: ChatFormat | None = None,
                 head_dtype: torch.dtype | None = None, token_weights: Tensor | None = None,
                 style_position: Literal["before", "after"] = "after") -> None:
        super().__init__()
        d_lm = llm.get_input_embeddings().embedding_dim
        if connector.lm_dim != d_lm:
            raise ValueError(f"connector outputs width {connector.lm_dim} but the LM's embeddings are {d_lm} wide")
        if style_tokens < 0:
            raise ValueError(f"style_tokens must be >= 0, got {style_tokens}")
        if style_position not in ("before", "after"):
            raise ValueError(f"style_position must be 'before' or 'after' the image tokens, got {style_position!r}")
        self.style_position = style_position
        self.llm = freeze(llm)
        self.connector = connector
        self.vision = freeze(vision) if isinstance(vision, nn.Module) else None  # registered: moves with .to()
        self._vision_fn = None if isinstance(vision, nn.Module) else vision
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.max_caption_tokens = max_caption_tokens
        self.head_dtype = head_dtype
        self.register_buffer("token_weights", None if token_weights is None else token_weights.float(),
                             persistent=False)
        self.chat_format = chat_format or ChatFormat.for_tokenizer(tokenizer)
        self._peft: Any = None
        if prompt.count("{image}") > 1:
            raise ValueError(f"prompt has more than one {{image}} placeholder: {prompt!r}")
        before, after = prompt.split("{image}") if "{image}" in prompt else ("", prompt)
        bos = list(tokenizer("", add_special_tokens=True)["input_ids"])  # bos, if the tokenizer adds one
        self.caption_leading_space = caption_leading_space(prompt)
        self.register_buffer("prefix_ids", self._ids(bos, before), persistent=False)
        self.register_buffer("prompt_ids", self._ids([], after), persistent=False)
        self.register_buffer("chat_prefix_ids", self._ids(bos, self.chat_format.user), persistent=False)
        self.style = None
        if style_tokens:
            emb = llm.get_input_embeddings().weight.detach()
            rows = torch.randint(0, emb.shape[0], (style_tokens,), generator=torch.Generator().manual_seed(0))
            self.style = nn.Parameter(emb[rows].clone().float())  # start as ordinary word embeddings
        if getattr(connector, "kind", "tokens") == "xattn":
            connector.attach(llm)
        log.info("MultimodalLM: %s trainable parameters (connector %s), %s frozen",
                 f"{self.num_trainable_parameters():,}", getattr(connector, "name", type(connector).__name__),
                 f"{sum(p.numel() for p in self.parameters() if not p.requires_grad):,}")

    def _ids(self, head: list[int], text: str) -> Tensor:
        ids = head + (list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else [])
        return torch.tensor(ids, dtype=torch.long)

    # ------------------------------------------------------------------ module plumbing
    @property
    def kind(self) -> str:
        return getattr(self.connector, "kind", "tokens")

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def train(self, mode: bool = True) -> "MultimodalLM":
        """Train mode for the connector only; the LM (with its adapter) and the vision module stay in eval mode."""
        self.training = mode
        self.connector.train(mode)
        self.llm.eval()
        if self.vision is not None:
            self.vision.eval()
        return self

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False
                   ) -> dict[str, Any]:
        """The trainable state only: ``connector.*``, ``style`` and the LoRA adapter's ``adapter.*``."""
        if args:
            raise TypeError("MultimodalLM.state_dict takes keyword arguments only")
        out = {} if destination is None else destination
        self.connector.state_dict(destination=out, prefix=prefix + "connector.", keep_vars=keep_vars)
        if self.style is not None:
            out[prefix + "style"] = self.style if keep_vars else self.style.detach()
        if self._peft is not None:
            from peft import get_peft_model_state_dict

            for k, v in get_peft_model_state_dict(self._peft).items():
                out[prefix + "adapter." + k] = v if keep_vars else v.detach()
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load a :meth:`state_dict`; keys of parts this model lacks are an error under ``strict``."""
        inner = {k[len("connector."):]: v for k, v in state_dict.items() if k.startswith("connector.")}
        adapter = {k[len("adapter."):]: v for k, v in state_dict.items() if k.startswith("adapter.")}
        other = [k for k in state_dict if not k.startswith(("connector.", "adapter.")) and k != "style"]
        if strict and (other or ("style" in state_dict) != (self.style is not None)
                       or bool(adapter) != (self._peft is not None)):
            raise RuntimeError(f"MultimodalLM state dicts hold connector.* (+ style, adapter.*) keys matching the "
                               f"model; unexpected: {other[:5]}, style {'style' in state_dict}/"
                               f"{self.style is not None}, adapter {bool(adapter)}/{self._peft is not None}")
        if "style" in state_dict and self.style is not None:
            with torch.no_grad():
                self.style.copy_(state_dict["style"])
        if adapter and self._peft is not None:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self._peft, adapter)
        return self.connector.load_state_dict(inner, strict=strict, assign=assign)

    def detach(self) -> None:
        """Remove a gated cross-attention connector's hooks and any LoRA adapter: the LM is as it was given."""
        if self.kind == "xattn" and getattr(self.connector, "attached", False):
            self.connector.detach()
        self.remove_lora()

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    # ------------------------------------------------------------------ LoRA (stage 2)
    def add_lora(self, r: int = 8, alpha: float = 16.0, target_modules: Sequence[str] = LORA_TARGETS,
                 dropout: float = 0.0) -> int:
        """Wrap the LM's ``target_modules`` with a trainable LoRA adapter (peft); returns its parameter count."""
        from peft import LoraConfig, get_peft_model

        if self._peft is not None:
            raise RuntimeError("this MultimodalLM already has a LoRA adapter")
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                            bias="none", task_type="CAUSAL_LM")
        self._peft = get_peft_model(self.llm, config)  # injects the adapter into self.llm in place
        self.llm.eval()
        return sum(p.numel() for n, p in self.llm.named_parameters() if "lora_" in n)

    def load_adapter(self, directory: str | Path) -> None:
        """Attach a saved adapter (peft format) to the LM, frozen (for inference)."""
        from peft import PeftModel

        if self._peft is not None:
            raise RuntimeError("this MultimodalLM already has a LoRA adapter")
        self._peft = PeftModel.from_pretrained(self.llm, str(directory), is_trainable=False)
        self.llm.eval()

    def save_adapter(self, directory: str | Path) -> Path:
        """Write the adapter in peft's format (``adapter_config.json``, ``adapter_model.safetensors``)."""
        if self._peft is None:
            raise RuntimeError("no LoRA adapter to save; call add_lora() first")
        self._peft.save_pretrained(str(directory))
        return Path(directory)

    def remove_lora(self) -> None:
        """Take the adapter out of the LM (no-op without one): the LM computes what it computed before."""
        if self._peft is not None:
            self._peft.unload()
            self._peft = None
            freeze(self.llm)

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

    def tokenize(self, captions: Sequence[str]) -> dict[str, Tensor]:
        """:func:`tokenize_captions` with this model's caption length and leading-space rule."""
        return tokenize_captions(self.tokenizer, captions, self.max_caption_tokens,
                                 leading_space=self.caption_leading_space)

    def _sequence(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """``(prefix_ids, ids, labels, mask, n_caption)``: what follows the image, its labels, and for caption
        batches the caption width (the last ``n_caption`` columns; 0 for dialogue batches)."""
        if "labels" in batch:  # a dialogue batch (DialogueDataset)
            ids, labels = batch["input_ids"], batch["labels"]
            mask = batch.get("attention_mask", torch.ones_like(ids))
            width = max(int(mask.sum(1).max()), 1)
            return (self.chat_prefix_ids, ids[:, :width].to(self.device), labels[:, :width].to(self.device),
                    mask[:, :width].to(self.device), 0)
        if "input_ids" in batch:
            ids, mask = batch["input_ids"], batch.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask
        elif "text" in batch:
            tok = self.tokenize(batch["text"])
            ids, mask = tok["input_ids"], tok["attention_mask"]
        else:
            raise KeyError(f"batch needs 'input_ids' (+ 'attention_mask', 'labels') or 'text'; it has {sorted(batch)}")
        if ids.dim() != 2 or ids.shape != mask.shape:
            raise ValueError(f"input_ids {tuple(ids.shape)} and attention_mask {tuple(mask.shape)} must be equal [B, T]")
        width = max(int(mask.sum(1).max()), 1) if mask.numel() else 1  # drop all-padding columns
        ids, mask = ids[:, :width].to(self.device), mask[:, :width].to(self.device)
        B, P, width = ids.shape[0], len(self.prompt_ids), ids.shape[1]
        full = torch.cat([self.prompt_ids.expand(B, -1), ids], 1)
        labels = torch.cat([ids.new_full((B, P), IGNORE), ids.masked_fill(mask == 0, IGNORE)], 1)
        return self.prefix_ids, full, labels, torch.cat([mask.new_ones(B, P), mask], 1), width

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

    def _assemble(self, prefix_ids: Tensor, image_tokens: Tensor | None, ids: Tensor, labels: Tensor, mask: Tensor
                  ) -> dict[str, Tensor | int]:
        """``inputs_embeds [B, L, d]``, ``attention_mask [B, L]``, ``labels [B, L]`` and ``start`` (where ``ids`` begin)."""
        B = ids.shape[0]
        emb = self.llm.get_input_embeddings()
        pieces = [emb(prefix_ids).expand(B, -1, -1)]
        style = [] if self.style is None else [self.style.to(emb.weight.dtype).expand(B, -1, -1)]
        if self.style_position == "before":
            pieces += style
        if image_tokens is not None and self.kind != "xattn":
            if image_tokens.dim() != 3 or image_tokens.shape[0] != B or image_tokens.shape[-1] != emb.embedding_dim:
                raise ValueError(f"image tokens must be [{B}, M, {emb.embedding_dim}], got {tuple(image_tokens.shape)}")
            pieces.append(image_tokens.to(emb.weight.dtype))
        if self.style_position == "after":
            pieces += style
        start = sum(p.shape[1] for p in pieces)
        pieces.append(emb(ids))
        return {"inputs_embeds": torch.cat(pieces, 1),
                "attention_mask": torch.cat([mask.new_ones(B, start), mask], 1),
                "labels": torch.cat([labels.new_full((B, start), IGNORE), labels], 1), "start": start}

    def build_inputs(self, image_tokens: Tensor | None, input_ids: Tensor, attention_mask: Tensor
                     ) -> dict[str, Tensor | int]:
        """Caption layout: ``inputs_embeds``, ``attention_mask``, ``labels`` ``[B, L]`` and ``caption_start``."""
        prefix, ids, labels, mask, width = self._sequence({"input_ids": input_ids, "attention_mask": attention_mask})
        out = self._assemble(prefix, image_tokens, ids, labels, mask)
        out["caption_start"] = int(out.pop("start")) + ids.shape[1] - width
        return out

    # ------------------------------------------------------------------ likelihoods
    def _forward(self, batch: Mapping[str, Any], image_mode: ImageMode) -> tuple[dict[str, Any], Tensor | None, int]:
        prefix, ids, labels, mask, width = self._sequence(batch)
        features = self.image_features(batch["image"])
        if features.shape[0] != ids.shape[0]:
            raise ValueError(f"batch has {features.shape[0]} images but {ids.shape[0]} captions")
        tokens = self._image_tokens(features, image_mode)
        return self._assemble(prefix, tokens, ids, labels, mask), tokens, width

    def _conditioned(self, tokens: Tensor | None):
        return self.connector.conditioned(tokens) if self.kind == "xattn" else contextlib.nullcontext()

    def _hidden(self, inputs: Mapping[str, Any], tokens: Tensor | None) -> Tensor:
        with self._conditioned(tokens):
            return self.llm.get_decoder()(inputs_embeds=inputs["inputs_embeds"],
                                          attention_mask=inputs["attention_mask"], use_cache=False).last_hidden_state

    def _head(self, h: Tensor) -> Tensor:
        weight = self.llm.get_output_embeddings().weight
        if self.head_dtype is None or self.head_dtype == weight.dtype:
            return F.linear(h, weight).float()
        cached = getattr(self, "_head_weight", None)
        if cached is None or cached.device != weight.device or cached.dtype != self.head_dtype:
            cached = self._head_weight = weight.detach().to(self.head_dtype)
        return F.linear(h.to(self.head_dtype), cached).float()

    def token_nll(self, batch: Mapping[str, Any], image_mode: ImageMode = "image") -> tuple[Tensor, Tensor]:
        """Per-token NLL ``[B, T]`` and mask ``[B, T]`` (float) of the labelled tokens: the caption (eos
        included; ``T`` = caption width) or, for dialogue batches, every token after the image."""
        nll, m, _ = self._nll(batch, image_mode)
        return nll, m

    def _nll(self, batch: Mapping[str, Any], image_mode: ImageMode) -> tuple[Tensor, Tensor, Tensor]:
        inputs, tokens, width = self._forward(batch, image_mode)
        hidden = self._hidden(inputs, tokens)
        targets = inputs["labels"][:, 1:]
        keep = targets != IGNORE  # position t predicts token t + 1: only labelled targets get logits
        nll = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
        nll[keep] = F.cross_entropy(self._head(hidden[:, :-1][keep]), targets[keep], reduction="none")
        m = keep.float()
        T = width or (targets.shape[1] - int(inputs["start"]) + 1)
        return nll[:, -T:], m[:, -T:], targets[:, -T:]

    def loss(self, batch: Mapping[str, Any]) -> Tensor:
        """Mean NLL per labelled token (weighted by ``token_weights``): caption loss (LLaVA's stage 1) or
        answer loss (stage 2)."""
        nll, m, targets = self._nll(batch, "image")
        if self.token_weights is not None:
            m = m * self.token_weights[targets.clamp_min(0)]
        return (nll * m).sum() / m.sum().clamp_min(1e-6)

    def plain_loss(self, batch: Mapping[str, Any]) -> Tensor:
        """The same loss the plain transformers way (``llm(inputs_embeds, labels=...)``, logits everywhere)."""
        inputs, tokens, _ = self._forward(batch, "image")
        with self._conditioned(tokens):
            return self.llm(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"],
                            labels=inputs["labels"], use_cache=False).loss

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
    def _greedy(self, images: Any, prefix: Tensor, after: list[list[int]], max_new_tokens: int,
                image_mode: ImageMode, stop: list[int]) -> list[str]:
        features = self.image_features(images)
        B = features.shape[0]
        if len(after) != B:
            raise ValueError(f"{B} images but {len(after)} prompts")
        tokens = self._image_tokens(features, image_mode)
        width = max(len(a) for a in after)
        pad = self.tokenizer.pad_token_id
        # left-pad the text after the image so every prompt ends at the last position (masked padding)
        ids = torch.tensor([[pad] * (width - len(a)) + a for a in after], dtype=torch.long, device=self.device)
        mask = torch.tensor([[0] * (width - len(a)) + [1] * len(a) for a in after], dtype=torch.long,
                            device=self.device)
        inputs = self._assemble(prefix, tokens, ids, torch.full_like(ids, IGNORE), mask)
        with self._conditioned(tokens):
            out = self.llm.generate(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"],
                                    max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                                    pad_token_id=pad)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def generate(self, images: Any, max_new_tokens: int = 24, image_mode: ImageMode = "image") -> list[str]:
        """Greedy captions (strings) of ``images`` ``[B, N, d_v]`` (or raw images with ``vision``)."""
        B = len(images)
        return self._greedy(images, self.prefix_ids, [self.prompt_ids.tolist()] * B, max_new_tokens, image_mode,
                            [self.tokenizer.eos_token_id])

    def chat(self, images: Any, question: str | Sequence[str], max_new_tokens: int = 12,
             image_mode: ImageMode = "image", history: Sequence[tuple[str, str]] = ()) -> list[str]:
        """Greedy answers to ``question`` (one for all images, or one per image) about ``images``.

        ``images``: features ``[B, N, d_v]``, or raw images (e.g. uint8 ``[B, H, W, 3]``) when the model
        has a ``vision`` module; ``history``: earlier ``(question, answer)`` turns of the dialogue.
        """
        B = len(images)
        questions = [question] * B if isinstance(question, str) else list(question)
        if any(not q.strip() for q in questions):
            raise ValueError("empty question")
        if len(questions) != B:
            raise ValueError(f"{B} images but {len(questions)} questions")
        after = [encode_question(self.tokenizer, q, self.chat_format, history) for q in questions]
        end = self.tokenizer(self.chat_format.end, add_special_tokens=False)["input_ids"] if self.chat_format.end \
            else []
        stop = [self.tokenizer.eos_token_id] + list(end[:1])
        answers: list[str] = [""] * B
        by_length: dict[int, list[int]] = {}
        for i, a in enumerate(after):  # equal lengths per call: no padding inside the sequence
            by_length.setdefault(len(a), []).append(i)
        for rows in by_length.values():
            idx = torch.as_tensor(rows)
            sub = images[idx] if isinstance(images, Tensor) else [images[i] for i in rows]
            if not isinstance(images, Tensor) and hasattr(images, "shape"):
                import numpy as np

                sub = np.asarray(images)[rows]
            for i, text in zip(rows, self._greedy(sub, self.chat_prefix_ids, [after[i] for i in rows],
                                                  max_new_tokens, image_mode, stop)):
                answers[i] = text
        return answers
