"""Nothing half-done after a crash: a writer SIGKILLed inside atomic_dir / atomic_path leaves the
previous output (or none) plus its temp; the next writer of that folder removes the temp of the
dead process and puts back an output caught mid-swap (core/files.py: clean_stale)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from semedge.core.files import atomic_dir, clean_stale, pid_alive

WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from semedge.core.files import atomic_dir, atomic_path
    out, kind = Path(sys.argv[1]), sys.argv[2]
    cm = atomic_dir(out) if kind == "dir" else atomic_path(out)
    with cm as tmp:
        if kind == "dir":
            (tmp / "model.bin").write_bytes(b"new" * 1000)
        else:
            tmp.write_bytes(b"half")
        print(tmp, flush=True)
        time.sleep(60)  # killed here, mid-write
""")


def _killed_writer(out: Path, kind: str) -> tuple[Path, int]:
    """Run a writer in a subprocess, SIGKILL it mid-write; (its temp path, its pid)."""
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(out), kind], stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    tmp = Path(p.stdout.readline().strip())
    os.kill(p.pid, signal.SIGKILL)
    p.wait(10)
    p.stdout.close()
    return tmp, p.pid


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("had_output", [False, True])
def test_sigkilled_atomic_dir_leaves_old_output_and_litter_that_the_next_run_removes(tmp_path, had_output):
    out = tmp_path / "pkg"
    if had_output:
        out.mkdir()
        (out / "model.bin").write_bytes(b"old")
    tmp, pid = _killed_writer(out, "dir")
    assert tmp.name == f"pkg.tmp-{pid}" and tmp.is_dir() and not pid_alive(pid)
    assert (out / "model.bin").read_bytes() == b"old" if had_output else not out.exists()
    with atomic_dir(out) as t:  # the next run of the writer
        (t / "model.bin").write_bytes(b"next")
    assert not tmp.exists() and (out / "model.bin").read_bytes() == b"next"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_sigkilled_atomic_path_temp_is_removed(tmp_path):
    out = tmp_path / "report.json"
    out.write_text("{}")
    tmp, pid = _killed_writer(out, "file")
    assert tmp.is_file() and f".{pid}." in tmp.name and out.read_text() == "{}"
    assert clean_stale(tmp_path) == [tmp]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_killed_mid_swap_puts_the_previous_output_back(tmp_path):
    """Killed between atomic_dir's two renames: only `<name>.old-PID` holds the last complete output."""
    pid = _dead_pid()
    old = tmp_path / f"pkg.old-{pid}"
    old.mkdir()
    (old / "model.bin").write_bytes(b"old")
    (tmp_path / f"pkg.tmp-{pid}").mkdir()
    clean_stale(tmp_path)
    assert (tmp_path / "pkg" / "model.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_live_writers_temps_are_left_alone(tmp_path):
    mine = tmp_path / f"pkg.tmp-{os.getpid()}"
    parent = tmp_path / f"pkg.tmp-{os.getppid()}"
    for p in (mine, parent):
        p.mkdir()
    (tmp_path / "notes.tmp-later").mkdir()  # not a pid: not ours
    assert clean_stale(tmp_path) == []
    assert mine.exists() and parent.exists()
