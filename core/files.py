"""Atomic writes and content hashes, for every layer.

Atomic: write to a temp path in the same folder, flush it to disk (fsync), then
rename over the target and fsync the folder, so a reader (or a crash) sees the old
file or the new one, never half of one. Pure standard library: the device uses it.

    write_atomic(path, data)                 # bytes or text
    replace_atomic(tmp, path)                # a file finished elsewhere on the same disk
    with atomic_path(path) as tmp:           # a tool that writes a path (onnx.save, savefig)
        onnx.save(model, str(tmp))
    with atomic_dir(folder) as tmp:          # a whole folder (packages, caches)
        (tmp / "model.bin").write_bytes(...)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a folder's entry to disk (folders: where the OS allows it)."""
    flags = (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if Path(path).is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. folders on Windows cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def replace_atomic(tmp: str | Path, path: str | Path) -> None:
    """Move a finished file `tmp` (same file system) over `path`: fsync it, rename, fsync the folder."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(Path(path).parent)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (a reused id counts as alive: nothing is removed)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


# What a writer killed mid-way leaves (PID: the writer's process id): atomic_dir's folders
# `<name>.tmp-PID` and `<name>.old-PID` (killed between its two renames), atomic_path's
# files `.<stem>.PID.<random>.tmp<suffix>`.
_LITTER = re.compile(r"(?P<old>.+)\.old-(?P<pid1>\d+)|.+\.tmp-(?P<pid2>\d+)|\..+\.(?P<pid3>\d+)\.\w+\.tmp(\.[^.]*)?")
_cleaned: set[str] = set()  # folders already cleaned by this process (a killed writer's litter stays dead)


def clean_stale(folder: str | Path) -> list[Path]:
    """Remove what killed writers (dead PIDs) left in `folder`; a `<name>.old-PID` is put back as
    `<name>` when `<name>` is missing (the previous complete output), else removed. Returns what went."""
    folder = Path(folder)
    gone = []
    for p in sorted(folder.iterdir()) if folder.is_dir() else ():
        m = _LITTER.fullmatch(p.name)
        pid = int(next((g for g in (m.group("pid1"), m.group("pid2"), m.group("pid3")) if g), 0)) if m else 0
        if not m or pid == os.getpid() or pid_alive(pid):
            continue
        if m.group("old") and not (folder / m.group("old")).exists():
            os.replace(p, folder / m.group("old"))
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        gone.append(p)
    return gone


def _clean_once(folder: Path) -> None:
    key = str(folder.absolute())
    if key not in _cleaned:
        _cleaned.add(key)
        clean_stale(folder)


@contextlib.contextmanager
def atomic_path(path: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """A temp path beside `path` (same suffix, so tools that read it still work); on a clean
    exit it becomes `path` atomically, on an error it is removed. What killed writers (dead
    PIDs) left in the folder is cleaned first, once per process (clean_stale)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_once(path.parent)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.{os.getpid()}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode)  # mkstemp makes 0600
        replace_atomic(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: bytes | str, mode: int = 0o644) -> Path:
    """Write `data` (bytes, or text as UTF-8) to `path` atomically; returns the path."""
    if isinstance(data, str):
        data = data.encode()
    with atomic_path(path, mode) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fsync_path(Path(dirpath, name))
        fsync_path(dirpath)


@contextlib.contextmanager
def atomic_dir(path: str | Path, keep_existing: bool = False) -> Iterator[Path]:
    """A temp folder `<name>.tmp-<pid>` beside `path`; on a clean exit it becomes `path`.

    keep_existing=False: an old `path` is replaced (moved aside, then deleted; put back
    if the swap fails). keep_existing=True (caches): if `path` appeared meanwhile (another
    process filled it first), the new folder is dropped and the existing one kept.
    On an error nothing is left behind and an old `path` is untouched. What killed writers
    (dead PIDs) left in the folder is cleaned first, once per process (clean_stale)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_once(path.parent)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if keep_existing:
            _publish(tmp, path)
        else:
            _swap_in(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except OSError:  # a non-empty `path` exists: another process finished first
        if not path.is_dir():
            raise
    fsync_path(path.parent)


def _swap_in(tmp: Path, path: Path) -> None:
    old = path.with_name(f"{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old.exists() and not path.exists():
            os.replace(old, path)
        raise
    fsync_path(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def sha256_bytes(data: bytes | str) -> str:
    """Hex sha256 of bytes (text as UTF-8)."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def json_default(o):
    """`json.dumps(default=...)` for numpy scalars (their Python value) and paths (their string)."""
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
