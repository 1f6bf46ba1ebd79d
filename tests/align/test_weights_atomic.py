"""Tests of align.weights' atomic writers: a failed write leaves the previous file/directory and no temporaries."""
from __future__ import annotations

import pytest

from align.weights import write_dir_atomically, write_file_atomically


def test_write_file_atomically_replaces_or_keeps_the_old_file(tmp_path):
    path = tmp_path / "sub" / "a.bin"
    assert write_file_atomically(path, lambda f: f.write(b"one")) == path
    assert path.read_bytes() == b"one" and oct(path.stat().st_mode & 0o777) == oct(0o644)

    def broken(f):
        f.write(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        write_file_atomically(path, broken)
    assert path.read_bytes() == b"one"
    assert [p.name for p in path.parent.iterdir()] == ["a.bin"]  # no temporary left behind


def test_write_dir_atomically_keeps_a_complete_directory_written_meanwhile(tmp_path):
    final = tmp_path / "d"

    def racing_write(tmp):
        (tmp / "x").write_text("ours")
        if not final.exists():  # another process finishes first
            final.mkdir()
            (final / "marker").write_text("theirs")

    with pytest.raises(OSError):  # theirs is not complete by this test: an error, and our temporary is removed
        write_dir_atomically(final, racing_write, complete=lambda d: False)
    assert [p.name for p in tmp_path.iterdir()] == ["d"]
    # complete by its marker: theirs is kept, ours discarded
    assert write_dir_atomically(final, racing_write, complete=lambda d: (d / "marker").is_file()) == final
    assert (final / "marker").read_text() == "theirs" and not (final / "x").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["d"]
