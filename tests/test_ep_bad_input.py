"""Bad target input through the `semedge` console script (issue 15): an EP the package cannot run, a
provider option the EP does not know, a GPU profile calibrated from CPU timings. Each is one line
naming the problem and the fix, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _tinyonnx import tiny_encoder

SCRIPT = Path(sys.executable).parent / "semedge"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", COLUMNS="100")
PROFILES = Path(__file__).resolve().parent.parent / "device_profiles"
INT8 = {"onnx": {"precision": "int8", "inputs": [{"name": "x", "shape": [1, "T", 64]}]},
        "plan": {"steps": [{"op": "quantize_onnx", "config": {"mode": "int8_dynamic"}}]}}
QDQ = {"target": {"format": "qdq_a8w8", "fixed_shapes": True},
       "onnx": {"precision": "int8", "inputs": [{"name": "x", "shape": [1, 16, 64]}]}}


def run(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=ENV, cwd=cwd,
                          timeout=180)


def one_line_error(r: subprocess.CompletedProcess, *words: str) -> str:
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (r.returncode, r.stderr)
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def _pkg(root: Path, manifest: dict) -> Path:
    """A folder with a tiny device.onnx and the manifest fields the EP check reads."""
    root.mkdir()
    tiny_encoder(root / "device.onnx", d=64, ffn=128, layers=1)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """A real (hash-checked) tiny Whisper package: fp32, dynamic input shapes."""
    from conftest import tiny_whisper_package

    return tiny_whisper_package(tmp_path_factory.mktemp("pkg") / "tiny")[2]


@pytest.mark.parametrize("manifest, ep, words", [
    (INT8, "tensorrt", ["format int8_dynamic", "TensorRT does not run", "fp16, fp32, qdq_a8w8", "--ep cpu",
                        "semedge export --device"]),
    (INT8, "cuda", ["format int8_dynamic", "CUDA does not run"]),
    (QDQ, "coreml", ["format qdq_a8w8", "CoreML does not run", "fp16, fp32"]),
    (INT8, "nnapi", ["format int8_dynamic", "NNAPI does not run"]),
])
def test_bench_ep_the_package_cannot_run(tmp_path, manifest, ep, words):
    """Refused before any session (and before asking whether this onnxruntime build has the EP)."""
    pkg = _pkg(tmp_path / "pkg", manifest)
    one_line_error(run("device", "bench", pkg, "--ep", ep, "--out", tmp_path / "b.json", cwd=tmp_path), *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_bench_cpu_unit_eps_run_every_package(tmp_path):
    """XNNPACK and the CPU EP run any format (QDQ, int8 here): no refusal."""
    pkg = _pkg(tmp_path / "pkg", QDQ)
    r = run("device", "bench", pkg, "--ep", "cpu", "--lengths", "16", "--runs", "1", "--warmup", "0", "--json",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run("device", "bench", pkg, "--ep", "xnnpack", cwd=tmp_path)
    assert "does not run" not in r.stderr  # refused only when this build lacks XNNPACK
    assert r.returncode == 0 or "XnnpackExecutionProvider is not available" in r.stderr, r.stderr


@pytest.mark.parametrize("ep, words", [
    ("nnapi", ["dynamic input shapes", "NNAPI takes fixed shapes only", "--ep cpu"]),
    ("qnn", ["format fp32", "QNN does not run", "qdq_a8w8, qdq_a16w8"]),
])
def test_device_run_ep_the_package_cannot_run(speech, tmp_path, ep, words):
    r = run("device", "run", speech, "--text", "hi", "--ep", ep, "--server", "http://127.0.0.1:9", cwd=tmp_path)
    one_line_error(r, *words)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, words", [
    (["--ep", "cuda", "--ep-option", "trt_fp16_enable=1"], ["trt_fp16_enable", "not an option of CUDA", "device_id"]),
    (["--ep", "coreml", "--ep-option", "ModelFormat=Fast"], ["ModelFormat=Fast", "MLProgram, NeuralNetwork"]),
])
def test_device_run_unknown_provider_option(speech, tmp_path, args, words):
    r = run("device", "run", speech, "--text", "hi", *args, "--server", "http://127.0.0.1:9", cwd=tmp_path)
    one_line_error(r, *words)
    assert list(tmp_path.iterdir()) == []


def test_profile_with_unknown_provider_option_is_refused(tmp_path):
    bad = tmp_path / "jet.yaml"
    bad.write_text((PROFILES / "jetson-orin-nano.yaml").read_text().replace("trt_fp16_enable", "trt_fp17_enable", 1))
    r = run("profiles", "validate", bad, cwd=tmp_path)
    assert r.returncode == 2 and "trt_fp17_enable" in r.stderr and "TensorRT" in r.stderr, r.stderr
    one_line_error(run("device", "bench", _pkg(tmp_path / "pkg", {}), "--device", bad, cwd=tmp_path),
                   "trt_fp17_enable", "fix")


def test_gpu_profile_calibrated_from_cpu_timings(tmp_path):
    """A CPU bench cannot fit a GPU-first profile: refused, the profile and --out untouched."""
    pkg = _pkg(tmp_path / "pkg", {})
    bench = tmp_path / "bench.json"
    r = run("device", "bench", pkg, "--ep", "cpu", "--lengths", "16,64", "--runs", "2", "--warmup", "0",
            "--out", bench, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    prof = tmp_path / "jetson-orin-nano.yaml"
    prof.write_text((PROFILES / "jetson-orin-nano.yaml").read_text())
    before = prof.read_bytes()
    r = run("profiles", "calibrate", prof, bench, "--out", tmp_path / "cal.yaml", cwd=tmp_path)
    one_line_error(r, "CPUExecutionProvider (cpu)", "cannot fit its gpu roofline", "--ep tensorrt", "--unit cpu")
    r = run("profiles", "calibrate", prof, bench, cwd=tmp_path)
    one_line_error(r, "cannot fit its gpu roofline")
    assert prof.read_bytes() == before and not (tmp_path / "cal.yaml").exists()
