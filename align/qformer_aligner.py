"""BLIP-2's first stage as an aligner: a Q-Former trained with ITC, ITM and ITG (+ optional classification).

:class:`QFormerAligner` (registered ``"qformer"``) reads a frozen image grid ``[B, P, d_v]`` (inputs
``"grid"``) and caption strings (``"raw"``, tokenised with MiniLM's WordPiece tokenizer, cached per
string) through :class:`align.qformer_model.QFormerModel`, whose text side starts from MiniLM-L6 as
BLIP-2's starts from BERT. ``loss(batch)`` returns a dict of weighted terms, each with a weight in the
config (a zero weight skips the term):

* ``itc`` — queries and text apart (unimodal mask); image–text similarity = the highest cosine over the
  query embeddings against the text's embedding (mean of its token outputs, or [CLS] as BLIP-2), through :class:`QueryMaxClipLoss` (open_clip's
  ``ClipLoss`` with that similarity; its distributed options are kept, see :meth:`set_distributed`);
* ``itm`` — binary matching over all of ``[queries ; text]`` (bidirectional mask): the batch's positives,
  plus for each image a hard negative caption and for each caption a hard negative image, drawn with
  probability ``softmax(ITC similarity)`` over candidates that are *not* positives — another caption of
  the same image, or an identical caption string, is never a negative (:func:`mine_hard_negatives`);
  A batch may also carry ``"hard_negative"`` (per row a false caption of that row's image, ``""`` for none, or a
  list of them, one drawn per step): extra ITM negatives (not in BLIP-2; NegCLIP-style compositional negatives
  from training data), and ``"hard_negative_source"`` (the true caption each was edited from, aligned with
  ``"hard_negative"``): an extra ITM positive, so the head sees the true caption and its minimal edit side by side;
* ``itg`` — captioning with the multimodal-causal mask (text sees every query and the text before it),
  LM head tied to the word embeddings (BERT's prediction head transform is new); ``itg_vocab="batch"``
  scores only the tokens of the batch's captions (a cheaper sampled softmax for CPUs, default ``"full"``);
* ``cls`` — a linear head on the mean query output (ITC pass) predicting the scene label ``batch["label"]``.

``encode("image", grid)`` is the L2-normalised mean of the normalised query embeddings (one vector per image
for the shared retrieval evaluator); :meth:`itc_scores` gives BLIP-2's exact max-over-queries similarity and
:meth:`itm_scores` the matching log-odds used for re-ranking (``experiments.qformer_eval``).
:func:`qformer_connector` turns a trained aligner into the LLM connector of BLIP-2's second stage.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, gather_features
from torch import Tensor, nn

from align.base import ALIGNERS, GradientAligner
from align.connectors import Connector
from align.qformer_model import QFormerModel, load_minilm_weights, minilm_config, minilm_dir

log = logging.getLogger(__name__)

INIT_LOGIT_SCALE = math.log(1 / 0.07)


def max_query_similarity(image_q: Tensor, text: Tensor) -> Tensor:
    """``[Ni, Q, D]`` query embeddings × ``[Nt, D]`` text embeddings → ``[Ni, Nt]`` max over queries."""
    return torch.einsum("iqd,td->iqt", image_q, text).amax(dim=1)


class QueryMaxClipLoss(ClipLoss):
    """open_clip's ``ClipLoss`` whose image features are ``[B, Q, D]`` query embeddings and whose logits are
    ``scale * max_q <image_q, text>`` (BLIP-2's ITC); gathering across processes as in ``ClipLoss``."""

    def get_logits(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, logit_bias=None):
        if self.world_size > 1:
            all_img, all_txt = gather_features(image_features, text_features, local_loss=self.local_loss,
                                               gather_with_grad=self.gather_with_grad, rank=self.rank,
                                               world_size=self.world_size, use_horovod=self.use_horovod)
            if self.local_loss:
                per_image = logit_scale * max_query_similarity(image_features, all_txt)
                per_text = logit_scale * max_query_similarity(all_img, text_features).T
            else:
                per_image = logit_scale * max_query_similarity(all_img, all_txt)
                per_text = per_image.T
        else:
            per_image = logit_scale * max_query_similarity(image_features, text_features)
            per_text = per_image.T
        if logit_bias is not None:
            per_image, per_text = per_image + logit_bias, per_text + logit_bias
        return per_image, per_text


def mine_hard_negatives(sim: Tensor, positive: Tensor, sample: bool = True,
                        generator: torch.Generator | None = None) -> Tensor:
    """For each row of ``sim`` [R, C], a column that is not a positive (``positive`` [R, C] bool), drawn with
    probability ``softmax(sim)`` over the non-positive columns (``sample=False``: the highest-scoring one).
    Rows whose columns are all positive get ``-1``. Returns long [R]."""
    if sim.shape != positive.shape:
        raise ValueError(f"sim {tuple(sim.shape)} and positive {tuple(positive.shape)} must have the same shape")
    s = sim.detach().float().masked_fill(positive, float("-inf"))
    has = (~positive).any(dim=1)
    out = torch.full((sim.shape[0],), -1, dtype=torch.long, device=sim.device)
    if has.any():
        rows = s[has]
        pick = torch.multinomial(rows.softmax(dim=1), 1, generator=generator).squeeze(1) if sample \
            else rows.argmax(dim=1)
        out[has] = pick
    return out


def given_pairs(batch: Mapping[str, Any]) -> tuple[list[int], list[str], list[int]]:
    """Extra ITM pairs from ``batch["hard_negative"]`` (and ``"hard_negative_source"``): (image rows, captions,
    labels 1 = match). Each row holds a caption (``""``: none) or a list of them, of which one is drawn
    (``torch`` RNG) with its source at the same position."""
    negs, srcs = batch.get("hard_negative"), batch.get("hard_negative_source")
    rows: list[int] = []
    texts: list[str] = []
    match: list[int] = []
    for i, neg in enumerate(negs or []):
        src = None if srcs is None else srcs[i]
        if isinstance(neg, (list, tuple)):
            if not neg:
                continue
            j = int(torch.randint(len(neg), ()))
            neg, src = neg[j], (None if src is None else src[j])
        if neg:
            rows.append(i), texts.append(neg), match.append(0)
            if src:
                rows.append(i), texts.append(src), match.append(1)
    return rows, texts, match


def _group_ids(x: Tensor) -> Tensor:
    """Integer id per row of ``x`` [B, ...], equal for identical rows (the same image repeated in a batch)."""
    return torch.unique(x.reshape(x.shape[0], -1), dim=0, return_inverse=True)[1]


@ALIGNERS.register("qformer")
class QFormerAligner(GradientAligner):
    """A BLIP-2 Q-Former over a frozen image grid ``[B, P, image_dim]`` and caption strings.

    Args:
        image_dim: feature size of the grid (MobileNetV2: 1280).
        num_queries: learned queries (BLIP-2: 32). num_layers: BERT layers (MiniLM's first ``num_layers``, ≤ 6).
        cross_every: cross-attention in every ``cross_every``-th layer (BLIP-2: 2).
        embed_dim: size of the ITC space. max_text_len: tokens per caption ([CLS] and [SEP] included).
        itc_weight, itm_weight, itg_weight, cls_weight: weight of each objective (0 = off).
        num_classes: classes of ``batch["label"]`` (needed when ``cls_weight > 0``; filled by
            :meth:`from_inputs` from the class embeddings the runner passes).
        init: ``"minilm"`` (text side from all-MiniLM-L6-v2) or ``"random"`` (then ``hidden``, ``heads``,
            ``ffn_dim`` may shrink the model, e.g. for tests). model_dir: another BERT directory.
        itg_vocab: ``"full"`` (softmax over the whole vocabulary) or ``"batch"`` (over the batch's tokens).
        itm_sample: draw hard negatives from softmax(similarity) (BLIP-2) or take the hardest (False).
        rerank_k: ITM re-ranks each query's top ``rerank_k`` ITC candidates at evaluation (BLIP: 16 to 256).
        grid_positions: learned position embeddings for up to this many grid cells (0: none; see
            :class:`align.qformer_model.QFormerModel`).
        text_pool: the text's ITC embedding: ``"mean"`` of the token outputs (how all-MiniLM-L6-v2 was trained to
            embed sentences; its [CLS] output barely differs between captions, and ITC did not leave chance in
            60 steps from it) or ``"cls"`` (BLIP-2, whose BERT was not a sentence encoder).
        local_loss, gather_with_grad: ``ClipLoss`` options for multi-process training.
    """

    inputs = {"image": "grid", "text": "raw"}
    # fed when the data has them (the runner does not feed optional inputs yet: the ``cls`` term then needs a
    # caller that puts ``"label"`` in the batch, e.g. ``experiments.qformer_eval``)
    optional_inputs = {"label": "class"}
    auto_inputs = ("image_dim", "num_classes", "class_embeddings")

    @classmethod
    def from_inputs(cls, dims: Mapping[str, int], class_embeddings: Tensor | None = None, **kwargs: Any):
        if class_embeddings is not None and kwargs.get("num_classes") is None:
            kwargs["num_classes"] = int(len(class_embeddings))
        return cls(image_dim=dims["image"], **kwargs)

    def __init__(self, image_dim: int, num_queries: int = 32, num_layers: int = 6, cross_every: int = 2,
                 embed_dim: int = 256, max_text_len: int = 32, itc_weight: float = 1.0, itm_weight: float = 1.0,
                 itg_weight: float = 1.0, cls_weight: float = 0.0, num_classes: int | None = None,
                 init: str = "minilm", model_dir: str | None = None, hidden: int | None = None,
                 heads: int | None = None, ffn_dim: int | None = None, dropout: float = 0.1,
                 query_ffn: bool = True, itg_vocab: str = "full", itm_sample: bool = True, text_pool: str = "mean",
                 init_logit_scale: float = INIT_LOGIT_SCALE, max_logit_scale: float = 100.0,
                 local_loss: bool = False, gather_with_grad: bool = False, rerank_k: int = 16,
                 grid_positions: int = 256) -> None:
        super().__init__()
        if init not in ("minilm", "random"):
            raise ValueError(f"init must be 'minilm' or 'random', got {init!r}")
        if text_pool not in ("mean", "cls"):
            raise ValueError(f"text_pool must be 'mean' or 'cls', got {text_pool!r}")
        if itg_vocab not in ("full", "batch"):
            raise ValueError(f"itg_vocab must be 'full' or 'batch', got {itg_vocab!r}")
        if cls_weight > 0 and not num_classes:
            raise ValueError("cls_weight > 0 needs num_classes (or class embeddings through from_inputs)")
        if min(itc_weight, itm_weight, itg_weight, cls_weight) < 0:
            raise ValueError("objective weights must be >= 0")
        if rerank_k < 1 or grid_positions < 0:
            raise ValueError(f"rerank_k must be >= 1 and grid_positions >= 0, got {rerank_k}, {grid_positions}")
        bert = minilm_config(model_dir)
        if init == "minilm" and any(v is not None and v != bert[k] for v, k in (
                (hidden, "hidden_size"), (heads, "num_attention_heads"), (ffn_dim, "intermediate_size"))):
            raise ValueError("init='minilm' fixes hidden/heads/ffn_dim to MiniLM's; use init='random' to change them")
        self.image_dim, self.embed_dim, self.max_text_len = image_dim, embed_dim, max_text_len
        self.weights = {"itc": float(itc_weight), "itm": float(itm_weight), "itg": float(itg_weight),
                        "cls": float(cls_weight)}
        self.itg_vocab, self.itm_sample, self.max_logit_scale = itg_vocab, itm_sample, max_logit_scale
        self.text_pool, self.rerank_k = text_pool, int(rerank_k)
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad
        self.qformer = QFormerModel(
            image_dim, num_queries=num_queries, num_layers=num_layers, cross_every=cross_every,
            hidden=hidden or bert["hidden_size"], heads=heads or bert["num_attention_heads"],
            ffn_dim=ffn_dim or bert["intermediate_size"], vocab_size=bert["vocab_size"],
            max_positions=bert["max_position_embeddings"], eps=bert["layer_norm_eps"], dropout=dropout,
            query_ffn=query_ffn, grid_positions=grid_positions)
        self.new_parameters = load_minilm_weights(self.qformer, model_dir) if init == "minilm" else None
        h = self.qformer.hidden
        self.vision_proj = nn.Linear(h, embed_dim)
        self.text_proj = nn.Linear(h, embed_dim)
        self.itm_head = nn.Linear(h, 2)
        self.lm_transform = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h, eps=bert["layer_norm_eps"]))
        self.lm_bias = nn.Parameter(torch.zeros(bert["vocab_size"]))  # decoder weight tied to word embeddings
        self.cls_head = nn.Linear(h, num_classes) if num_classes else None
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self._model_dir = str(minilm_dir(model_dir))
        self._tokenizer = None
        self._token_cache: dict[str, list[int]] = {}
        self._build_loss()

    # ---- text --------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self._model_dir, local_files_only=True)
        return self._tokenizer

    @property
    def dec_token_id(self) -> int:
        """The [DEC] token that starts a caption under ITG (MiniLM's ``[unused0]``; BLIP-2 adds a new token)."""
        return int(self.tokenizer.convert_tokens_to_ids("[unused0]"))

    def tokenize(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token ids [N, T] (long, 0-padded to the longest, at most ``max_text_len``) and mask [N, T] (bool)."""
        if isinstance(texts, str) or isinstance(texts, Tensor):
            raise ValueError(f"text must be a list of caption strings, got {type(texts).__name__}")
        missing = [t for t in dict.fromkeys(texts) if t not in self._token_cache]
        if missing:
            enc = self.tokenizer(missing, truncation=True, max_length=self.max_text_len)["input_ids"]
            self._token_cache.update(zip(missing, enc))
        rows = [self._token_cache[t] for t in texts]
        ids = torch.zeros(len(rows), max(map(len, rows), default=1), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        dev = self.logit_scale.device
        return ids.to(dev), (ids != 0).to(dev)

    # ---- embeddings and scores ----------------------------------------------------------------
    def _grid(self, x: Tensor) -> Tensor:
        x = torch.as_tensor(x)
        if x.dim() != 3 or x.shape[-1] != self.image_dim:
            raise ValueError(f"image must be a grid [B, P, {self.image_dim}], got {tuple(x.shape)}")
        return x.to(self.logit_scale.device, torch.float32)

    def query_outputs(self, grid: Tensor) -> Tensor:
        """Query outputs [B, Q, hidden] of the image alone (unimodal): what BLIP-2 hands to the LLM."""
        return self.qformer(self._grid(grid), mode="unimodal")[0]

    def image_query_embeddings(self, grid: Tensor) -> Tensor:
        """L2-normalised ITC embeddings of every query [B, Q, embed_dim]."""
        return F.normalize(self.vision_proj(self.query_outputs(grid)), dim=-1)

    def _pool_text(self, t: Tensor, mask: Tensor) -> Tensor:
        if self.text_pool == "cls":
            return t[:, 0]
        m = mask.unsqueeze(-1).to(t.dtype)
        return (t * m).sum(1) / m.sum(1).clamp_min(1.0)

    def text_embeddings(self, texts: Sequence[str]) -> Tensor:
        """L2-normalised ITC embeddings [N, embed_dim] of the captions' pooled text outputs (``text_pool``)."""
        ids, mask = self.tokenize(texts)
        _, t = self.qformer(ids=ids, text_mask=mask, with_queries=False)
        return F.normalize(self.text_proj(self._pool_text(t, mask)), dim=-1)

    def encode(self, modality: str, x: Any) -> Tensor:
        """``"image"``: grid [N, P, d_v] → normalised mean query embedding [N, D]; ``"text"``: N strings → [N, D]."""
        self._check_modality(modality)
        if modality == "image":
            return F.normalize(self.image_query_embeddings(x).mean(dim=1), dim=-1)
        return self.text_embeddings(x)

    def itc_scores(self, grid: Tensor, texts: Sequence[str]) -> Tensor:
        """BLIP-2's ITC similarity [N_img, N_txt]: the highest cosine over the queries."""
        return max_query_similarity(self.image_query_embeddings(grid), self.text_embeddings(texts))

    def itm_logits(self, grid: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """Matching logits [B, 2] (no match, match) of pairs (grid[i], text[i]); mean of the query outputs' heads."""
        q, _ = self.qformer(self._grid(grid), ids, mask, mode="bidirectional")
        return self.itm_head(q).mean(dim=1)

    def itm_scores(self, grid: Tensor, texts: Sequence[str]) -> Tensor:
        """Matching log-odds [B] (``logit_match - logit_no_match``) of the pairs (grid[i], texts[i])."""
        logits = self.itm_logits(grid, *self.tokenize(texts))
        return logits[:, 1] - logits[:, 0]

    @property
    def scale(self) -> Tensor:
        return self.logit_scale.clamp(0.0, math.log(self.max_logit_scale)).exp()

    # ---- objectives ---------------------------------------------------------------------------
    def _build_loss(self, rank: int = 0, world_size: int = 1) -> None:
        self.itc_loss = QueryMaxClipLoss(local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
                                         cache_labels=True, rank=rank, world_size=world_size)

    def set_distributed(self, rank: int, world_size: int) -> None:
        """Rebuild the ITC loss for ``world_size`` processes (ITM negatives are mined within the local batch)."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self._build_loss(rank, world_size)

    def positive_pairs(self, batch: Mapping[str, Any], ids: Tensor) -> Tensor:
        """[B, B] bool: image i and caption j are a true pair (same image — ``batch["image_id"]`` when given,
        else identical grids — or an identical caption)."""
        img = torch.as_tensor(batch["image_id"]) if "image_id" in batch else _group_ids(self._grid(batch["image"]))
        txt = _group_ids(ids)
        img, txt = img.to(ids.device), txt.to(ids.device)
        return (img[:, None] == img[None, :]) | (txt[:, None] == txt[None, :])

    def loss(self, batch: dict) -> dict[str, Tensor]:
        """Weighted ``{"itc", "itm", "itg", "cls"}`` terms (those with weight > 0) over pairs
        ``batch["image"][i]`` ([B, P, d_v]) ↔ ``batch["text"][i]`` (strings); ``batch["label"]`` for ``cls``."""
        grid, texts = self._grid(batch["image"]), batch["text"]
        if len(grid) != len(texts):
            raise ValueError(f"batch has {len(grid)} images but {len(texts)} texts")
        ids, mask = self.tokenize(texts)
        w, out = self.weights, {}
        need_itc = w["itc"] > 0 or w["itm"] > 0 or w["cls"] > 0
        if need_itc:
            q_out = self.query_outputs(grid)
            img_q = F.normalize(self.vision_proj(q_out), dim=-1)
            _, t_out = self.qformer(ids=ids, text_mask=mask, with_queries=False)
            txt = F.normalize(self.text_proj(self._pool_text(t_out, mask)), dim=-1)
            if w["itc"] > 0:
                out["itc"] = w["itc"] * self.itc_loss(img_q, txt, self.scale)
            if w["cls"] > 0:
                out["cls"] = w["cls"] * F.cross_entropy(self.cls_head(q_out.mean(dim=1)),
                                                        torch.as_tensor(batch["label"]).long().to(grid.device))
        if w["itm"] > 0:
            out["itm"] = w["itm"] * self._itm_loss(grid, ids, mask, img_q, txt, batch)
        if w["itg"] > 0:
            out["itg"] = w["itg"] * self._itg_loss(grid, ids, mask)
        return out

    def _itm_loss(self, grid: Tensor, ids: Tensor, mask: Tensor, img_q: Tensor, txt: Tensor, batch) -> Tensor:
        with torch.no_grad():
            sim = max_query_similarity(img_q, txt) * self.scale
            pos = self.positive_pairs(batch, ids)
            neg_txt = mine_hard_negatives(sim, pos, self.itm_sample)  # a caption for each image
            neg_img = mine_hard_negatives(sim.T, pos.T, self.itm_sample)  # an image for each caption
        b = torch.arange(len(grid), device=grid.device)
        i_idx = torch.cat([b, b[neg_txt >= 0], neg_img[neg_img >= 0]])
        t_idx = torch.cat([b, neg_txt[neg_txt >= 0], b[neg_img >= 0]])
        labels = torch.zeros(len(i_idx), dtype=torch.long, device=grid.device)
        labels[: len(b)] = 1
        rows, texts, match = given_pairs(batch)
        if rows:  # given false captions of the batch's images (and their true sources)
            i_idx = torch.cat([i_idx, torch.as_tensor(rows, device=grid.device)])
            labels = torch.cat([labels, torch.as_tensor(match, dtype=torch.long, device=grid.device)])
            h_ids, h_mask = self.tokenize(texts)
            n = max(ids.shape[1], h_ids.shape[1])
            ids = torch.cat([F.pad(ids[t_idx], (0, n - ids.shape[1])), F.pad(h_ids, (0, n - h_ids.shape[1]))])
            mask = torch.cat([F.pad(mask[t_idx], (0, n - mask.shape[1])), F.pad(h_mask, (0, n - h_mask.shape[1]))])
        else:
            ids, mask = ids[t_idx], mask[t_idx]
        return F.cross_entropy(self.itm_logits(grid[i_idx], ids, mask), labels)

    def lm_logits(self, hidden: Tensor, vocab: Tensor | None = None) -> Tensor:
        """Next-token logits from text outputs [..., hidden] over the vocabulary (or the token ids ``vocab``)."""
        weight, bias = self.qformer.word_embeddings.weight, self.lm_bias
        if vocab is not None:
            weight, bias = weight[vocab], bias[vocab]
        return F.linear(self.lm_transform(hidden), weight, bias)

    def _itg_loss(self, grid: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        dec = ids.clone()
        dec[:, 0] = self.dec_token_id
        _, t = self.qformer(grid, dec, mask, mode="causal")
        target, valid = ids[:, 1:], mask[:, 1:]
        hidden = t[:, :-1][valid]
        target = target[valid]
        if self.itg_vocab == "batch":
            vocab, target = torch.unique(target, return_inverse=True)
            return F.cross_entropy(self.lm_logits(hidden, vocab), target)
        return F.cross_entropy(self.lm_logits(hidden), target)

    @torch.no_grad()
    def generate(self, grid: Tensor, max_len: int | None = None) -> list[str]:
        """Greedy captions of images (ITG), decoded with the tokenizer (stops at [SEP])."""
        grid = self._grid(grid)
        ids = torch.full((len(grid), 1), self.dec_token_id, dtype=torch.long, device=grid.device)
        sep = self.tokenizer.sep_token_id
        done = torch.zeros(len(grid), dtype=torch.bool, device=grid.device)
        for _ in range((max_len or self.max_text_len) - 1):
            _, t = self.qformer(grid, ids, torch.ones_like(ids, dtype=torch.bool), mode="causal")
            nxt = self.lm_logits(t[:, -1]).argmax(-1).masked_fill(done, 0)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done |= nxt == sep
            if done.all():
                break
        return self.tokenizer.batch_decode(ids[:, 1:], skip_special_tokens=True)


class QFormerConnector(Connector, nn.Module):
    """BLIP-2's stage 2: a Q-Former's query path (frozen grid → query outputs [B, Q, hidden]) and a linear projection
    into the LLM ([B, Q, lm_dim]). Built from JSON (``qformer``: :attr:`QFormerModel.config`), so a saved bridge
    rebuilds it from its config; :func:`qformer_connector` fills it from a trained aligner. The text-only parts
    (word/position embeddings) are dropped and the text FFNs frozen: the LLM sees only the queries.
    ``freeze_qformer`` trains only the projection."""

    name = "qformer_blip2"  # not in CONNECTORS: the bridge builds it from a trained aligner (qformer_connector)

    def __init__(self, vision_dim: int, lm_dim: int, qformer: dict[str, Any], freeze_qformer: bool = False) -> None:
        nn.Module.__init__(self)
        if int(qformer.get("vision_dim", -1)) != vision_dim:
            raise ValueError(f"qformer.vision_dim {qformer.get('vision_dim')} != vision_dim {vision_dim}")
        self.vision_dim, self.lm_dim = vision_dim, lm_dim
        self.qformer = QFormerModel(**{**qformer, "vocab_size": 1, "max_positions": 1})  # queries need no text
        self.qformer.requires_grad_(not freeze_qformer)
        for layer in self.qformer.layers:  # the text FFNs: unused when the queries have their own
            if layer.ffn_query is not None:
                layer.ffn.requires_grad_(False)
        for p in (self.qformer.word_embeddings.weight, self.qformer.position_embeddings.weight,
                  self.qformer.token_type):
            p.requires_grad_(False)
        self.proj = nn.Linear(self.qformer.hidden, lm_dim)

    def num_tokens(self, n_inputs: int) -> int:
        return self.qformer.num_queries

    def forward(self, x: Tensor) -> Tensor:
        x = self.check_features(x)
        return self.proj(self.qformer(x.float(), mode="unimodal")[0])


def qformer_connector(aligner: QFormerAligner, lm_dim: int, freeze_qformer: bool = False) -> QFormerConnector:
    """The ``qformer`` connector's stage-1 init: ``aligner``'s Q-Former weights (copied; queries out) + a new
    Linear → ``lm_dim``."""
    conn = QFormerConnector(aligner.image_dim, lm_dim, dict(aligner.qformer.config), freeze_qformer)
    state = {k: v for k, v in aligner.qformer.state_dict().items()
             if k not in ("word_embeddings.weight", "position_embeddings.weight")}
    missing, unexpected = conn.qformer.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) == {"word_embeddings.weight", "position_embeddings.weight"}, missing
    return conn


def qformer_connector_state(aligner: QFormerAligner) -> dict[str, Tensor]:
    """The query-path weights of a trained aligner (``QFormerModel`` state dict, text-only LM parts included)."""
    return {k: v.detach().clone() for k, v in aligner.qformer.state_dict().items()}
