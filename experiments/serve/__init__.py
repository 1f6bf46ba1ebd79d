"""``alignfuse serve``: a run's cross-modal retrieval, binding probe and ask-the-image as a local web page.

* :mod:`experiments.serve.source` — the run directory → gallery, saved embeddings, trained parts (one adapter);
* :mod:`experiments.serve.actions` — the page's actions as plain functions (JSON-able results, clear errors);
* :mod:`experiments.serve.render` — their HTML;
* :mod:`experiments.serve.app` — the Gradio page and :func:`launch`.
"""
from experiments.serve.source import RunSource, Unavailable

__all__ = ["RunSource", "Unavailable", "build_app", "launch"]


def __getattr__(name: str):
    if name in ("build_app", "launch"):  # gradio is imported only when a page is built
        from experiments.serve import app

        return getattr(app, name)
    raise AttributeError(name)
