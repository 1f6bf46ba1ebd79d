"""Token sequences a :class:`align.mllm.MultimodalLM` trains on: captions (stage 1) and dialogues (stage 2).

Stage 1 (captioning): :func:`tokenize_captions` → ``" " + caption`` + eos, right-padded; the model puts
its prompt before it and labels the caption tokens only.

Stage 2 (visual instruction tuning, LLaVA's second stage): a sample is a dialogue about one image,
``[(question, answer), ...]``. :func:`encode_dialogue` lays it out in a :class:`ChatFormat`::

    [bos] user  [image tokens × M]  q1 assistant  a1 end  user q2 assistant  a2 end ...
    └──── model prefix ────┘        └──────────────── input_ids (after the image) ────────────┘
    labels:                         -100 .......  a1 end  -100 ..........  a2 end

Every token is ``-100`` in ``labels`` except the answers' tokens and the end-of-turn tokens after
them (so the model learns to stop). The image goes into the first user turn, at a position that is
the same for every sample (the model's ``chat_prefix_ids``), so batches are simply right-padded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

IGNORE = -100


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
    return _pad(rows, [r for r in rows], pad, pad_to, with_labels=False)


def _pad(rows: list[list[int]], labels: list[list[int]], pad: int, pad_to: int | None = None,
         with_labels: bool = True) -> dict[str, Tensor]:
    width = max((len(r) for r in rows), default=1)
    if pad_to is not None:
        if pad_to < width:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest sequence ({width} tokens)")
        width = pad_to
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    lab = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
        lab[i, : len(l)] = torch.tensor(l, dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": mask}
    if with_labels:
        out["labels"] = lab
    return out


def caption_leading_space(prompt: str) -> bool:
    """Whether text reads ``" " + text`` after ``prompt``: unless the prompt ends in whitespace."""
    return not prompt.replace("{image}", "")[-1:].isspace()


@dataclass(frozen=True)
class ChatFormat:
    """The text around a dialogue's turns: ``user`` before each question (the image follows the first
    one), ``assistant`` between a question and its answer, ``end`` after each answer (then eos if
    ``end`` is empty). Answers get a leading space unless ``assistant`` ends in whitespace."""

    user: str
    assistant: str
    end: str
    sep: str = " "  # between the image and the first question, and between an answer's end and the next turn

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> "ChatFormat":
        """ChatML when the tokenizer knows ``<|im_start|>`` (SmolLM2-Instruct, Qwen), else a plain format."""
        vocab = tokenizer.get_vocab()
        if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
            return CHATML
        return PLAIN


CHATML = ChatFormat("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>", "\n")
PLAIN = ChatFormat("question:", " answer:", "", " ")


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def encode_dialogue(tokenizer: Any, turns: Sequence[tuple[str, str]], fmt: ChatFormat, max_tokens: int = 256
                    ) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of the tokens after the image (see the module doc); answers and their end
    token are labelled, the rest is ``-100``. Sequences longer than ``max_tokens`` drop whole last turns."""
    if not turns:
        raise ValueError("a dialogue needs at least one (question, answer) turn")
    space = "" if fmt.assistant[-1:].isspace() else " "
    end = _ids(tokenizer, fmt.end) or [tokenizer.eos_token_id]
    ids: list[int] = []
    labels: list[int] = []
    for i, (q, a) in enumerate(turns):
        if not q.strip() or not a.strip():
            raise ValueError(f"turn {i} has an empty question or answer: {(q, a)!r}")
        ask = _ids(tokenizer, (fmt.sep if i == 0 else fmt.sep + fmt.user) + q.strip() + fmt.assistant)
        answer = _ids(tokenizer, space + a.strip()) + end
        if ids and len(ids) + len(ask) + len(answer) > max_tokens:
            break
        ids += ask + answer
        labels += [IGNORE] * len(ask) + answer
    return ids, labels


def encode_question(tokenizer: Any, question: str, fmt: ChatFormat, history: Sequence[tuple[str, str]] = ()
                    ) -> list[int]:
    """Token ids after the image for asking ``question`` (after ``history`` turns): the answer comes next."""
    ids = encode_dialogue(tokenizer, history, fmt)[0] if history else []
    return ids + _ids(tokenizer, fmt.sep + (fmt.user if history else "") + question.strip() + fmt.assistant)


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
        self.text_to_image = _check_rows(text_to_image, len(captions), len(features))
        self.tokens = tokenize_captions(tokenizer, captions, max_tokens, leading_space=leading_space)

    def __len__(self) -> int:
        return len(self.text_to_image)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"image": _feature(self.features, self.text_to_image[i]), "input_ids": self.tokens["input_ids"][i],
                "attention_mask": self.tokens["attention_mask"][i]}


class DialogueDataset(Dataset):
    """(image features, dialogue) pairs for stage 2: ``ds[i] = {"image", "input_ids", "attention_mask", "labels"}``.

    ``dialogues[i]`` is a list of ``(question, answer)`` turns about image row ``dialogue_to_image[i]``
    of ``features`` ``[n_images, N, d_v]``; encoded up front with :func:`encode_dialogue` and padded
    to the longest dialogue.
    """

    def __init__(self, features: np.ndarray | Tensor, dialogues: Sequence[Sequence[tuple[str, str]]],
                 dialogue_to_image: np.ndarray | Tensor, tokenizer: Any, fmt: ChatFormat, max_tokens: int = 256
                 ) -> None:
        self.features = features
        self.text_to_image = _check_rows(dialogue_to_image, len(dialogues), len(features))
        encoded = [encode_dialogue(tokenizer, d, fmt, max_tokens) for d in dialogues]
        self.tokens = _pad([e[0] for e in encoded], [e[1] for e in encoded], tokenizer.pad_token_id)

    def __len__(self) -> int:
        return len(self.text_to_image)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        out = {k: v[i] for k, v in self.tokens.items()}
        out["image"] = _feature(self.features, self.text_to_image[i])
        return out


def _check_rows(rows: Any, n: int, n_features: int) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.int64)
    if n != len(rows):
        raise ValueError(f"{n} texts but the image index has {len(rows)} rows")
    if len(rows) and (rows.min() < 0 or rows.max() >= n_features):
        raise ValueError(f"the image index must point into the {n_features} feature rows, "
                         f"got values in [{rows.min()}, {rows.max()}]")
    return rows


def _feature(features: Any, row: int) -> Tensor:
    x = features[int(row)]
    return torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).float()
