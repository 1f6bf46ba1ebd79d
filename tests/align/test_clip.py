"""Tests of align.clip: CLIP heads over frozen features and full open_clip towers."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from open_clip.loss import ClipLoss

from align import build_aligner
from align.base import ALIGNERS
from align.clip import CLIPHeads, CLIPTowers

TINY_TOWERS = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=1, head_width=16),
    text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1),
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _paired_features(n: int, d_img: int = 20, d_txt: int = 12, grid: int | None = None, seed: int = 0):
    """Image/text features that are two noisy linear views of one latent (so pairs are learnable)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 6, generator=g)
    img = z @ torch.randn(6, d_img, generator=g) + 0.1 * torch.randn(n, d_img, generator=g)
    txt = z @ torch.randn(6, d_txt, generator=g) + 0.1 * torch.randn(n, d_txt, generator=g)
    if grid is not None:
        img = img.unsqueeze(1) + 0.3 * torch.randn(n, grid, d_img, generator=g)
    return img, txt


def _brute_force_clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(CE over rows of scale*I@T' + CE over rows of scale*T@I') / 2, written out per row."""
    n = len(img)
    per_image = [-(scale * img[i] @ txt[i]) + torch.log(sum(torch.exp(scale * img[i] @ txt[j]) for j in range(n)))
                 for i in range(n)]
    per_text = [-(scale * txt[i] @ img[i]) + torch.log(sum(torch.exp(scale * txt[i] @ img[j]) for j in range(n)))
                for i in range(n)]
    return (torch.stack(per_image).mean() + torch.stack(per_text).mean()) / 2


def _assert_all_grads(model: torch.nn.Module) -> None:
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, f"no gradient reached {missing}"


# ---- CLIPHeads --------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_heads_loss_equals_cliploss_and_brute_force(head):
    torch.manual_seed(0)
    model = CLIPHeads(20, 12, embed_dim=8, head=head, hidden_dim=16)
    img, txt = _paired_features(10)
    loss = model.loss({"image": img, "text": txt})
    ie, te = model.encode("image", img), model.encode("text", txt)
    scale = model.logit_scale.exp()
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    torch.testing.assert_close(loss, ClipLoss()(ie, te, scale))
    torch.testing.assert_close(loss, _brute_force_clip_loss(ie, te, scale))


@pytest.mark.parametrize("local_loss,gather_with_grad", [(False, False), (True, False), (False, True), (True, True)])
def test_heads_loss_in_one_process_gloo_group(tmp_path, local_loss, gather_with_grad):
    torch.manual_seed(0)
    model = CLIPHeads(20, 12, embed_dim=8, local_loss=local_loss, gather_with_grad=gather_with_grad)
    img, txt = _paired_features(8)
    expected = ClipLoss()(model.encode("image", img), model.encode("text", txt), model.logit_scale.exp())
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model.set_distributed(dist.get_rank(), dist.get_world_size())
        assert (model.clip_loss.local_loss, model.clip_loss.gather_with_grad) == (local_loss, gather_with_grad)
        assert model.clip_loss.cache_labels and model.clip_loss.world_size == 1
        torch.testing.assert_close(model.loss({"image": img, "text": txt}), expected)
    finally:
        dist.destroy_process_group()


VARIANTS = [(False, False), (True, True)]  # (local_loss, gather_with_grad)


def _two_rank_worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        img, txt = _paired_features(8)
        for local_loss, gather_with_grad in VARIANTS:
            torch.manual_seed(0)
            model = CLIPHeads(20, 12, embed_dim=8, local_loss=local_loss, gather_with_grad=gather_with_grad)
            model.set_distributed(rank, 2)
            loss = model.loss({"image": img[rank * 4:(rank + 1) * 4], "text": txt[rank * 4:(rank + 1) * 4]})
            loss.backward()
            grads = {n: p.grad for n, p in model.named_parameters()}
            torch.save({"loss": loss.detach(), "grads": grads},
                       os.path.join(out_dir, f"{local_loss}-{gather_with_grad}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_heads_loss_two_ranks_match_the_full_batch(tmp_path):
    """Two gloo processes with half a batch each reproduce the single-process full-batch loss (and gradient)."""
    torch.manual_seed(0)
    ref = CLIPHeads(20, 12, embed_dim=8)
    img, txt = _paired_features(8)
    full = ref.loss({"image": img, "text": txt})
    full.backward()
    # fork: the children inherit the imported modules (spawn would re-import torch and open_clip)
    mp.start_processes(_two_rank_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2,
                       start_method="fork")
    for local_loss, gather_with_grad in VARIANTS:
        outs = [torch.load(tmp_path / f"{local_loss}-{gather_with_grad}-rank{r}.pt", weights_only=True)
                for r in range(2)]
        if local_loss:  # each rank: its rows against all columns; the mean over ranks is the full loss
            torch.testing.assert_close((outs[0]["loss"] + outs[1]["loss"]) / 2, full.detach())
            # gather_with_grad + DDP's gradient average = the full-batch gradient
            for name, p in ref.named_parameters():
                torch.testing.assert_close((outs[0]["grads"][name] + outs[1]["grads"][name]) / 2, p.grad)
        else:  # every rank computes the full-batch loss
            for out in outs:
                torch.testing.assert_close(out["loss"], full.detach())


def test_set_distributed_rejects_bad_rank():
    model = CLIPHeads(4, 4, embed_dim=4)
    with pytest.raises(ValueError, match="rank"):
        model.set_distributed(2, 2)


@pytest.mark.parametrize("pool", ["mean", "attention"])
def test_heads_shapes_and_grid_pooling(pool):
    torch.manual_seed(0)
    model = CLIPHeads(16, 12, embed_dim=8, pool=pool, attn_heads=4)
    grid, txt = _paired_features(5, d_img=16, grid=9)
    ie, te = model.encode("image", grid), model.encode("text", txt)
    assert ie.shape == (5, 8) and te.shape == (5, 8)
    torch.testing.assert_close(ie.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(te.norm(dim=1), torch.ones(5))
    if pool == "mean":  # a grid is mean-pooled, so it encodes like its mean
        torch.testing.assert_close(ie, model.encode("image", grid.mean(1)))
    else:
        with pytest.raises(ValueError, match="grid"):
            model.encode("image", grid.mean(1))
    with pytest.raises(ValueError, match="image_dim=16"):
        model.encode("image", torch.randn(5, 9, 15))
    with pytest.raises(ValueError, match="text features"):
        model.encode("text", torch.randn(5, 13))
    with pytest.raises(ValueError, match="not 'depth'"):
        model.encode("depth", txt)
    with pytest.raises(ValueError, match="5 images but 4 texts"):
        model.loss({"image": grid, "text": txt[:4]})


@pytest.mark.parametrize("head,pool", [("linear", "mean"), ("mlp", "attention")])
def test_heads_gradients_reach_every_parameter(head, pool):
    torch.manual_seed(0)
    model = CLIPHeads(16, 12, embed_dim=8, head=head, pool=pool, attn_heads=4)
    grid, txt = _paired_features(6, d_img=16, grid=4)
    model.loss({"image": grid, "text": txt}).backward()
    _assert_all_grads(model)
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs() > 0


def test_logit_scale_is_clamped_at_100_in_the_forward():
    model = CLIPHeads(4, 4, embed_dim=4)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale.item() == pytest.approx(100.0)
    model.loss({"image": torch.randn(3, 4), "text": torch.randn(3, 4)}).backward()
    assert model.logit_scale.grad.item() == 0.0  # clamped: no gradient beyond ln(100)
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    assert model.scale.item() == pytest.approx(1.0)


def test_heads_loss_decreases_with_adam():
    torch.manual_seed(0)
    model = CLIPHeads(20, 12, embed_dim=16, head="mlp", hidden_dim=32)
    img, txt = _paired_features(64)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss = model.loss({"image": img, "text": txt})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])
    with torch.no_grad():  # pairs are retrieved: image→text R@1 well above chance (1/64)
        sims = model.encode("image", img) @ model.encode("text", txt).T
    assert (sims.argmax(1) == torch.arange(64)).float().mean() > 0.5


def test_heads_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = dict(image_dim=16, text_dim=12, embed_dim=8, head="mlp", pool="attention", attn_heads=4)
    model = CLIPHeads(**cfg)
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    torch.save(model.state_dict(), tmp_path / "clip.pt")
    torch.manual_seed(1)
    other = CLIPHeads(**cfg)
    other.load_state_dict(torch.load(tmp_path / "clip.pt", weights_only=True))
    grid, txt = _paired_features(4, d_img=16, grid=3)
    model.eval(), other.eval()
    torch.testing.assert_close(other.encode("image", grid), model.encode("image", grid))
    torch.testing.assert_close(other.encode("text", txt), model.encode("text", txt))
    assert other.logit_scale.item() == 3.0


def test_registered_names():
    assert {"clip", "clip_towers"} <= set(ALIGNERS.names())
    assert isinstance(build_aligner("clip", image_dim=4, text_dim=4, embed_dim=4), CLIPHeads)
    with pytest.raises(ValueError, match="head"):
        CLIPHeads(4, 4, head="conv")


# ---- CLIPTowers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def towers():
    torch.manual_seed(0)
    return CLIPTowers(**TINY_TOWERS)


def test_towers_tokenizer_works_offline(towers):
    ids = towers.tokenize(["a red cube left of a blue ball", "two spheres"])
    assert ids.shape == (2, 16) and ids.dtype == torch.long
    sot, eot = towers.tokenizer.sot_token_id, towers.tokenizer.eot_token_id
    assert (ids[:, 0] == sot).all() and (ids == eot).sum() == 2
    assert towers.tokenizer.decode(ids[1].tolist()).replace("<start_of_text>", "").split("<end_of_text>")[0].strip() \
        == "two spheres"
    with pytest.raises(ValueError, match="list of strings"):
        towers.tokenize("one string")


def test_towers_preprocess(towers):
    mean = torch.tensor(towers.model.visual.image_mean if hasattr(towers.model.visual, "image_mean")
                        else (0.48145466, 0.4578275, 0.40821073))
    images = torch.randint(0, 256, (2, 40, 48, 3), dtype=torch.uint8)
    x = towers.preprocess(images)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    flat = (mean * 255).round().to(torch.uint8).expand(1, 32, 32, 3)  # the mean colour normalises to ~0
    assert towers.preprocess(flat).abs().max() < 0.02
    with pytest.raises(ValueError, match="uint8 images"):
        towers.preprocess(images.float())


def test_towers_forward_backward_tiny_batch(towers):
    torch.manual_seed(0)
    towers.zero_grad()
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    captions = ["a red cube", "a blue ball", "two green cones", "a small yellow cube"]
    batch = {"image": towers.preprocess(images), "text": towers.tokenize(captions)}
    loss = towers.loss(batch)
    ie, te = towers.encode("image", batch["image"]), towers.encode("text", batch["text"])
    assert ie.shape == (4, 32) and te.shape == (4, 32)
    torch.testing.assert_close(ie.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(loss, ClipLoss()(ie, te, towers.model.logit_scale.exp()))
    # uint8 images and raw strings are accepted and give the same loss
    torch.testing.assert_close(towers.loss({"image": images, "text": captions}), loss)
    loss.backward()
    _assert_all_grads(towers)


def test_towers_state_dict_round_trip(towers, tmp_path):
    torch.save(towers.state_dict(), tmp_path / "towers.pt")
    torch.manual_seed(1)
    other = CLIPTowers(**TINY_TOWERS)
    other.load_state_dict(torch.load(tmp_path / "towers.pt", weights_only=True))
    tokens = towers.tokenize(["a red cube"])
    towers.eval(), other.eval()
    torch.testing.assert_close(other.encode("text", tokens), towers.encode("text", tokens))


def test_towers_bad_config():
    with pytest.raises(ValueError, match="vocab_size"):
        CLIPTowers(embed_dim=8, vision_cfg=TINY_TOWERS["vision_cfg"],
                   text_cfg=dict(TINY_TOWERS["text_cfg"], vocab_size=1000))
    with pytest.raises(ValueError, match="model_name"):
        CLIPTowers(pretrained="/nonexistent.pt")
