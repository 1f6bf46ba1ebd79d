"""The stage-1 Q-Former as the bridge's connector init, on a tiny bridge (tiny random Llama, 40 scenes)."""
from __future__ import annotations

import pytest
import torch

from experiments.runners import bridge

TINY = {"data": {"n_scenes": 40, "image_size": 64}, "vision": {"tokens": 4},
        "llm": {"name_or_path": "tiny", "max_caption_tokens": 12, "prompt": "Caption:"},
        "connector_options": {"qformer": {"num_queries": 3, "dim": 32, "depth": 1, "heads": 4}},
        "train": {"max_steps": 2, "batch_size": 4, "progress": False},
        "eval": {"n_eval_images": 4, "captions_per_image": 1, "n_val_captions": 4}}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from experiments.bridge.features import prepare

    tmp = tmp_path_factory.mktemp("qbridge")
    cfg = bridge.load({**TINY, "connectors": ["qformer"], "out_dir": str(tmp / "out"), "cache_dir": str(tmp / "cache")})
    return cfg, prepare(cfg), tmp


def test_stage1_connector_feeds_the_lm_and_is_cached(prepared, one_thread):
    from align.mllm import MultimodalLM
    from experiments.qformer_bridge import stage1_qformer_connector

    cfg, bd, tmp = prepared
    kw = dict(cache_dir=tmp / "stage1", steps=2, options={"num_layers": 1}, negatives_per_image=2)
    conn = stage1_qformer_connector(bd, cfg, **kw)
    info = conn.stage1_info
    assert not info["loaded"] and info["steps"] == 2 and info["options"]["num_queries"] == 3
    d_lm = bd.llm.get_input_embeddings().embedding_dim
    x = torch.from_numpy(bd.tokens[:2])
    assert conn(x).shape == (2, 3, d_lm) and conn.num_tokens(4) == 3
    mllm = MultimodalLM(bd.llm, bd.tokenizer, conn, prompt=cfg.llm.prompt, max_caption_tokens=12)
    nll, mask = mllm.token_nll({"image": x, "text": [bd.data.captions[0][0], bd.data.captions[1][0]]}, "image")
    (nll.sum() / mask.sum()).backward()
    assert conn.proj.weight.grad is not None and conn.qformer.query_tokens.grad.abs().sum() > 0
    again = stage1_qformer_connector(bd, cfg, **kw)  # same key: loaded, same weights
    assert again.stage1_info["loaded"] and again.stage1_info["key"] == info["key"]
    torch.testing.assert_close(again.qformer.query_tokens, conn.qformer.query_tokens)
    cfg_json = conn.config  # what save_model writes: JSON, and enough to rebuild the connector
    import json

    from align.qformer_aligner import QFormerConnector

    rebuilt = QFormerConnector(**{k: v for k, v in json.loads(json.dumps(cfg_json)).items() if k != "name"})
    rebuilt.load_state_dict(conn.state_dict())
    torch.testing.assert_close(rebuilt.eval()(x), conn.eval()(x))
