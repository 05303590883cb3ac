import json
import subprocess
import sys
import time

import numpy as np
import pytest

from semedge.semcom import metrics
from semedge.semcom.errors import UserError
from semedge.semcom.tasks import speech


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path


def test_split_sizes_and_disjoint():
    sizes = speech.split_sizes()
    total = sum(sizes.values())
    assert total > 10000
    for s in ("test", "val"):
        assert 0.08 < sizes[s] / total < 0.12
    keys = {s: {metrics.normalize(t) for t in speech.sentences(s)} for s in speech.SPLITS}
    assert all(len(keys[s]) == sizes[s] for s in speech.SPLITS)  # deduped
    assert not keys["train"] & keys["val"]
    assert not keys["train"] & keys["test"]
    assert not keys["val"] & keys["test"]
    for t in speech.sentences("test")[:200]:
        assert speech.split_of(t) == "test"
        assert 4 <= len(t.split()) <= 20 and t.isascii()


def test_order_is_deterministic_across_processes():
    code = ("import json; from semedge.semcom.tasks import speech; "
            "print(json.dumps(speech.sentences('test')[:20]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**__import__("os").environ, "PYTHONHASHSEED": "123"})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == speech.sentences("test")[:20]


def test_bad_split():
    with pytest.raises(UserError, match="split"):
        speech.sentences("dev")


def test_synthesize_and_cache(cache, monkeypatch):
    t0 = time.perf_counter()
    utts = speech.load_split("test", n=3, progress=False)
    first = time.perf_counter() - t0
    assert [u.text for u in utts] == speech.sentences("test")[:3]
    for u in utts:
        assert u.audio.dtype == np.float32 and u.audio.ndim == 1
        words = len(u.text.split())
        # espeak at 140-180 wpm: between ~0.15 and ~1 s per word, plus a short tail.
        assert 0.15 * words < u.duration < 1.0 * words + 1.0
        assert 0.01 < np.sqrt(np.mean(u.audio**2)) < 0.5
        assert u.voice in speech.VOICES and u.speed in speech.SPEEDS
        assert (u.voice, u.speed) == speech.voice_for(u.text)
    d = cache / "semedge" / "speech" / "test"
    idx = json.loads((d / "index.json").read_text())
    assert set(idx["utterances"]) == {u.id for u in utts}

    def no_synth(*a, **k):
        raise AssertionError("cache miss: synthesize called")

    monkeypatch.setattr(speech, "synthesize", no_synth)
    t0 = time.perf_counter()
    again = speech.load_split("test", n=3)
    second = time.perf_counter() - t0
    assert second < first
    for a, b in zip(utts, again):
        assert a.id == b.id and np.array_equal(a.audio, b.audio)


def test_missing_espeak(cache, monkeypatch):
    monkeypatch.setattr(speech.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="espeak-ng not found"):
        speech.synthesize("hello there my friend")


def test_read_wav_resamples_stereo(tmp_path):
    sf = pytest.importorskip("soundfile")
    sr, secs = 44100, 1.5
    t = np.arange(int(sr * secs)) / sr
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    stereo = np.stack([left, left], axis=1)
    p = tmp_path / "tone.wav"
    sf.write(p, stereo, sr, subtype="PCM_16")
    x = speech.read_wav(p)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) - secs * 16000) <= 1
    spec = np.abs(np.fft.rfft(x))
    assert abs(np.argmax(spec) * 16000 / len(x) - 440) < 2
    assert 0.3 < np.abs(x).max() < 0.6


def test_read_wav_errors(tmp_path):
    missing = tmp_path / "nope.wav"
    with pytest.raises(UserError, match="nope.wav"):
        speech.read_wav(missing)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"not audio at all" * 10)
    with pytest.raises(UserError, match="junk.wav"):
        speech.read_wav(junk)
