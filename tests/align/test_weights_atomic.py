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


_KILLED_WRITER = """
import os, sys
from pathlib import Path
from align.weights import write_dir_atomically, write_file_atomically
target = Path(sys.argv[2])
def die(_):
    os._exit(9)  # killed mid-write: no cleanup runs
if sys.argv[1] == "file":
    write_file_atomically(target, lambda f: (f.write(b"half"), f.flush(), die(f)))
else:
    write_dir_atomically(target, lambda d: ((d / "part").write_text("half"), die(d)))
"""


def _kill_a_writer(kind: str, target) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, kind, str(target)], capture_output=True)
    assert proc.returncode == 9, proc.stderr.decode()


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_temporaries_of_killed_writers_are_removed_by_the_next_write(tmp_path, kind, caplog):
    target = tmp_path / ("a.npy" if kind == "file" else "cache-dir")
    _kill_a_writer(kind, target)
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and str(leftovers[0]).startswith(f".{target.name}.")  # the killed writer's temporary
    with caplog.at_level("WARNING", logger="align.weights"):
        if kind == "file":
            write_file_atomically(tmp_path / "other.bin", lambda f: f.write(b"x"))
        else:
            write_dir_atomically(tmp_path / "other-dir", lambda d: (d / "x").write_text("x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-dir" if kind == "dir" else "other.bin"]
    assert "killed writer" in caplog.text and "is gone" in caplog.text


def test_temporaries_of_live_writers_are_kept_and_old_ones_removed(tmp_path):
    import os
    import subprocess
    import sys
    import time

    from align.weights import _HOST, clean_stale_temps

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".a.npy.{_HOST}-{sleeper.pid}.abcd1234.tmp"
        live.write_bytes(b"being written")
        other_host = tmp_path / ".b.npy.elsewhere-1.abcd1234.tmp"  # a pid of another machine: judged by age
        other_host.write_bytes(b"?")
        legacy_new, legacy_old = tmp_path / ".c.npy.abcd1234.tmp", tmp_path / ".d.npy.abcd1234.tmp"
        legacy_new.write_bytes(b"?")
        legacy_old.write_bytes(b"?")
        old = time.time() - 2 * 24 * 3600
        os.utime(legacy_old, (old, old))
        plain = tmp_path / "results.json"
        plain.write_text("{}")
        assert clean_stale_temps(tmp_path) == [legacy_old]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [live.name, other_host.name, legacy_new.name, plain.name])
    finally:
        sleeper.kill()
        sleeper.wait()
    assert clean_stale_temps(tmp_path) == [live]  # its writer is gone now
