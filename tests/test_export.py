"""Export of the device half: ONNX parity, dynamic shapes, fusions, packages (tiny models)."""

from __future__ import annotations

import hashlib
import json
import zipfile

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from semedge.export.onnx import (
    TOLERANCES,
    ExportParityError,
    calibration_inputs,
    check_parity,
    export_device_half,
    ort_session,
)
from semedge.export.optimize import fused_op_counts, op_counts
from semedge.export.package import build_package
from semedge.core.errors import UserError
from semedge.semcom.jsc import JSCCodec, JSCConfig
from semedge.semcom.models import tiny_model
from semedge.semcom.split import build_split


def _split(arch: str, k: int = 16):
    lm = tiny_model(arch)
    codec = JSCCodec(JSCConfig(lm.d_model, k))
    return build_split(lm, codec)


@pytest.fixture(scope="module")
def whisper_export(tmp_path_factory):
    split = _split("whisper")
    path = tmp_path_factory.mktemp("w") / "device.onnx"
    return split, export_device_half(split, path, optimize=True)


@pytest.fixture(scope="module")
def bart_export(tmp_path_factory):
    split = _split("bart")
    path = tmp_path_factory.mktemp("b") / "device.onnx"
    return split, export_device_half(split, path, optimize=True)


def _torch_out(split, feeds):
    import torch

    with torch.no_grad():
        return split.device(*[torch.from_numpy(v) for v in feeds.values()]).numpy()


def test_whisper_export_matches_torch_and_describes_io(whisper_export):
    split, rep = whisper_export
    assert rep.parity.ok and rep.parity.cosine >= 0.9999 and rep.parity.max_abs_rel <= 1e-3
    assert [i["name"] for i in rep.inputs] == ["input_features"]
    assert rep.inputs[0]["shape"] == ["batch", 80, "frames"] and rep.inputs[0]["dtype"] == "float32"
    assert rep.outputs == [{"name": "symbols", "shape": ["batch", "tokens", 16], "dtype": "float32"}]
    assert rep.bytes == rep.path.stat().st_size and not list(rep.path.parent.glob(".*"))  # no temp left
    # an independent input, batch 3 (dynamic batch)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 80, 3000)).astype(np.float32)
    got = ort_session(rep.path).run(None, {"input_features": x})[0]
    ref = _torch_out(split, {"input_features": x})
    assert got.shape == (3, 1500, 16)
    np.testing.assert_allclose(got, ref, atol=1e-3 * np.abs(ref).max())
    # a window fitted to a short utterance: 400 mel frames -> 200 tokens, same as PyTorch on that window
    got = ort_session(rep.path).run(None, {"input_features": x[:, :, :400]})[0]
    ref = _torch_out(split, {"input_features": x[:, :, :400]})
    assert got.shape == (3, 200, 16)
    np.testing.assert_allclose(got, ref, atol=1e-3 * np.abs(ref).max())


def test_bart_export_dynamic_batch_and_tokens(bart_export):
    split, rep = bart_export
    assert [i["name"] for i in rep.inputs] == ["input_ids", "attention_mask"]
    assert rep.inputs[0]["shape"] == ["batch", "tokens"] and rep.inputs[0]["dtype"] == "int64"
    sess = ort_session(rep.path)
    for b, t in ((1, 5), (3, 11)):
        ids = np.random.default_rng(b).integers(5, 300, (b, t)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[-1, t - 2:] = 0  # padding in the last row
        feeds = {"input_ids": ids, "attention_mask": mask}
        got = sess.run(None, feeds)[0]
        ref = _torch_out(split, feeds)
        assert got.shape == (b, t, 16)
        np.testing.assert_allclose(got, ref, atol=1e-4 * max(1.0, np.abs(ref).max()))


def test_fusions_present(whisper_export, bart_export):
    for _, rep in (whisper_export, bart_export):
        ops = op_counts(rep.path)
        fused = fused_op_counts(ops)
        assert fused["gelu"] >= 2, ops  # both encoder layers' FFN GELU
        assert ops.get("SkipLayerNormalization", 0) >= 2, ops
        assert fused["attention"] == 2, ops  # one per layer
        assert "Erf" not in ops and "Softmax" not in ops, ops
        assert rep.fused == fused


def test_unoptimised_export_has_no_fusions(tmp_path):
    split = _split("bart")
    rep = export_device_half(split, tmp_path / "raw.onnx", optimize=False)
    fused = fused_op_counts(op_counts(rep.path))
    assert fused["attention"] == 0 and op_counts(rep.path).get("Erf", 0) >= 2
    assert rep.parity.ok


def test_auto_keeps_the_faster_graph_and_says_why(tmp_path):
    split = _split("bart")
    rep = export_device_half(split, tmp_path / "auto.onnx")  # optimize="auto" is the default
    c = rep.choice
    assert c["chosen"] in ("fused", "unfused") and c["fused_ms"] > 0 and c["unfused_ms"] > 0
    assert c["chosen"] == ("fused" if c["fused_ms"] <= c["unfused_ms"] else "unfused")
    assert rep.optimized == (c["chosen"] == "fused")
    assert (fused_op_counts(op_counts(rep.path))["attention"] > 0) == rep.optimized
    assert rep.parity.ok
    with pytest.raises(UserError, match="optimize"):
        export_device_half(split, tmp_path / "bad.onnx", optimize="yes")


def test_corrupted_weight_fails_parity(whisper_export, tmp_path):
    split, rep = whisper_export
    m = onnx.load(str(rep.path))
    big = max(m.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    w = numpy_helper.to_array(big).copy()
    w *= -1.0  # flip a whole weight matrix
    big.CopyFrom(numpy_helper.from_array(w, big.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    calib = calibration_inputs(split)
    with pytest.raises(ExportParityError) as ei:
        check_parity(bad, split.device, calib)
    assert ei.value.parity.ok is False and "cosine" in str(ei.value)
    # the untouched file passes; a looser precision table exists for compressed graphs
    assert check_parity(rep.path, split.device, calib).ok
    assert TOLERANCES["int8"].cosine < TOLERANCES["fp32"].cosine


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_package_files_hashes_and_zip(whisper_export, tmp_path):
    split, rep = whisper_export
    out = tmp_path / "dist" / "tinyw"
    pkg = build_package(split, out, onnx_path=rep.path, profile="android-mid", measured={"latency_ms": 1.0})
    man = json.loads((pkg / "manifest.json").read_text())
    on_disk = {p.relative_to(pkg).as_posix() for p in pkg.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(man["files"]) == on_disk
    assert {"device.onnx", "frontend.json", "mel_filters.npy", "server/jsc.safetensors", "server/jsc.json"} <= on_disk
    for rel, digest in man["files"].items():
        assert _sha(pkg / rel) == digest
    assert man["format"] == "semedge-package/1" and man["package_id"].startswith("tinyw-")
    assert man["model"]["kind"] == "speech" and man["jsc"]["k"] == 16 and man["profile"] == "android-mid"
    assert man["onnx"]["inputs"][0]["name"] == "input_features" and man["onnx"]["precision"] == "fp32"
    assert man["frontend"]["samples_per_frame"] == 320 and man["frontend"]["max_frames"] == 1500
    assert np.load(pkg / "mel_filters.npy").shape == (80, 201)
    assert man["measured"] == {"latency_ms": 1.0}
    with zipfile.ZipFile(out.with_name("tinyw.zip")) as z:
        names = set(z.namelist())
        assert {f"tinyw/{r}" for r in man["files"]} | {"tinyw/manifest.json"} == names
        assert hashlib.sha256(z.read("tinyw/device.onnx")).hexdigest() == man["files"]["device.onnx"]
    # the runtime's verifier accepts it
    from semedge.runtime.package import Package

    assert Package.load(pkg).package_id == man["package_id"]


def test_text_package_has_tokenizer(bart_export, tmp_path):
    split, rep = bart_export
    pkg = build_package(split, tmp_path / "tinyb", onnx_path=rep.path)
    man = json.loads((pkg / "manifest.json").read_text())
    assert "tokenizer.json" in man["files"] and man["frontend"]["tokenizer"] == "tokenizer.json"
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(pkg / "tokenizer.json")).encode("hello there").ids
    assert ids == split.loaded.tokenizer("hello there")["input_ids"]


def test_interrupted_build_leaves_nothing_and_keeps_old(whisper_export, tmp_path, monkeypatch):
    import semedge.export.package as P

    split, rep = whisper_export
    out = tmp_path / "pkg"
    build_package(split, out, onnx_path=rep.path)
    before = json.loads((out / "manifest.json").read_text())

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(P, "_write_jsc", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        build_package(split, out, onnx_path=rep.path, profile="other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg", "pkg.zip"]  # no .tmp-*, no .old-*
    assert json.loads((out / "manifest.json").read_text()) == before  # the old package is intact
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        build_package(split, fresh, onnx_path=rep.path)
    assert not fresh.exists() and not (tmp_path / "fresh.zip").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg", "pkg.zip"]
