"""``word_tags``: the image as a few *tags* — the words its captions most likely use — read by the LM as its own words.

A linear scorer on the mean-pooled image features gives a presence score per vocabulary word (≈ the
probability that the image's captions contain the word). The connector emits ``slots`` tokens: the
LM's input embeddings of the highest-scoring words, as many as score above ``threshold`` (at least
one), repeated in order to fill the slots. Object tags as anchors between image and text are Oscar's
idea (Li et al., 2020); here they come from the aligned space and are fed to a frozen LM as words,
which it copies into a caption (a frozen SmolLM2 names the true colour and shape words given as
image tokens 98–100 % of the time, without training).

Gradient: the chosen words are discrete, so training uses a straight-through estimator — the tokens'
gradient reaches the scores through ``softmax(scores / temperature) @ E``.

Vocabulary: by default the training captions' words without English stop words (scikit-learn's
list), bound to the LM with :meth:`WordTags.bind`; kept in ``config``, embeddings in the state dict.

Seeding (:meth:`WordTags.seed`): word presence regressed (ridge, closed form, regularisation chosen by
leave-one-out) on the aligned space's image side — the seed map's ``image_to_shared`` of the pooled
sample features — against which of the sample's captions contain each word; the scorer is that
regression composed with ``image_to_shared``. Random init is ``nn.Linear``'s default.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from align.connector_words import LMWordVocabulary
from align.connectors import CONNECTORS, Connector
from align.seeding import AffineMap, bag_of_words, caption_vocabulary

RIDGE_ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0)


def content_vocabulary(texts: Sequence[str]) -> list[str]:
    """The words of ``texts`` (:func:`align.seeding.caption_vocabulary`) without scikit-learn's English stop words."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return [w for w in caption_vocabulary(texts) if w not in ENGLISH_STOP_WORDS]


@CONNECTORS.register("word_tags")
class WordTags(LMWordVocabulary, Connector, nn.Module):
    """``[B, N, d_v]`` → ``[B, slots, d_lm]``: the embeddings of the words with the highest presence scores.

    Args:
        vision_dim, lm_dim: feature and LM widths.
        vocabulary: the tag words; ``None``: :func:`content_vocabulary` of the texts given to :meth:`bind`.
        slots: image tokens per image.
        threshold: a word is a tag when its score exceeds this (the best word always is one).
        temperature: of the straight-through softmax over scores.
    """

    name = "word_tags"
    seeds_from_lm_map = False

    def __init__(self, vision_dim: int, lm_dim: int, vocabulary: Sequence[str] | None = None, slots: int = 6,
                 threshold: float = 0.25, temperature: float = 0.1) -> None:
        nn.Module.__init__(self)
        if vision_dim < 1 or lm_dim < 1:
            raise ValueError(f"vision_dim and lm_dim must be >= 1, got {vision_dim}, {lm_dim}")
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.vision_dim, self.lm_dim = vision_dim, lm_dim
        self.slots, self.threshold, self.temperature = slots, float(threshold), float(temperature)
        self._init_vocabulary(vocabulary)

    default_vocabulary = staticmethod(content_vocabulary)

    def num_tokens(self, n_inputs: int) -> int:
        return self.slots

    def scores(self, x: Tensor) -> Tensor:
        """``[B, V]`` presence scores of the vocabulary words for features ``[B, N, d_v]``."""
        self._check_bound()
        x = self.check_features(x).to(self.score.weight.dtype)
        return self.score(x.mean(1))

    def tags(self, x: Tensor) -> Tensor:
        """``[B, slots]`` vocabulary indices of each image's tags (best first, repeated to fill the slots)."""
        return self._tags(self.scores(x))

    def _tags(self, scores: Tensor) -> Tensor:
        s = scores.detach()
        order = s.argsort(dim=1, descending=True)
        n = (s > self.threshold).sum(1).clamp(1, min(self.slots, s.shape[1]))
        return order.gather(1, torch.arange(self.slots, device=s.device)[None] % n[:, None])

    def tag_words(self, x: Tensor) -> list[list[str]]:
        """Each image's distinct tags as words (what the LM is shown)."""
        return [list(dict.fromkeys(self.words[i] for i in row)) for row in self.tags(x).tolist()]

    def forward(self, x: Tensor) -> Tensor:
        s = self.scores(x)
        hard = self.embeddings[self._tags(s)]  # [B, slots, d_lm]
        soft = torch.softmax(s / self.temperature, dim=-1) @ self.embeddings  # [B, d_lm]
        return hard + (soft - soft.detach()).unsqueeze(1)  # straight-through: value hard, gradient soft

    def seed(self, image_to_lm: AffineMap, image_to_shared: AffineMap | None = None,
             features: Tensor | np.ndarray | None = None, texts: Sequence[Sequence[str]] | None = None,
             **options: Any) -> dict[str, float]:
        """Scorer = ridge regression of word presence in ``texts[i]`` (the captions of sample image ``i``) on
        ``image_to_shared`` of the pooled ``features [n, N, d_v]`` (module doc)."""
        x = presence_inputs(self, image_to_shared, features, texts).mean(1)
        present = np.stack([bag_of_words(list(caps), self.words).max(0) for caps in texts])  # [n, V]
        alpha = seed_presence_scorer(self.score, image_to_shared, x, present)
        with torch.no_grad():
            n_tags = (self.scores(torch.as_tensor(x[:, None], dtype=self.score.weight.dtype)) > self.threshold)
        return {"ridge_alpha": alpha, "mean_tags_per_image": float(n_tags.sum(1).float().mean())}


def presence_inputs(connector: Any, image_to_shared: AffineMap | None, features: Tensor | np.ndarray | None,
                    texts: Sequence[Sequence[str]] | None) -> np.ndarray:
    """The checked sample ``features`` as ``[n, N, d_v]`` for seeding a presence scorer (``word_tags``,
    ``grid_tags``): the aligned space, features and captions for each sample image must be there."""
    if image_to_shared is None or features is None or not texts:
        raise ValueError(f"{connector.name} seeding needs the aligned space (image_to_shared), a sample of training "
                         "features and the captions of each sample image")
    connector._check_bound()
    x = features.detach().cpu().numpy() if isinstance(features, Tensor) else np.asarray(features)
    x = x.reshape(len(x), -1, x.shape[-1])
    if len(x) != len(texts):
        raise ValueError(f"{len(x)} sample images but captions for {len(texts)}")
    if image_to_shared.in_dim != connector.vision_dim:
        raise ValueError(f"image_to_shared maps {image_to_shared.in_dim} dims, the connector's features "
                         f"have {connector.vision_dim}")
    return x


def seed_presence_scorer(score: nn.Linear, image_to_shared: AffineMap, pooled: np.ndarray,
                         present: np.ndarray) -> float:
    """Fit ``present [n, V]`` by ridge (leave-one-out α from :data:`RIDGE_ALPHAS`) on ``image_to_shared(pooled)``
    and write the composition ``image_to_shared → ridge`` into ``score``; returns the chosen α."""
    from sklearn.linear_model import RidgeCV

    ridge = RidgeCV(alphas=RIDGE_ALPHAS).fit(image_to_shared(pooled), present)
    scorer = image_to_shared.then(AffineMap(np.asarray(ridge.coef_, dtype=np.float64).T,
                                            np.asarray(ridge.intercept_, dtype=np.float64)))
    with torch.no_grad():
        score.weight.copy_(torch.as_tensor(scorer.weight.T, dtype=score.weight.dtype))
        score.bias.copy_(torch.as_tensor(scorer.bias, dtype=score.bias.dtype))
    return float(ridge.alpha_)
