"""`semedge export --frontend graph` (issue 15, item 4): Whisper's log-mel front end inside device.onnx,
PCM in. Parity with runtime.features.log_mel, packages on the tiny random Whisper (dynamic and fixed
shapes, .ort), the runtime feeding PCM, and bad input through the `semedge` script."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from semedge.core.errors import UserError
from semedge.core.frames import N_SAMPLES, content_frames, window_frames
from semedge.export import frontend as fe
from semedge.runtime.features import log_mel

SCRIPT = Path(sys.executable).parent / "semedge"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", COLUMNS="100")


@pytest.fixture(scope="module")
def split():
    import torch

    from semedge.semcom.jsc import JSCCodec, JSCConfig
    from semedge.semcom.models import tiny_model
    from semedge.semcom.split import build_split

    torch.manual_seed(1)
    return build_split(tiny_model("whisper"), JSCCodec(JSCConfig(d_model=64, k=16, hidden=64, skip=True)))


@pytest.fixture(scope="module")
def front(split):
    return fe.params(split.loaded)


def _session(model):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _signal(n: int, seed: int, scale: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    a = scale * (np.sin(2 * np.pi * 440 * t) + 0.3 * rng.standard_normal(n))
    a[n // 3 : n // 2] *= 1e-4  # a quiet stretch: the max - 8 floor applies
    return a.astype(np.float32)


@pytest.mark.parametrize("n, scale", [(1, 0.5), (399, 1.0), (16_000, 0.3), (56_123, 1e-3), (N_SAMPLES, 0.8),
                                      (N_SAMPLES + 20_000, 0.1)])
def test_graph_log_mel_matches_numpy(front, n, scale):
    """Padding to 30 s, reflect padding, power, log10 clamp, max - 8 floor, (x + 4) / 4, fit window: ≤ 1e-4."""
    sess = _session(fe.standalone(*front))
    a = _signal(n, n, scale)
    got = sess.run(None, {fe.INPUT: a[None]})[0][0]
    ref = log_mel(a)[:, : window_frames(n)]
    assert got.shape == ref.shape and float(np.abs(got - ref).max()) <= 1e-4


def test_graph_log_mel_batch_and_fixed(front, split):
    """Each batch row floored at its own max; the fixed [1, 480000] graph gives the full window; both
    within 1e-4 of transformers' WhisperFeatureExtractor too."""
    a, b = _signal(48_000, 1, 1.0), _signal(48_000, 2, 1e-3)
    got = _session(fe.standalone(*front)).run(None, {fe.INPUT: np.stack([a, b])})[0]
    w = window_frames(48_000)
    for row, x in zip(got, (a, b)):
        assert float(np.abs(row - log_mel(x)[:, :w]).max()) <= 1e-4
    padded = np.pad(a, (0, N_SAMPLES - a.size))
    full = _session(fe.standalone(*front, fixed=True)).run(None, {fe.INPUT: padded[None]})[0][0]
    hf = split.loaded.feature_extractor([a], sampling_rate=16000, return_tensors="np").input_features[0]
    assert full.shape == (80, 3000) and float(np.abs(full - hf).max()) <= 1e-4


def test_frontend_choice_is_checked():
    from semedge.compress.targets import package_kind
    from semedge.runtime.profiles import load_profile

    with pytest.raises(UserError, match="--opset 16 is too low"):
        fe.check_choice("graph", 16)
    with pytest.raises(UserError, match="'pcm' is not a front end"):
        fe.check_choice("pcm", 17)
    assert package_kind(load_profile("iphone"), frontend="graph").frontend == "graph"


def _one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.parametrize("args, words", [
    (["--frontend", "graph", "--opset", "16"], ["--frontend graph", "--opset 16 is too low", "--opset 17 or higher"]),
    (["--frontend", "pcm"], ["--frontend 'pcm'", "numpy", "graph"]),
])
def test_export_bad_frontend_through_the_script(tmp_path, args, words):
    """One line, exit 2, before the model loads, nothing written."""
    r = subprocess.run([str(SCRIPT), "export", "--model", "tiny:whisper:0", "--device", "host", *args,
                        "--out", str(tmp_path / "pkg")], capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=120)
    _one_line_error(r, *words)
    assert list(tmp_path.iterdir()) == []


def _package(split, device: str, fmt: str, out: Path) -> Path:
    from semedge.compress.targets import build_target_package, package_kind
    from semedge.runtime.profiles import load_profile

    prof = load_profile(device)
    kind = dataclasses.replace(package_kind(prof, fmt, frontend="graph"), fused=False)
    return build_target_package(split, prof, kind, out)


@pytest.fixture(scope="module")
def graph_pkg(split, tmp_path_factory):
    return _package(split, "host", "fp32", tmp_path_factory.mktemp("fe") / "graph")


def _reference(split, audio: np.ndarray) -> np.ndarray:
    """The device half in PyTorch on numpy log-mel: what a numpy-front-end package sends."""
    import torch

    with torch.no_grad():
        return fe.reference(split.device.eval())(torch.from_numpy(audio[None]))[0].numpy()


def test_graph_package_manifest_and_runner(split, graph_pkg):
    from semedge.runtime.runner import DeviceRunner

    man = json.loads((graph_pkg / "manifest.json").read_text())
    assert man["frontend"]["compute"] == "graph" and man["target"]["frontend"] == "graph"
    assert man["onnx"]["inputs"][0] == {"name": "audio", "shape": ["batch", "samples"], "dtype": "float32"}
    assert man["frontend"]["parity"]["max_abs"]["numpy"] <= 1e-4 and man["onnx"]["parity"]["ok"]
    a = _signal(20_000, 3, 0.5)
    got = DeviceRunner(graph_pkg).encode_audio(a)
    ref = _reference(split, a)[: content_frames(a.size)]
    assert got.shape == ref.shape and float(np.abs(got - ref).max()) <= 1e-3 * float(np.abs(ref).max())


def _wav(path: Path, audio: np.ndarray) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((audio * 32767).astype("<i2").tobytes())
    return path


def test_device_run_feeds_pcm_through_the_script(split, graph_pkg, tmp_path):
    from semedge.runtime.package import Package
    from semedge.runtime.server import ServerConfig, create_app, serve_in_thread

    app = create_app([Package.load(graph_pkg)], loader=lambda src: split.loaded,
                     config=ServerConfig(max_new_tokens=4, backend="torch"))
    with serve_in_thread(app) as url:
        r = subprocess.run([str(SCRIPT), "device", "run", str(graph_pkg), "--wav", str(_wav(tmp_path / "a.wav", _signal(16_000, 4, 0.5))),
                            "--server", url, "--channel", "none", "--json"], capture_output=True, text=True, env=ENV,
                           cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["tokens"] == content_frames(16_000) and isinstance(out["text"], str)


def test_mismatched_frontend_is_refused(graph_pkg, tmp_path):
    """A manifest that says numpy on a PCM graph: the runner and `semedge device bench` refuse it (exit 2)."""
    from semedge.runtime.runner import DeviceRunner

    bad = tmp_path / "bad"
    shutil.copytree(graph_pkg, bad)
    man = json.loads((bad / "manifest.json").read_text())
    man["frontend"]["compute"] = "numpy"
    (bad / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(UserError, match="frontend.compute is numpy .* takes audio"):
        DeviceRunner(bad)
    r = subprocess.run([str(SCRIPT), "device", "bench", str(bad), "--runs", "1"], capture_output=True, text=True,
                       env=ENV, cwd=tmp_path, timeout=120)
    _one_line_error(r, "frontend.compute is numpy", "device.onnx takes audio", "--frontend graph")


def test_bench_feeds_30_s_of_pcm(graph_pkg):
    from semedge.runtime.profiler import make_inputs, session

    feeds = make_inputs(session(graph_pkg / "device.onnx"))
    assert feeds["audio"].shape == (1, N_SAMPLES) and feeds["audio"].dtype == np.float32


@pytest.fixture(scope="module")
def fixed_pkgs(split, tmp_path_factory):
    """device -> its fixed-shape fp32 graph package, built on first use."""
    root, built = tmp_path_factory.mktemp("fixed"), {}

    def get(device: str) -> Path:
        if device not in built:
            built[device] = _package(split, device, "fp32", root / device)
        return built[device]

    return get


def test_fixed_shape_graph_package_and_ort(split, fixed_pkgs):
    """NNAPI (fixed shapes, .ort): input [1, 480000]; the runner pads to 30 s; device.ort gives the same."""
    from semedge.runtime.runner import DeviceRunner

    pkg = fixed_pkgs("android-mid")
    man = json.loads((pkg / "manifest.json").read_text())
    assert man["onnx"]["inputs"][0]["shape"] == [1, N_SAMPLES] and man["target"]["fixed_shapes"]
    a = _signal(16_000, 5, 0.5)
    got = DeviceRunner(pkg).encode_audio(a)
    ref = _reference(split, np.pad(a, (0, N_SAMPLES - a.size)))[: content_frames(a.size)]
    assert float(np.abs(got - ref).max()) <= 1e-3 * float(np.abs(ref).max())
    pcm = np.pad(a, (0, N_SAMPLES - a.size))[None]
    x_onnx = ort.InferenceSession(str(pkg / "device.onnx"), providers=["CPUExecutionProvider"]).run(None, {"audio": pcm})[0]
    x_ort = ort.InferenceSession(str(pkg / "device.ort"), providers=["CPUExecutionProvider"]).run(None, {"audio": pcm})[0]
    assert float(np.abs(x_onnx - x_ort).max()) <= 1e-4 * float(np.abs(x_onnx).max())


def _front_and_rest(a: dict) -> tuple[set, set, set]:
    """(front-end nodes, fallback nodes, taken nodes) of one EP's node_assignment entry."""
    names = a["taken_nodes"] + a["fallback_nodes"]
    return {n for n in names if n.startswith(fe.PREFIX)}, set(a["fallback_nodes"]), set(a["taken_nodes"])


def test_float64_front_end_falls_back_to_cpu(fixed_pkgs):
    """CoreML / NNAPI / XNNPACK run no float64: the 18 log-mel nodes are CPU fallback, one CPU partition
    ahead of the accelerator's; CoreML still takes the whole encoder (1 partition, YES), NNAPI every
    encoder node in its op table; the cost model puts the front end on the CPU too."""
    from semedge.runtime.costmodel import analyze, partition
    from semedge.runtime.profiles import load_profile

    iphone = json.loads((fixed_pkgs("iphone") / "manifest.json").read_text())["node_assignment"]
    front, fallback, taken = _front_and_rest(iphone["CoreML"])
    assert len(front) == 18 and fallback == front and taken and not taken & front
    assert (iphone["CoreML"]["partitions"], iphone["CoreML"]["cpu_partitions"]) == (1, 1)
    assert iphone["CoreML"]["suitability"] == "YES" and "float64" in iphone["CoreML"]["why"]["STFT"]
    assert front <= set(iphone["XNNPACK"]["fallback_nodes"])  # its op table has MatMul, but not in float64
    nnapi = json.loads((fixed_pkgs("android-mid") / "manifest.json").read_text())["node_assignment"]["NNAPI"]
    front, fallback, taken = _front_and_rest(nnapi)
    assert front <= fallback and {"/conv1/Conv", "/conv2/Conv"} <= taken
    rest = {n.rsplit("/", 1)[-1].split("_")[0] for n in fallback - front}  # op of each: "/Erf_1" -> "Erf"
    assert rest == {"Erf", "LayerNormalization"}  # the encoder's only fallback: ops outside NNAPI's table
    assert all("op table" in nnapi["why"][op] for op in ("Erf", "LayerNormalization"))
    parts = partition(analyze(fixed_pkgs("iphone") / "device.onnx"), load_profile("iphone"))
    on = {n.name: ep.name for n, ep in parts}
    assert {ep for n, ep in on.items() if n.startswith(fe.PREFIX)} == {"CPU"}
    assert {ep for n, ep in on.items() if not n.startswith(fe.PREFIX)} == {"CoreML"}
