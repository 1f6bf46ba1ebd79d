"""``alignfuse serve``: every action over HTTP against a server on 127.0.0.1, bad input, path traversal,
and one real headless Chromium (Debian's) driving the page through Selenium.

The run directory is tiny and made by the align runner: 80 ShapesWorld scenes at 64 px, 8 test images,
CCA fitted on the frozen MobileNetV2 / MiniLM features and CLIP heads trained for 3 steps.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

gr = pytest.importorskip("gradio")
httpx = pytest.importorskip("httpx")

from experiments.serve import actions  # noqa: E402
from experiments.serve.source import RunSource, Unavailable  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore:.*(no_silent_downcasting|copy keyword).*")
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


class EchoLM:
    """Stands in for the trained bridge: answers with what it was given (shape, dtype, question)."""

    def __init__(self) -> None:
        self.seen = []

    def chat(self, images, question):
        self.seen.append(images)
        return [f"{images.shape[0]}x{images.shape[1]}x{images.shape[2]} {images.dtype}: {question}"]

    def caption(self, images):
        return [f"a picture of mean {float(np.mean(images)):.1f}"]


def make_run(root: Path) -> Path:
    """A finished align run (config.json, results.json, embeddings/, units/ with the trained models) of CCA and CLIP
    heads on 80 ShapesWorld scenes, made by the align runner itself."""
    from experiments.runners import align as runner

    cfg = runner.load({
        "experiment": "align",
        "data": {"name": "shapesworld", "n_scenes": 80, "image_size": 64, "seed": 7, "max_eval_images": 8},
        "seeds": [0],
        "aligners": {"cca": {"n_components": 6, "reg": 0.1}, "clip": {"embed_dim": 16}},
        "train": {"max_steps": 3, "batch_size": 32, "progress": False},
        "out_dir": str(root / "run"),
    })
    runner.run(cfg)
    return root / "run"


def old_copy(run: Path, dst: Path) -> Path:
    """The run as a version without saved configs and checkpoints left it: results.json and embeddings only."""
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("units", "config.json"))
    return dst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A page served in this process on 127.0.0.1, called over plain HTTP (Gradio's /gradio_api/call API)."""

    def __init__(self, src: RunSource, upload_root: Path) -> None:
        from experiments.serve.app import launch

        os.environ["GRADIO_TEMP_DIR"] = str(upload_root)
        self.src = src
        self.app, self.url = launch(src, host="127.0.0.1", port=free_port(), block=False)
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def call(self, api: str, *data) -> list:
        """POST the inputs, read the event stream; returns the outputs (raises on an error event)."""
        r = self.http.post(f"/gradio_api/call/{api}", json={"data": list(data)})
        r.raise_for_status()
        event_id = r.json()["event_id"]
        event = None
        with self.http.stream("GET", f"/gradio_api/call/{api}/{event_id}") as s:
            for line in s.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event in ("complete", "error"):
                    payload = json.loads(line.split(":", 1)[1])
                    if event == "error":
                        raise RuntimeError(f"{api}: {payload}")
                    return payload
        raise RuntimeError(f"{api}: the event stream ended without a result")

    def error(self, api: str, *data) -> str:
        """The error a request gets: the page's message, or Gradio's own (it checks types and bounds first)."""
        try:
            out = self.call(api, *data)
        except RuntimeError as e:
            return str(e)
        assert "error" in out[-1], f"{api}{data} did not fail: {out[-1]}"
        return out[-1]["error"]

    def upload(self, path: Path) -> dict:
        with open(path, "rb") as f:
            r = self.http.post("/gradio_api/upload", files={"files": (path.name, f)})
        r.raise_for_status()
        return {"path": r.json()[0], "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}

    def close(self) -> None:
        self.http.close()
        self.app.close()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return make_run(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def uploads(tmp_path_factory):
    return tmp_path_factory.mktemp("uploads")


@pytest.fixture(scope="module")
def server(run_dir, uploads):
    lm = EchoLM()
    src = RunSource(run_dir, bridge_loader=lambda d: lm)
    src.bridge_dir = run_dir  # a bridge run of its own is what the real loader needs; EchoLM needs nothing
    srv = Server(src, uploads)
    srv.lm = lm
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def old_server(run_dir, uploads, tmp_path_factory):
    """A run from a version without saved configs and checkpoints: saved embeddings only, no bridge."""
    src = RunSource(old_copy(run_dir, tmp_path_factory.mktemp("old") / "run"))
    srv = Server(src, uploads)
    yield srv
    srv.close()


def _png(path: Path, image: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(image).save(path)
    return path


# ---------------------------------------------------------------------------------------- text → images


def test_text_query_live_matches_saved_embeddings(server):
    src = server.src
    assert src.live("cca") and src.live("clip")  # rebuilt from the run's units by experiments.runs.load_aligner
    query = src.gallery.captions[7]
    html, result = server.call("text_to_images", query, 3)
    owner = int(src.gallery.caption_owner[7])
    assert result["is_test_caption"] and result["true_images"] == [owner]
    for name in ("cca", "clip"):
        hits = result["aligners"][name]["hits"]
        assert len(hits) == 3 and result["aligners"][name]["note"] is None
        # encoded live (MiniLM + the aligner's text side) = the run's saved embedding of that caption
        saved = src.image_emb[name] @ src.text_emb[name][7]
        assert [h["image"] for h in hits] == list(np.argsort(-saved, kind="stable")[:3])
        assert [h["score"] for h in hits] == pytest.approx(np.sort(saved)[::-1][:3], abs=2e-3)
        assert all(h["true"] == (h["image"] == owner) for h in hits)
    assert html.count("<img") == 6 and 'data-aligner="cca"' in html and "✓" in html


def test_free_text_query_and_bad_queries_keep_the_server_up(server):
    _, result = server.call("text_to_images", "a big purple star above a tiny cross", 4)
    assert not result["is_test_caption"] and result["true_images"] == []
    assert all(len(a["hits"]) == 4 and not any(h["true"] for h in a["hits"]) for a in result["aligners"].values())
    for bad, says in (("", "empty"), ("   ", "empty"), ("x" * 600, "at most 500")):
        html, result = server.call("text_to_images", bad, 3)
        assert says in result["error"] and "af-msg" in html
    with pytest.raises(RuntimeError, match="greater than maximum value 20"):  # the slider's bounds, checked by Gradio
        server.call("text_to_images", "a red circle", 99)
    with pytest.raises(RuntimeError, match="Expected a `float`"):
        server.call("text_to_images", "a red circle", "five")
    with pytest.raises(actions.ServeError, match="whole number"):  # API-independent check of the action itself
        actions.text_to_images(server.src, "a red circle", "five")
    _, result = server.call("text_to_images", "a red circle", 2)  # the next request works
    assert len(result["aligners"]["cca"]["hits"]) == 2


# ---------------------------------------------------------------------------------------- image → captions


def test_gallery_image_to_captions_marks_true_captions(server):
    src = server.src
    html, result = server.call("image_to_captions", 2, None, 5)
    assert result["row"] == 2 and result["true_captions"] == src.gallery.captions_of(2)
    for name, r in result["aligners"].items():
        saved = src.text_emb[name] @ src.image_emb[name][2]
        assert [h["caption"] for h in r["hits"]] == [src.gallery.captions[j] for j in np.argsort(-saved, kind="stable")[:5]]
        assert all(h["true"] == (h["caption"] in result["true_captions"]) for h in r["hits"])
    assert ("✓" in html) == any(h["true"] for r in result["aligners"].values() for h in r["hits"])
    _, result = server.call("image_to_captions", 999, None, 5)
    assert "does not exist" in result["error"]


def test_uploaded_image_is_encoded_live(server, tmp_path):
    src = server.src
    upload = server.upload(_png(tmp_path / "scene.png", np.asarray(src.gallery.images[2])))
    html, result = server.call("image_to_captions", 0, upload, 5)
    assert result["image"] == "upload" and result["row"] is None
    gallery = server.call("image_to_captions", 2, None, 5)[1]
    for name in ("cca", "clip"):  # the same pixels through MobileNetV2 + the image side = the saved embedding
        assert [h["caption"] for h in result["aligners"][name]["hits"]] == \
               [h["caption"] for h in gallery["aligners"][name]["hits"]]
        assert [h["score"] for h in result["aligners"][name]["hits"]] == \
               pytest.approx([h["score"] for h in gallery["aligners"][name]["hits"]], abs=2e-3)
    # a JPEG of another size is resized and centre-cropped to the gallery's 64 px
    big = np.kron(np.asarray(src.gallery.images[1]), np.ones((3, 4, 1), dtype=np.uint8))
    from PIL import Image

    Image.fromarray(big).save(tmp_path / "big.jpg", quality=90)
    _, result = server.call("image_to_captions", 0, server.upload(tmp_path / "big.jpg"), 3)
    assert len(result["aligners"]["cca"]["hits"]) == 3


def test_bad_uploads_give_a_message_and_the_next_request_works(server, tmp_path):
    (tmp_path / "notes.png").write_text("this is not an image")
    _, result = server.call("image_to_captions", 0, server.upload(tmp_path / "notes.png"), 3)
    assert "not a readable PNG or JPEG" in result["error"]
    Image = pytest.importorskip("PIL.Image")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "tiny.gif")
    assert "Invalid file type" in server.error("image_to_captions", 0, server.upload(tmp_path / "tiny.gif"), 3)
    (tmp_path / "tiny.png").write_bytes((tmp_path / "tiny.gif").read_bytes())  # a GIF named .png
    assert "upload a PNG or JPEG" in server.error("image_to_captions", 0, server.upload(tmp_path / "tiny.png"), 3)
    big = tmp_path / "big.png"
    with open(big, "wb") as f:  # 50 MB: refused before it reaches a handler
        f.write(b"\x89PNG\r\n\x1a\n" + bytes(50 * 2**20))
    with open(big, "rb") as f:
        r = server.http.post("/gradio_api/upload", files={"files": (big.name, f)})
    assert r.status_code == 413 and "10" in r.text
    _, result = server.call("image_to_captions", 1, None, 2)
    assert len(result["aligners"]["cca"]["hits"]) == 2


def test_no_file_outside_the_run_and_the_cache_is_read(server, run_dir, tmp_path):
    secret = tmp_path / "secret.png"
    _png(secret, np.asarray(server.src.gallery.images[0]))
    run = run_dir
    for target in ("/etc/passwd", str(secret), str(run / "results.json"), "../../../../etc/passwd",
                   "..%2F..%2F..%2F..%2Fetc%2Fpasswd", f"{server.src.run_dir}/../../../etc/passwd"):
        r = server.http.get(f"/gradio_api/file={target}")
        assert r.status_code in (400, 403, 404), (target, r.status_code)
        assert "root:" not in r.text
    # an API client naming a file on the server instead of uploading it
    for path in ("/etc/passwd", str(secret), str(run / "embeddings" / "cca" / "image_emb.npy")):
        fake = {"path": path, "orig_name": "x.png", "meta": {"_type": "gradio.FileData"}}
        try:
            _, result = server.call("image_to_captions", 0, fake, 3)
        except RuntimeError as e:  # refused by the server before the handler
            assert "root:" not in str(e)
        else:
            assert "error" in result and "upload" in result["error"], (path, result)
    _, result = server.call("image_to_captions", 0, None, 1)
    assert "error" not in result


def test_run_names_cannot_escape_the_run_dir(tmp_path, run_dir):
    run = tmp_path / "run"
    old_copy(run_dir, run)
    outside = tmp_path / "outside"
    shutil.copytree(run / "embeddings" / "cca", outside)
    (run / "embeddings" / "link").symlink_to(outside)
    res = json.loads((run / "results.json").read_text())
    res["aligners"] = {"cca": {}, "../../outside": {}, "link": {}}
    (run / "results.json").write_text(json.dumps(res))
    src = RunSource(run)
    assert src.names == ["cca"]
    assert "not a valid aligner name" in src.problems["../../outside"]
    assert "outside the run directory" in src.problems["link"]


# ---------------------------------------------------------------------------------------- binding probe


def test_binding_probe_scores_caption_and_edit(server):
    src = server.src
    edits = server.call("suggest_edits", 3)
    caption, edited, note, result = edits
    assert result["edits"] and (caption, edited) == (result["edits"][0]["caption"], result["edits"][0]["edited"])
    assert caption != edited and result["edits"][0]["kind"] in note
    html, result = server.call("binding_probe", 3, caption, edited)
    cca = src._models["cca"]
    from experiments.features import build_encoder

    t = cca.encode("text", build_encoder("minilm").encode([caption, edited])["pooled"]).numpy()
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    a, b = t @ src.image_emb["cca"][3]
    r = result["aligners"]["cca"]
    assert (r["caption"], r["edited"]) == pytest.approx((a, b), abs=2e-3)
    assert r["prefers_caption"] == (a > b) and "cca" in html and "clip" in html
    _, result = server.call("binding_probe", 3, caption, "")
    assert "empty" in result["error"]


# ---------------------------------------------------------------------------------------- ask the image


def test_ask_and_caption_pass_the_image_to_the_bridge(server, tmp_path):
    answer, result = server.call("ask", 4, None, "what colour is the circle?")
    assert answer == "1x64x64 uint8: what colour is the circle?" == result["answer"]
    np.testing.assert_array_equal(server.lm.seen[-1][0], server.src.gallery.images[4])
    upload = server.upload(_png(tmp_path / "u.png", np.full((100, 80, 3), 200, np.uint8)))
    answer, _ = server.call("caption", 0, upload)
    assert answer == "a picture of mean 200.0"
    answer, result = server.call("ask", 4, None, "")
    assert "empty" in answer and "error" in result


def test_old_run_without_checkpoints_or_bridge_says_why(old_server):
    src = old_server.src
    assert src.names == ["cca", "clip"] and not any(src.live(n) for n in src.names)
    _, result = old_server.call("text_to_images", "a big purple star", 3)
    assert "type one of the test captions" in result["error"] and "older version" in result["error"]
    _, result = old_server.call("text_to_images", src.gallery.captions[5].upper() + ".", 3)
    assert result["is_test_caption"] and "saved embedding" in result["aligners"]["cca"]["note"]
    _, result = old_server.call("image_to_captions", 1, None, 3)  # gallery images: saved embeddings
    assert len(result["aligners"]["cca"]["hits"]) == 3
    answer, result = old_server.call("ask", 1, None, "what is it?")
    assert "no LLM bridge run" in answer and "alignfuse demo" in answer
    page = old_server.http.get("/").text + json.dumps(old_server.http.get("/config").json())
    assert "Not available for this run" in page  # the ask tab says why
    from experiments.serve.app import _status  # the status line the page loads

    status = _status(src)
    assert "Encoded live: none" in status and "older version" in status


def test_bridge_run_without_aligners_serves_the_ask_tab(tmp_path, run_dir):
    """A bridge run alone: its config's data gives the gallery; retrieval says there are no aligners."""
    data = json.loads((run_dir / "config.json").read_text())["data"]
    bridge = tmp_path / "bridge_run"
    bridge.mkdir()
    (bridge / "results.json").write_text(json.dumps({"config": {"data": data}, "runs": {}}))
    lm = EchoLM()
    src = RunSource(bridge, bridge_loader=lambda d: lm)
    assert src.names == [] and len(src.gallery.images) == 8
    with pytest.raises(Unavailable, match="no aligners"):
        actions.text_to_images(src, "a red circle", 3)
    with pytest.raises(Unavailable, match="no aligners"):
        actions.image_to_captions(src, 0, None, 3)
    assert actions.ask(src, 2, None, "what is it?")["answer"] == "1x64x64 uint8: what is it?"
    without = RunSource(bridge, bridge_loader=lambda d: (_ for _ in ()).throw(Unavailable("no model/ saved")))
    with pytest.raises(Unavailable, match="no model/ saved"):
        actions.caption(without, 0, None)


@pytest.mark.slow
def test_ask_a_trained_tiny_bridge(tmp_path):
    """The real path: a bridge run (tiny LM, 3 + 2 steps) saved by its runner, loaded by experiments.ask.load_bridge."""
    from experiments.runners import bridge

    cfg = {"data": {"n_scenes": 40, "image_size": 64}, "vision": {"tokens": 4},
           "llm": {"name_or_path": "tiny", "max_caption_tokens": 12, "prompt": "Caption:"},
           "seeding": {"n_components": 4, "scales": [1.0], "n_calibration_captions": 4},
           "connectors": ["mlp2x_gelu"], "inits": ["seeded"],
           "train": {"max_steps": 3, "batch_size": 4, "eval_every": 3, "progress": False},
           "eval": {"n_eval_images": 4, "captions_per_image": 1, "max_new_tokens": 3, "n_val_captions": 4,
                    "n_examples": 4},
           "stage2": {"n_eval_scenes": 4, "inits": ["seeded"], "train": {"max_steps": 2, "batch_size": 4,
                                                                          "progress": False}},
           "out_dir": str(tmp_path / "bridge_run"), "cache_dir": str(tmp_path / "cache")}
    bridge.run(bridge.load(cfg))
    src = RunSource(tmp_path / "bridge_run")
    assert src.bridge_status() is None and src.names == []
    answer = actions.ask(src, 1, None, "what colour is the shape?")
    assert isinstance(answer["answer"], str) and answer["image"] == "gallery image 1"
    assert isinstance(actions.caption(src, 0, None)["caption"], str)
    with pytest.raises(actions.ServeError, match="empty"):
        actions.ask(src, 1, None, " ")


def test_not_a_run_dir_fails_with_a_clear_cli_error(tmp_path, capsys, run_dir):
    from experiments.cli import main

    assert main(["serve", str(tmp_path / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert main(["serve", str(tmp_path)]) == 2
    assert "not a demo, align or bridge run" in capsys.readouterr().err
    run = tmp_path / "bad"
    old_copy(run_dir, run)
    np.save(run / "embeddings" / "cca" / "image_emb.npy", np.zeros((3, 6), np.float32))
    np.save(run / "embeddings" / "clip" / "text_emb.npy", np.zeros((3, 16), np.float32))
    assert main(["serve", str(run), "--port", "0"]) == 2
    assert "no aligner has usable test embeddings" in capsys.readouterr().err
    assert main(["serve", str(run_dir), "--port", "70000"]) == 2


def test_tiled_gallery_keeps_rows_consistent(run_dir):
    src = RunSource(run_dir)
    big = src.tiled(50)
    assert len(big.gallery.images) == 50 and big.image_emb["cca"].shape[0] == 50
    result = actions.text_to_images(big, src.gallery.captions[0], 10)
    assert len(result["aligners"]["cca"]["hits"]) == 10
    assert src.image_emb["cca"].shape[0] == 8  # the original is untouched


# ---------------------------------------------------------------------------------------- a real browser


@pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                    reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver); "
                           ".ci/run installs them")
def test_page_in_headless_chromium(server, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)), options=opts)
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(server.url)
        wait.until(lambda d: "Encoded live: cca, clip" in d.find_element(By.ID, "af-status").text)
        box = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#af-query textarea, #af-query input")))
        box.send_keys(server.src.gallery.captions[0])
        driver.find_element(By.ID, "af-search").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#af-images .af-hit img")) >= 10)
        assert driver.find_elements(By.CSS_SELECTOR, "#af-images .af-true")  # the true image is marked
        driver.save_screenshot(str(tmp_path / "text_to_images.png"))

        driver.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Image → captions')]").click()
        # the first file input on the page is this tab's (tabs come in order)
        upload = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "input[type=file]"))[0]
        png = _png(tmp_path / "upload.png", np.asarray(server.src.gallery.images[2]))
        upload.send_keys(str(png))
        wait.until(lambda d: "upload" in d.find_element(By.ID, "af-captions").text
                   and len(d.find_elements(By.CSS_SELECTOR, "#af-captions .af-cap")) >= 10)
        driver.save_screenshot(str(tmp_path / "image_to_captions.png"))
        assert (tmp_path / "image_to_captions.png").stat().st_size > 10_000
    finally:
        driver.quit()
    keep = os.environ.get("ALIGNFUSE_SCREENSHOTS")  # a folder to keep the screenshots in (to look at them)
    if keep:
        for f in tmp_path.glob("*_*.png"):
            shutil.copy(f, Path(keep) / f.name)
