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
    with atomic_dir_and_file(pkg, zip) as (tmp, ztmp):   # a folder and a file made from it, swapped in together
    with scratch_dir(folder) as d:           # intermediate files beside an output, cleaned after a kill
    cached(path, build, "what")              # a cache file or folder, verified by its sums on every read
    with sealed_path(path) as tmp:           # a cache file rewritten in place, with its sums
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterator


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
# files `.<stem>.PID.<random>.tmp<suffix>`, atomic_dir_and_file's journal `<name>.swap-PID`.
_LITTER = re.compile(r"(?P<old>.+)\.old-(?P<pid1>\d+)|.+\.tmp-(?P<pid2>\d+)|\..+\.(?P<pid3>\d+)\.\w+\.tmp(\.[^.]*)?")
_JOURNAL = re.compile(r".+\.swap-(?P<pid>\d+)")
_cleaned: set[str] = set()  # folders already cleaned by this process (a killed writer's litter stays dead)


def clean_stale(folder: str | Path) -> list[Path]:
    """Remove what killed writers (dead PIDs) left in `folder`; a `<name>.old-PID` is put back as
    `<name>` when `<name>` is missing (the previous complete output), else removed; a swap journal
    (`<name>.swap-PID`) puts back every entry of its unfinished swap. Returns what went."""
    folder = Path(folder)
    gone = []
    for p in sorted(folder.iterdir()) if folder.is_dir() else ():  # unfinished swaps first: roll them back
        m = _JOURNAL.fullmatch(p.name)
        if m and int(m.group("pid")) != os.getpid() and not pid_alive(int(m.group("pid"))):
            _roll_back(p, int(m.group("pid")))
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


def _temp_file(path: Path) -> Path:
    """An empty temp file `.<stem>.PID.<random>.tmp<suffix>` beside `path`."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.{os.getpid()}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    return Path(name)


def _temp_dir(path: Path) -> Path:
    """An empty temp folder `<name>.tmp-PID` beside `path`."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


@contextlib.contextmanager
def atomic_path(path: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """A temp path beside `path` (same suffix, so tools that read it still work); on a clean
    exit it becomes `path` atomically, on an error it is removed. What killed writers (dead
    PIDs) left in the folder is cleaned first, once per process (clean_stale)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_once(path.parent)
    tmp = _temp_file(path)
    try:
        yield tmp
        os.chmod(tmp, mode)  # mkstemp makes 0600
        replace_atomic(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def scratch_dir(folder: str | Path) -> Iterator[Path]:
    """A scratch folder `.scratch.PID.<random>.tmp` in `folder`, removed on exit; one that a killed
    process left is removed by the next writer in `folder` (clean_stale), unlike a plain mkdtemp."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _clean_once(folder)
    with tempfile.TemporaryDirectory(dir=folder, prefix=f".scratch.{os.getpid()}.", suffix=".tmp") as d:
        yield Path(d)


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
    tmp = _temp_dir(path)
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


@contextlib.contextmanager
def atomic_dir_and_file(folder: str | Path, file: str | Path, mode: int = 0o644) -> Iterator[tuple[Path, Path]]:
    """atomic_dir for `folder` and atomic_path for `file` (same parent; e.g. a package and its zip),
    swapped in together: killed at any point, both old ones (or neither, on a first run) or both
    new ones remain once the next writer in that folder has run clean_stale."""
    folder, file = Path(folder), Path(file)
    if folder.parent.absolute() != file.parent.absolute():
        raise ValueError(f"{folder} and {file} must be in the same folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    _clean_once(folder.parent)
    tmp_dir, tmp_file = _temp_dir(folder), _temp_file(file)
    try:
        yield tmp_dir, tmp_file
        os.chmod(tmp_file, mode)
        _fsync_tree(tmp_dir)
        fsync_path(tmp_file)
        _swap_together([(tmp_dir, folder), (tmp_file, file)])
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_file.unlink(missing_ok=True)


def _swap_together(pairs: list[tuple[Path, Path]]) -> None:
    """Rename each temp over its target as one step. A journal names the targets that existed; until
    it is removed (the commit), a failure here or clean_stale after a kill rolls every target back."""
    pid, parent = os.getpid(), pairs[0][1].parent
    journal = parent / f"{pairs[0][1].name}.swap-{pid}"
    write_atomic(journal, json.dumps({p.name: p.exists() for _, p in pairs}))
    try:
        for _, p in pairs:
            if p.exists():
                os.replace(p, p.with_name(f"{p.name}.old-{pid}"))
        for tmp, p in pairs:
            os.replace(tmp, p)
        fsync_path(parent)
    except BaseException:
        _roll_back(journal, pid)
        raise
    journal.unlink()
    fsync_path(parent)
    for _, p in pairs:
        _remove(p.with_name(f"{p.name}.old-{pid}"))


def _roll_back(journal: Path, pid: int) -> None:
    """Undo an unfinished _swap_together: each target moved aside is put back, a new one removed."""
    try:
        had = json.loads(journal.read_text())
    except (OSError, ValueError):
        had = {}  # written atomically: unreadable only if damaged; nothing was renamed under it
    for name, existed in had.items():
        p, old = journal.parent / name, journal.parent / f"{name}.old-{pid}"
        if old.exists():
            _remove(p)
            os.replace(old, p)
        elif not existed:
            _remove(p)
    fsync_path(journal.parent)
    journal.unlink(missing_ok=True)


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


# ----------------------------------------------------------------------------- verified caches
# A cache folder holds SUMS ({file: [[size, sha256]]} for each other file in it); a cache file
# has `<name>.sha256` beside it. Checked on every read: a cache that does not match (corrupt,
# truncated, a file missing or added, no sums: written before sums existed) is removed with a
# warning and rebuilt.

SUMS = ".sha256.json"


class CacheRebuilt(UserWarning):
    """A cache did not match its sums and was removed (it is rebuilt)."""


def _sums_of(path: Path) -> dict:
    """{relative name: [size, sha256]} of a folder's files (SUMS excluded), or of one file."""
    if path.is_file():
        return {path.name: [path.stat().st_size, sha256_file(path)]}
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != SUMS)
    return {p.relative_to(path).as_posix(): [p.stat().st_size, sha256_file(p)] for p in files}


def _sums_path(path: Path) -> Path:
    return path / SUMS if path.is_dir() else path.with_name(path.name + ".sha256")


def seal(path: str | Path) -> None:
    """Record the sums of cache `path` (a file or a folder); call it after the cache is complete."""
    path = Path(path)
    sums = {name: [s] for name, s in _sums_of(path).items()}
    write_atomic(_sums_path(path), json.dumps(sums, indent=0, sort_keys=True))


@contextlib.contextmanager
def sealed_path(path: str | Path) -> Iterator[Path]:
    """atomic_path for a cache file that is rewritten with its sums. Killed at any point, it leaves
    a pair that matches: the sums name the new bytes (and still the old ones) before the file changes."""
    path = Path(path)
    with atomic_path(path) as tmp:
        yield tmp
        new = _sums_of(tmp)[tmp.name]
        sums = [new] + [s for s in _prior_sums(path) if s != new][: _KEEP_SUMS - 1]
        write_atomic(_sums_path(path), json.dumps({path.name: sums}))


_KEEP_SUMS = 4  # sums of a rewritten cache file kept: the newest first (concurrent writers add theirs)


def _prior_sums(path: Path) -> list:
    """The sums a file cache lists now (they name its current bytes if it matches), else its own."""
    try:
        sums = json.loads(_sums_path(path).read_text())
        if _well_formed(sums) and path.name in sums:
            return sums[path.name]
    except (OSError, ValueError):
        pass
    return [_sums_of(path)[path.name]] if path.is_file() else []


def write_sealed(path: str | Path, data: bytes | str) -> None:
    """Rewrite cache file `path` atomically with its sums (sealed_path)."""
    with sealed_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def _well_formed(sums) -> bool:
    """{name: [[size, sha256], ...]}"""
    return isinstance(sums, dict) and all(
        isinstance(v, list) and all(isinstance(x, list) and len(x) == 2 for x in v) for v in sums.values())


def _mismatch(path: Path) -> str | None:
    """Why cache `path` does not match its sums (None: it does)."""
    try:
        want = json.loads(_sums_path(path).read_text())
    except FileNotFoundError:
        return "it has no sums"
    except (OSError, ValueError) as e:
        return f"its sums are unreadable ({e})"
    if not _well_formed(want):
        return "its sums are unreadable (not {file: [[size, sha256], ...]})"
    have = _sums_of(path)
    if set(have) != set(want):
        return f"its files differ from its sums ({sorted(set(have) ^ set(want))[:3]})"
    bad = [n for n in have if have[n] not in want[n]]
    if not bad:
        return None
    shorter = all(have[bad[0]][0] < s[0] for s in want[bad[0]])
    return f"{bad[0]} is {'truncated' if shorter else 'corrupt'}"


def _remove(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _discard(path: Path) -> None:
    """Remove a bad cache and its sums: renamed first (no reader sees half of it), then deleted."""
    sidecar = None if path.is_dir() else _sums_path(path)
    aside = path.with_name(f"{path.name}.tmp-{os.getpid()}")  # clean_stale's pattern, if we are killed here
    _remove(aside)
    try:
        os.replace(path, aside)
    except FileNotFoundError:  # another process discarded it first
        pass
    _remove(aside)
    if sidecar is not None:
        sidecar.unlink(missing_ok=True)


def check_cache(path: str | Path, what: str, *, adopt_unsealed: bool = False) -> bool:
    """Whether cache `path` exists and matches its sums; a bad one is removed with a warning.
    adopt_unsealed: one written before sums existed is sealed as it is (caches costly to rebuild)."""
    path = Path(path)
    if not path.exists():
        return False
    why = _mismatch(path)
    if why is None:
        return True
    if adopt_unsealed and not _sums_path(path).exists():
        seal(path)
        return True
    warnings.warn(f"{what} cache {path}: {why}; rebuilding it", CacheRebuilt, stacklevel=2)
    _discard(path)
    return False


def cached(path: str | Path, build: Callable[[Path], None], what: str, *, folder: bool = False) -> Path:
    """`path`, a verified cache: built when missing, rebuilt (with a warning) when it does not match
    its sums. `build(tmp)` writes the file (or fills the folder) `tmp`; it becomes `path` atomically."""
    path = Path(path)
    if check_cache(path, what):
        return path
    if folder:
        with atomic_dir(path, keep_existing=True) as tmp:  # another process may finish first: its copy wins
            build(tmp)
            seal(tmp)
        return path
    with atomic_path(path) as tmp:
        build(tmp)
    seal(path)
    return path


def json_default(o):
    """`json.dumps(default=...)` for numpy scalars (their Python value) and paths (their string)."""
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
