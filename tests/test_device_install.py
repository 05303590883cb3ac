"""The device install: a fresh venv with the semedge wheel and its base dependencies only (no
torch, no transformers) runs `semedge device bench` and a `semedge device run` round trip against
a real server. Slow (about 1-2 min: pip resolves the base dependencies from the local index)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("semedge", "core", "compress", "export", "runtime", "semcom")  # pyproject's package-dir
ENV = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="120", PIP_DISABLE_PIP_VERSION_CHECK="1")


def _sh(*cmd, timeout=600, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=ENV, timeout=timeout, **kw)
    assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-3000:])
    return r


def _wheel(tmp: Path) -> Path:
    """`pip wheel --no-deps` of a copy of the tree (the build writes build/ and egg-info into its source)."""
    src = tmp / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for d in SOURCES:
        shutil.copytree(REPO / d, src / d, ignore=skip)
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    _sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", src)
    (whl,) = (tmp / "dist").glob("semedge-*.whl")
    return whl


def _venv(tmp: Path, whl: Path) -> Path:
    """A fresh venv (no system site-packages) with the wheel and its base dependencies; its bin/."""
    _sh(sys.executable, "-m", "venv", tmp / "venv")
    bin_ = tmp / "venv" / "bin"
    _sh(bin_ / "pip", "install", "-q", whl)
    return bin_


def _wav(path: Path) -> Path:
    t = np.arange(16000) / 16000
    pcm = np.round(0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000), w.writeframes(pcm.tobytes())
    return path


def test_fresh_venv_base_deps_runs_device_bench_and_run(tmp_path):
    from conftest import tiny_whisper_package

    from semedge.runtime.package import Package
    from semedge.runtime.server import ServerConfig, create_app, serve_in_thread

    bin_ = _venv(tmp_path, _wheel(tmp_path))
    names = {p["name"].lower() for p in json.loads(_sh(bin_ / "pip", "list", "--format", "json").stdout)}
    assert {"semedge", "onnxruntime", "numpy"} <= names and not names & {"torch", "transformers"}, names
    loaded, _, pkg = tiny_whisper_package(tmp_path / "pkg")
    # outside the checkout: `python -m` (the peak-RSS child) puts the cwd first, and the repo's semedge/ would shadow
    r = _sh(bin_ / "semedge", "device", "bench", pkg, "--ep", "cpu", "--runs", "2", "--warmup", "0", "--json",
            cwd=tmp_path)
    assert json.loads(r.stdout)["results"][0]["p50_ms"] > 0
    app = create_app([Package.load(pkg)], loader=lambda src: loaded, config=ServerConfig(max_new_tokens=4, backend="torch"))
    with serve_in_thread(app) as url:
        r = _sh(bin_ / "semedge", "device", "run", pkg, "--wav", _wav(tmp_path / "a.wav"), "--server", url,
                "--ep", "cpu", "--channel", "awgn", "--snr", "10", "--seed", "0", "--json", cwd=tmp_path)
    out = json.loads(r.stdout)
    assert out["providers"] == ["CPUExecutionProvider"] and out["tokens"] == 50 and isinstance(out["text"], str)
