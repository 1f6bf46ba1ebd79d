"""Resumable units of work: one (part, seed) of a run, with its checkpoints and its result.

``out_dir/units/<unit>/`` holds the Trainer's ``last.pt`` (resumed by ``Trainer.fit``), ``unit.json`` (what the
unit is: part name, options, input dims; written before training) and ``result.json`` (written atomically once the
unit is evaluated). A rerun of the same command skips units whose ``result.json`` carries the same key and
continues the others from their last checkpoint. A unit whose key changed (other options, data or seed) is
cleared and run again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from experiments.report import write_json

log = logging.getLogger(__name__)


def unit_key(*parts: Any) -> str:
    """Short stable hash of what determines a unit's result (JSON of ``parts``, sorted keys)."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Units:
    """The units of one run directory."""

    def __init__(self, out_dir: str | Path) -> None:
        self.root = Path(out_dir) / "units"

    def dir(self, name: str) -> Path:
        """Directory of unit ``name`` (``"clip/seed0"``, ``"largest_shape/feature/concat/seed1"``)."""
        return self.root / name

    def start(self, name: str, key: str, info: dict[str, Any]) -> Path:
        """Prepare unit ``name``: clear it if it belongs to another key, write ``unit.json``; return its directory."""
        d = self.dir(name)
        meta = d / "unit.json"
        if meta.is_file():
            old = json.loads(meta.read_text())
            if old.get("key") != key:
                log.warning("%s: options changed since the last run; starting this unit again", d)
                shutil.rmtree(d)
        elif d.exists() and not (d / "last.pt").is_file():
            shutil.rmtree(d)
        if not meta.is_file():
            write_json(meta, {"key": key, **info})
        return d

    def result(self, name: str, key: str) -> dict[str, Any] | None:
        """The finished result of unit ``name`` if it exists for ``key``, else None."""
        path = self.dir(name) / "result.json"
        if not path.is_file():
            return None
        try:
            rec = json.loads(path.read_text())
        except json.JSONDecodeError:
            log.warning("%s is damaged; running the unit again", path)
            return None
        return rec["result"] if rec.get("key") == key else None

    def finish(self, name: str, key: str, result: dict[str, Any]) -> None:
        """Write unit ``name``'s result atomically (it is then skipped on rerun)."""
        write_json(self.dir(name) / "result.json", {"key": key, "result": result})
