"""Atomic writes: published with ordinary modes, and a killed writer's leftovers cleared."""

from __future__ import annotations

import os
import stat

import pytest

from ttds_core.io import atomic_dir, atomic_path, write_json


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_artifacts_get_the_modes_of_a_plain_write(tmp_path, umask_022):
    write_json(tmp_path / "m.json", {"a": 1})
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x.txt").write_text("x")
    assert _mode(tmp_path / "m.json") == 0o644
    assert _mode(tmp_path / "out") == 0o755 and _mode(tmp_path / "out" / "sub") == 0o755
    assert _mode(tmp_path / "out" / "sub" / "x.txt") == 0o644


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_writers_temp_files_are_cleared_by_the_next_write(tmp_path):
    dead, live = _dead_pid(), os.getppid()
    # what a SIGKILL mid-write leaves: the finally clauses never ran
    (tmp_path / f".out.tmp-{dead}-abc").mkdir()
    (tmp_path / f".out.tmp-{dead}-abc" / "half.npy").write_bytes(b"x")
    (tmp_path / f".m.json.tmp-{dead}-def.json").write_text("{")
    (tmp_path / f".m.json.tmp-{live}-ghi.json").write_text("a live writer's temp file")
    (tmp_path / f".out.json.tmp-{dead}-keep").write_text("another artifact's temp file")
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("x")
    with atomic_path(tmp_path / "m.json") as tmp:
        tmp.write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f".m.json.tmp-{live}-ghi.json", f".out.json.tmp-{dead}-keep", "m.json", "out"]


def test_a_kill_in_the_middle_of_a_swap_keeps_the_last_complete_folder(tmp_path):
    dead = _dead_pid()
    old = tmp_path / f".out.tmp-{dead}-old"  # `out` moved aside, the new one never moved in
    old.mkdir()
    (old / "x").write_text("last complete")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out"):
            raise RuntimeError("this write fails too")
    assert (tmp_path / "out" / "x").read_text() == "last complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
