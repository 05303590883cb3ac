"""Caches are verified by their sums when read: a corrupt or truncated one is rebuilt with a warning.

One test per kind of cache: converted models (CTranslate2 decoders; the weight-hash memo the
built-in conversions are keyed by), feature statistics (the identity codec's calibration),
accuracy results; and the helper itself (core/files.py: cached, check_cache, write_sealed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from semedge.core.files import SUMS, CacheRebuilt, cached, check_cache, sha256_file, write_sealed


def flip_byte(path, at: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "semedge"


# ----------------------------------------------------------------------------- the helper


def _counting_build(calls: list):
    def build(tmp):
        calls.append(tmp)
        (tmp / "sub").mkdir(exist_ok=True) if tmp.is_dir() else None
        (tmp / "sub" / "w.bin" if tmp.is_dir() else tmp).write_bytes(b"weights" * 100)
    return build


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove", "add", "no sums"])
def test_a_damaged_cache_folder_is_rebuilt_with_a_warning(tmp_path, damage):
    calls, out = [], tmp_path / "model"
    build = _counting_build(calls)
    cached(out, build, "test model", folder=True)
    assert cached(out, build, "test model", folder=True) == out and len(calls) == 1  # intact: not rebuilt
    w = out / "sub" / "w.bin"
    {"flip": lambda: flip_byte(w), "truncate": lambda: truncate(w), "remove": w.unlink,
     "add": lambda: (out / "extra").write_text("x"), "no sums": (out / SUMS).unlink}[damage]()
    with pytest.warns(CacheRebuilt, match="test model cache") as rec:
        cached(out, build, "test model", folder=True)
    assert len(calls) == 2 and w.read_bytes() == b"weights" * 100 and not (out / "extra").exists()
    if damage == "truncate":
        assert "truncated" in str(rec[0].message)
    assert check_cache(out, "test model")


def test_a_damaged_cache_file_is_rebuilt_and_rewrites_survive_a_kill(tmp_path):
    calls, f = [], tmp_path / "stats.bin"
    build = _counting_build(calls)
    cached(f, build, "stats")
    truncate(f)
    with pytest.warns(CacheRebuilt, match="truncated"):
        cached(f, build, "stats")
    assert len(calls) == 2 and check_cache(f, "stats")
    # write_sealed: the sums name the new bytes before the file changes, so a kill between leaves a match
    j = tmp_path / "acc.json"
    write_sealed(j, "{}")
    old = j.read_bytes()
    write_sealed(j, '{"a": 1}')
    j.write_bytes(old)  # as if killed after the sums were written, before the file was replaced
    assert check_cache(j, "accuracy")
    j.write_bytes(b'{"a": 2}')  # same length, other bytes
    with pytest.warns(CacheRebuilt, match="corrupt"):
        assert not check_cache(j, "accuracy")
    assert not j.exists() and not j.with_name("acc.json.sha256").exists()


# ----------------------------------------------------------------------------- each kind of cache


def test_accuracy_cache_with_a_changed_number_is_measured_again(tmp_path):
    from semedge.runtime.evaluate import AccuracyCache

    path = tmp_path / "accuracy.json"
    AccuracyCache(path).put("k1", {"wer": 0.25})
    assert AccuracyCache(path).get("k1") == {"wer": 0.25}
    path.write_text(path.read_text().replace("0.25", "0.05"))  # still valid JSON: only the sums can tell
    with pytest.warns(CacheRebuilt, match="accuracy cache"):
        again = AccuracyCache(path)
    assert again.get("k1") is None and again.misses == 1
    legacy = tmp_path / "legacy.json"  # written before sums existed: adopted, not thrown away
    legacy.write_text(json.dumps({"k2": {"wer": 0.5}}))
    assert AccuracyCache(legacy).get("k2") == {"wer": 0.5} and check_cache(legacy, "accuracy")


def test_weight_hash_memo_with_a_wrong_digest_is_recomputed(tmp_path, cache_home):
    from semedge.semcom.ct2 import weights_sha256

    w = tmp_path / "model.bin"
    w.write_bytes(b"\x00" * 4096)
    right = weights_sha256([w])
    assert right == sha256_file(w)
    (memo,) = (cache_home / "hashes").glob("*.json")
    memo.write_text(memo.read_text().replace(right, "0" * 64))  # a plausible digest, the wrong one
    with pytest.warns(CacheRebuilt, match="weight hash cache"):
        assert weights_sha256([w]) == right


@pytest.fixture(scope="module")
def tiny():
    from semedge.semcom.models import tiny_model

    return tiny_model("whisper")


def test_calibration_statistics_corrupted_are_recomputed(tiny, cache_home, monkeypatch):
    import torch

    from semedge.semcom.split import identity_codec

    h = torch.randn(4, 10, tiny.d_model, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(type(tiny.task), "calibration_states", lambda self, loaded, n: h)
    first = identity_codec(tiny, n_calib=4)
    (stats,) = (cache_home / "stats").glob("*.safetensors")
    flip_byte(stats)  # the last byte of std: loads fine, wrong by a bit
    with pytest.warns(CacheRebuilt, match="calibration statistics cache"):
        again = identity_codec(tiny, n_calib=4)
    assert torch.equal(again.encoder.std, first.encoder.std) and torch.equal(again.decoder.mean, first.decoder.mean)


def test_ctranslate2_decoder_truncated_is_converted_again(tiny, cache_home):
    pytest.importorskip("ctranslate2")
    from semedge.semcom.ct2_backend import convert

    out = convert(tiny, "float32")
    good = sha256_file(out / "model.bin")
    truncate(out / "model.bin")
    with pytest.warns(CacheRebuilt, match="CTranslate2 decoder cache .*model.bin is truncated"):
        assert convert(tiny, "float32") == out
    assert sha256_file(out / "model.bin") == good


def test_a_cache_another_process_discarded_first_is_rebuilt(tmp_path, monkeypatch):
    from semedge.core import files as F

    path = tmp_path / "c"
    path.mkdir()
    (path / "a").write_text("x")  # no sums: bad
    real_replace = os.replace

    def racing_replace(src, dst):  # the other process renames it away between our check and our move
        F._remove(Path(src))
        return real_replace(src, dst)

    monkeypatch.setattr(F.os, "replace", racing_replace)
    with pytest.warns(F.CacheRebuilt):
        assert F.check_cache(path, "test") is False
    monkeypatch.setattr(F.os, "replace", real_replace)
    F.cached(path, lambda tmp: (tmp / "a").write_text("y"), "test", folder=True)
    assert (path / "a").read_text() == "y" and F.check_cache(path, "test")


def test_feature_cache_corrupted_is_encoded_again(tiny, cache_home):
    """`semedge train`'s encoder-output cache: a flipped byte still loads, so only the sums can tell."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from semedge.semcom.training.feature_cache import CACHE_FILE, cached_speech_features, feature_cache_dir

    rng = np.random.default_rng(0)
    utts = [SimpleNamespace(id=f"u{i}", audio=0.1 * rng.standard_normal(8000).astype(np.float32)) for i in range(2)]
    first = cached_speech_features(tiny, utts, progress=False)
    path = feature_cache_dir(tiny) / CACHE_FILE
    flip_byte(path)  # the last value of a tensor: loads fine, wrong
    with pytest.warns(CacheRebuilt, match="encoder feature cache .*corrupt"):
        again = cached_speech_features(tiny, utts, progress=False)
    assert all(torch.equal(again[u.id], first[u.id]) for u in utts) and check_cache(path, "encoder feature")
    path.with_name(path.name + ".sha256").unlink()  # written before sums existed: adopted as it is
    assert check_cache(path, "encoder feature", adopt_unsealed=True)


def test_onnx_candidate_truncated_or_corrupt_is_built_again(tiny, tmp_path, cache_home):
    """The planner's (and the build's) plan → ONNX cache (compress/realise.py)."""
    import torch

    from semedge.compress.plan import Plan
    from semedge.compress.realise import RealiseFiles, realise
    from semedge.semcom.jsc import JSCCodec, JSCConfig
    from semedge.semcom.split import build_split

    torch.manual_seed(1)
    split, exports = build_split(tiny, JSCCodec(JSCConfig(d_model=64, k=16, hidden=64))), []

    def torch_split():
        exports.append(1)
        return split

    plan, files = Plan.make([]), RealiseFiles(tmp_path / "c.onnx", tmp_path / "b.fp32.onnx")
    good = sha256_file(realise(plan, torch_split, files, optimize=False).path)
    assert realise(plan, torch_split, files, optimize=False).built is False
    truncate(files.onnx)
    with pytest.warns(CacheRebuilt, match="ONNX candidate cache .*c.onnx is truncated"):
        r = realise(plan, torch_split, files, optimize=False)
    assert r.built and sha256_file(r.path) == good and len(exports) == 1  # the fp32 export was still good
    flip_byte(files.base, at=len(files.base.read_bytes()) // 2)
    files.onnx.unlink()
    with pytest.warns(CacheRebuilt, match="b.fp32.onnx is corrupt"):
        r = realise(plan, torch_split, files, optimize=False)
    assert sha256_file(r.path) == good and len(exports) == 2
