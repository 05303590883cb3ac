"""semedge.core: atomic files (fsynced, nothing half written), hashes, SNR keys, the layout."""

import hashlib
import os

import pytest

from semedge.core import files as F
from semedge.core.channel_spec import snr_key


def test_write_atomic_fsyncs_the_file_and_its_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(F.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    p = F.write_atomic(tmp_path / "sub" / "a.json", "{}\n")
    assert p.read_text() == "{}\n" and oct(p.stat().st_mode & 0o777) == "0o644"
    assert synced[-1] == str(tmp_path / "sub") and synced[0].startswith(str(tmp_path / "sub" / ".a."))
    assert [x.name for x in (tmp_path / "sub").iterdir()] == ["a.json"]


def test_atomic_path_keeps_the_old_file_on_error(tmp_path):
    p = tmp_path / "fig.png"
    p.write_bytes(b"old")
    with pytest.raises(RuntimeError), F.atomic_path(p) as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert p.read_bytes() == b"old" and [x.name for x in tmp_path.iterdir()] == ["fig.png"]


def test_atomic_dir_replaces_or_keeps(tmp_path):
    out = tmp_path / "pkg"
    with F.atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with F.atomic_dir(out) as tmp:  # replace: the old folder goes
        (tmp / "b").write_text("2")
    assert sorted(x.name for x in out.iterdir()) == ["b"]
    with F.atomic_dir(out, keep_existing=True) as tmp:  # a cache filled first by another process wins
        (tmp / "c").write_text("3")
    assert sorted(x.name for x in out.iterdir()) == ["b"]
    with pytest.raises(RuntimeError), F.atomic_dir(out) as tmp:
        (tmp / "d").write_text("4")
        raise RuntimeError("interrupted")
    assert sorted(x.name for x in out.iterdir()) == ["b"] and [x.name for x in tmp_path.iterdir()] == ["pkg"]


def test_hashes(tmp_path):
    (tmp_path / "x").write_bytes(b"abc")
    want = hashlib.sha256(b"abc").hexdigest()
    assert F.sha256_file(tmp_path / "x") == F.sha256_bytes(b"abc") == F.sha256_bytes("abc") == want


def test_snr_key():
    assert [snr_key(s) for s in (10, 2.5, "inf", float("inf"), -5.0)] == ["10", "2.5", "inf", "inf", "-5"]
