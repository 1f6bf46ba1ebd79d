"""The Gradio page of ``alignfuse serve``: four tabs over one :class:`~experiments.serve.source.RunSource`.

Every event handler catches what goes wrong with one request (bad input, a feature the run lacks,
an unexpected error) and shows it as a message in the page, so the server keeps serving. API
names (``gradio_client``): ``/text_to_images``, ``/image_to_captions``, ``/suggest_edits``,
``/binding_probe``, ``/ask``, ``/caption``; each returns (HTML, JSON) or (text, JSON).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no usage reports, no version checks
import gradio as gr  # noqa: E402

from experiments.serve import actions  # noqa: E402
from experiments.serve.render import CSS, Thumbnails, captions_html, image_uri, images_html, message, probe_html
from experiments.serve.source import RunSource, Unavailable

log = logging.getLogger(__name__)

GALLERY_THUMBS = 48  # gallery images offered in the pickers (any row can be typed in)
UPLOAD_LIMIT = "10mb"  # the server refuses larger uploads before they reach a handler


def upload_folder() -> Path:
    """Where the server keeps uploads: ``$GRADIO_TEMP_DIR`` or ``<alignfuse cache>/serve``."""
    from align.weights import cache_root

    return Path(os.environ.get("GRADIO_TEMP_DIR") or cache_root() / "serve")


def _guard(fn: Callable[..., Any], render: Callable[[dict], str], n_out: int = 2) -> Callable[..., tuple]:
    """Wrap an action: errors become (message, {"error": ...}) instead of failed requests."""

    def handler(*args: Any) -> tuple:
        try:
            result = fn(*args)
            return render(result), result
        except (actions.ServeError, Unavailable) as e:
            return message(str(e)), {"error": str(e)}
        except Exception as e:  # noqa: BLE001 - one bad request must not stop the page
            log.exception("request failed")
            return message(f"internal error ({type(e).__name__}: {e}); the next request will work"), \
                {"error": f"{type(e).__name__}: {e}"}

    handler.__name__ = fn.__name__
    return handler


def _header(src: RunSource) -> str:
    d = src.data
    return "\n\n".join([
        f"## alignfuse · `{src.run_dir.name}`",
        f"{d['name']} ({d.get('n_scenes', '')} scenes, seed {d.get('seed')}): {len(src.gallery.images)} test images, "
        f"{len(src.gallery.captions)} test captions. Aligners: {', '.join(f'**{n}**' for n in src.names) or 'none'}."])


def _status(src: RunSource) -> str:
    """Which aligners encode new text and images (waits for the run's trained parts to be loaded)."""
    live = [n for n in src.names if src.live(n)]
    lines = [f"Encoded live: {', '.join(live) if live else 'none'}."]
    reasons = sorted({r for n in src.names if not src.live(n) and (r := src.live_reason(n))})
    if reasons:
        lines.append("Saved test embeddings only (type a test caption or pick a gallery image): " + " · ".join(reasons))
    lines += [f"{name}: not shown ({why})." for name, why in src.problems.items()]
    return "\n\n".join(lines)


def build_app(src: RunSource, upload_root: str | Path | None = None):
    """The page (a ``gr.Blocks``); ``upload_root``: the only folder uploads are read from."""
    root = str(upload_root) if upload_root is not None else str(upload_folder())
    thumbs = Thumbnails(src.gallery.images)
    picks = [(src.gallery.images[i], f"#{i}") for i in range(min(GALLERY_THUMBS, len(src.gallery.images)))]
    example_caption = src.gallery.captions[0]

    def query_image(result: dict) -> str:
        return thumbs(result["row"]) if result["row"] is not None else result.pop("_uri", "")

    def to_captions(row, upload, k):
        image = actions.decode_upload(upload, src.image_size, root) if upload else None
        result = actions.image_to_captions(src, row, image, k)
        if image is not None:
            result["_uri"] = image_uri(image, 96)
        return result

    def picker(label: str, with_upload: bool = True):
        gallery = gr.Gallery(picks, label=f"{label}: pick a test image", columns=12, height=210,
                             allow_preview=False, object_fit="contain", format="png")
        with gr.Row():
            row = gr.Number(0, label=f"gallery image # (0-{len(src.gallery.images) - 1})", precision=0)
            upload = gr.File(label="…or upload a PNG/JPEG (up to 10 MB)", file_types=[".png", ".jpg", ".jpeg"],
                             type="filepath", height=120) if with_upload else None

        def selected(evt: gr.SelectData):
            return (evt.index, None) if with_upload else evt.index

        gallery.select(selected, None, [row, upload] if with_upload else row, api_visibility="private")
        return row, upload

    with gr.Blocks(title=f"alignfuse · {src.run_dir.name}", analytics_enabled=False) as app:
        gr.Markdown(_header(src), elem_id="af-header")
        status = gr.Markdown("Loading the run's trained aligners…", elem_id="af-status")
        app.load(lambda: _status(src), None, status, api_visibility="private")
        with gr.Tab("Text → images", id="text"):
            with gr.Row():
                query = gr.Textbox(label="query", placeholder=f"e.g. {example_caption}", scale=5, elem_id="af-query")
                k_img = gr.Slider(1, actions.MAX_K, value=5, step=1, label="top k", scale=1)
            search = gr.Button("Search", variant="primary", elem_id="af-search")
            gr.Examples([[c] for c in src.gallery.captions[:3]] + [["a red shape next to a blue one"]], [query])
            out_img = gr.HTML(elem_id="af-images")
            with gr.Accordion("raw results (JSON)", open=False):
                json_img = gr.JSON()
            handler = _guard(lambda q, k: actions.text_to_images(src, q, k), lambda r: images_html(r, thumbs))
            handler.__name__ = "text_to_images"
            gr.on([search.click, query.submit], handler, [query, k_img], [out_img, json_img],
                  api_name="text_to_images")

        with gr.Tab("Image → captions", id="captions"):
            row_c, upload_c = picker("Image → captions")
            k_cap = gr.Slider(1, actions.MAX_K, value=5, step=1, label="top k")
            show = gr.Button("Show captions", variant="primary", elem_id="af-show")
            out_cap = gr.HTML(elem_id="af-captions")
            with gr.Accordion("raw results (JSON)", open=False):
                json_cap = gr.JSON()
            handler = _guard(to_captions, lambda r: captions_html(r, query_image(r)))
            handler.__name__ = "image_to_captions"
            show.click(handler, [row_c, upload_c, k_cap], [out_cap, json_cap], api_name="image_to_captions")
            gr.on([row_c.change, upload_c.upload], handler, [row_c, upload_c, k_cap], [out_cap, json_cap],
                  api_visibility="private")

        with gr.Tab("Binding probe", id="probe"):
            gr.Markdown("Edit a true caption (swap two colours, reverse a relation) and see whether each aligner "
                        "still prefers the true one for this image.")
            row_p, _ = picker("Binding probe", with_upload=False)
            with gr.Row():
                cap = gr.Textbox(label="caption", elem_id="af-probe-caption")
                edited = gr.Textbox(label="edited caption", elem_id="af-probe-edited")
            with gr.Row():
                suggest = gr.Button("Suggest an edit from the data")
                score = gr.Button("Score both", variant="primary", elem_id="af-probe-score")
            out_probe = gr.HTML(elem_id="af-probe")
            with gr.Accordion("raw results (JSON)", open=False):
                json_probe = gr.JSON()

            def suggest_fn(row):
                try:
                    s = actions.suggest_edits(src, row)
                except actions.ServeError as e:
                    return "", "", message(str(e)), {"error": str(e)}
                if s["edits"]:
                    e = s["edits"][0]
                    return e["caption"], e["edited"], message(f"edit from the data: {e['kind']}"), s
                return s["captions"][0], s["captions"][0], message("no edits in the data: edit it yourself"), s

            suggest.click(suggest_fn, [row_p], [cap, edited, out_probe, json_probe], api_name="suggest_edits")
            handler = _guard(lambda r, c, e: actions.binding_probe(src, r, c, e), probe_html)
            handler.__name__ = "binding_probe"
            score.click(handler, [row_p, cap, edited], [out_probe, json_probe], api_name="binding_probe")

        with gr.Tab("Ask the image", id="ask"):
            why = src.bridge_status()
            gr.Markdown(f"**Not available for this run:** {why}" if why else
                        "Ask the LLM (through the run's trained connector) about a test image or your own.",
                        elem_id="af-ask-status")
            row_a, upload_a = picker("Ask the image")
            question = gr.Textbox(label="question", value="What shapes are in the image?", elem_id="af-question")
            with gr.Row():
                ask_b = gr.Button("Ask", variant="primary", interactive=why is None)
                cap_b = gr.Button("Caption it", interactive=why is None)
            answer = gr.Textbox(label="answer", interactive=False, elem_id="af-answer")
            with gr.Accordion("raw results (JSON)", open=False):
                json_ask = gr.JSON()

            def text_guard(fn, key):
                inner = _guard(fn, lambda r: r[key])

                def run(*args):
                    text, result = inner(*args)
                    return (result["error"] if "error" in result else text), result

                run.__name__ = fn.__name__
                return run

            ask_b.click(text_guard(lambda r, u, q: actions.ask(src, r, u, q, root), "answer"),
                        [row_a, upload_a, question], [answer, json_ask], api_name="ask")
            cap_b.click(text_guard(lambda r, u: actions.caption(src, r, u, root), "caption"),
                        [row_a, upload_a], [answer, json_ask], api_name="caption")
    return app


def launch(src: RunSource, host: str = "127.0.0.1", port: int | None = None, block: bool = True):
    """Serve the page on ``host:port``; returns ``(app, url)`` (``block=False``: the server runs in a thread).

    Torch and BLAS run on one thread in this process: requests encode one query, and on a shared 2-core machine
    more threads only spin (measured: MiniLM on one sentence 86 ms with 1 thread, 1,396 ms with 2 under load).
    """
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)
    root = upload_folder()
    root.mkdir(parents=True, exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = str(root)

    app = build_app(src, upload_root=root)
    app.queue(default_concurrency_limit=2)
    _, url, _ = app.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True,
                           max_file_size=UPLOAD_LIMIT, allowed_paths=[], ssr_mode=False, show_error=True,
                           footer_links=["api"], css=CSS, theme=gr.themes.Default())
    if block:
        app.block_thread()
    return app, url
