"""``word_mixture``: each image token becomes a softmax mixture of the frozen LM's own word embeddings.

For every feature token, a linear scorer gives logits over a vocabulary of words (by default the
training captions' words); the soft token is ``softmax(logits) @ E`` with ``E [V, d_lm]`` the LM's
(frozen) input embeddings of those words. The output stays on the simplex of real word embeddings,
which a small frozen LM reads like words in its prompt: with the true colour and shape words as
image tokens, SmolLM2-135M names them in a caption without any training. A continuous projector
(``linear``, ``mlp2x_gelu``) seeded from the same map lands *between* words instead.

Seeding (:meth:`WordMixture.seed`): the scorer is the seed map (image → LLM embedding space)
followed by cosine scores against the word embeddings, times an inverse temperature chosen so that
the mean top-word probability on sample features reaches ``sharpness``. Random init is
``nn.Linear``'s default (a near-uniform mixture), LLaVA's default for new projectors.

The vocabulary is bound to the LM with :meth:`WordMixture.bind` (the bridge calls it for every
connector that has it); its words are kept in ``config`` and its embeddings in the state dict, so a
saved connector rebuilds without the LM.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from align.connectors import CONNECTORS, Connector
from align.seeding import AffineMap, caption_vocabulary, flat_tokens, llm_text_embeddings


class LMWordVocabulary:
    """Mixin of connectors over a vocabulary of the frozen LM's own words (``word_mixture``, ``word_tags``).

    State: ``words``, a scorer ``score = Linear(vision_dim, V)`` and the buffer ``embeddings [V, d_lm]`` (the LM's
    input embeddings of the words, set by :meth:`bind`). The words go into ``config``, so a saved connector
    rebuilds without the LM. Subclasses may override :meth:`default_vocabulary`.
    """

    words: list[str]
    score: nn.Linear | None

    def _init_vocabulary(self, vocabulary: Sequence[str] | None) -> None:
        self.words = []
        self.score = None
        self.register_buffer("embeddings", None)
        if vocabulary is not None:
            self._make(list(vocabulary))

    @staticmethod
    def default_vocabulary(texts: Sequence[str]) -> list[str]:
        """The vocabulary :meth:`bind` takes from ``texts`` when none was given: every caption word."""
        return caption_vocabulary(texts)

    def _make(self, words: list[str]) -> None:
        if not words:
            raise ValueError(f"{self.name} needs a non-empty vocabulary")
        self.words = words
        self.score = nn.Linear(self.vision_dim, len(words))
        self.embeddings = torch.zeros(len(words), self.lm_dim)
        self._config["vocabulary"] = list(words)

    @property
    def bound(self) -> bool:
        return self.score is not None and bool(self.embeddings.abs().sum() > 0)

    def bind(self, llm: nn.Module, tokenizer: Any, texts: Sequence[str] = ()) -> None:
        """Fix the vocabulary (from ``texts`` if none was given) and copy the LM's embeddings of its words."""
        if self.score is None:
            self._make(self.default_vocabulary(texts))
        e = llm_text_embeddings(llm, tokenizer, self.words)
        if e.shape[1] != self.lm_dim:
            raise ValueError(f"the LM's embeddings are {e.shape[1]} wide, the connector's lm_dim is {self.lm_dim}")
        self.embeddings = torch.as_tensor(e, dtype=self.score.weight.dtype, device=self.score.weight.device)

    def _check_bound(self) -> None:
        if self.score is None:
            raise RuntimeError(f"{self.name} has no vocabulary yet: pass vocabulary= or call bind(llm, tokenizer, "
                               f"texts)")

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        if self.score is None and prefix + "score.weight" in state_dict:  # rebuilt without a vocabulary
            raise RuntimeError(f"{self.name} state dict needs the vocabulary in the connector's config")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@CONNECTORS.register("word_mixture")
class WordMixture(LMWordVocabulary, Connector, nn.Module):
    """Per token ``softmax(Linear(d_v, V)(x)) @ E``, ``E [V, d_lm]`` the LM's embeddings of ``vocabulary``.

    Args:
        vision_dim, lm_dim: feature and LM widths.
        vocabulary: the words; ``None``: taken from the texts given to :meth:`bind`.
        sharpness: seeding's target mean top-word probability (0 < sharpness < 1).
    """

    name = "word_mixture"

    def __init__(self, vision_dim: int, lm_dim: int, vocabulary: Sequence[str] | None = None,
                 sharpness: float = 0.8) -> None:
        nn.Module.__init__(self)
        if not 0.0 < sharpness < 1.0:
            raise ValueError(f"sharpness must be in (0, 1), got {sharpness}")
        if vision_dim < 1 or lm_dim < 1:
            raise ValueError(f"vision_dim and lm_dim must be >= 1, got {vision_dim}, {lm_dim}")
        self.vision_dim, self.lm_dim, self.sharpness = vision_dim, lm_dim, sharpness
        self._init_vocabulary(vocabulary)

    def forward(self, x: Tensor) -> Tensor:
        return self.word_probabilities(x) @ self.embeddings

    def word_probabilities(self, x: Tensor) -> Tensor:
        """``[B, N, V]`` the mixture weights (which words each image token reads as)."""
        self._check_bound()
        return torch.softmax(self.score(self.check_features(x).to(self.score.weight.dtype)), dim=-1)

    def seed(self, image_to_lm: AffineMap, image_to_shared: AffineMap | None = None,
             features: Tensor | np.ndarray | None = None, **options: Any) -> dict[str, float]:
        """Scorer = cosine of ``image_to_lm(x)`` with each word's embedding × an inverse temperature chosen
        (bisection on sample ``features``) to give a mean top-word probability of ``sharpness``."""
        self._check_seed_map(image_to_lm)
        self._check_bound()
        if features is None:
            raise ValueError("word_mixture seeding needs a sample of training features to set its temperature")
        if not self.bound:
            raise RuntimeError("bind(llm, tokenizer) before seeding: the word embeddings are not set")
        e = self.embeddings.double().cpu().numpy()
        e = e / np.linalg.norm(e, axis=1, keepdims=True).clip(1e-12)
        scores = image_to_lm.then(AffineMap(e.T, np.zeros(len(e))))  # [d_v] -> [V]
        logits = scores(flat_tokens(features))
        lo, hi = 1e-3, 1e4
        for _ in range(60):  # geometric bisection: top-word probability grows with the inverse temperature
            mid = (lo * hi) ** 0.5
            z = logits * mid
            p = np.exp(z - z.max(1, keepdims=True))
            top = float((p.max(1) / p.sum(1)).mean())
            lo, hi = (mid, hi) if top < self.sharpness else (lo, mid)
        beta = (lo * hi) ** 0.5
        with torch.no_grad():
            self.score.weight.copy_(torch.as_tensor(scores.weight.T * beta, dtype=self.score.weight.dtype))
            self.score.bias.copy_(torch.as_tensor(scores.bias * beta, dtype=self.score.bias.dtype))
        return {"word_inverse_temperature": float(beta), "mean_top_word_probability": top}
