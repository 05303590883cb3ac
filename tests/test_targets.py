"""Execution-provider-aware packages (compress/targets.py): one package kind per target class, each
run by ORT's CPU EP here, on a tiny random-init Whisper; bad input through the `semedge` script."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from semedge.compress.targets import build_target_package, package_kind
from semedge.core.errors import UserError
from semedge.runtime.package import Package
from semedge.runtime.profiles import load_profile
from semedge.runtime.runner import DeviceRunner

SCRIPT = Path(sys.executable).parent / "semedge"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", COLUMNS="100")


@pytest.fixture(scope="module")
def split():
    import torch

    from semedge.semcom.jsc import JSCCodec, JSCConfig
    from semedge.semcom.models import tiny_model
    from semedge.semcom.split import build_split

    loaded = tiny_model("whisper")
    torch.manual_seed(1)
    return build_split(loaded, JSCCodec(JSCConfig(d_model=64, k=16, hidden=64)))


@pytest.fixture(scope="module")
def feats(split):
    """Log-mel [6, 80, 3000] of tones: 4 calibrate the QDQ graph, 2 are held out for parity."""
    return split.task.calibration_inputs(split.loaded, 6)["input_features"]


@pytest.fixture(scope="module")
def packages(split, feats, tmp_path_factory):
    """(device, format) -> package folder, built on first use."""
    root, built = tmp_path_factory.mktemp("targets"), {}

    def get(device: str, fmt: str | None = None) -> Path:
        if (device, fmt) not in built:
            kind = dataclasses.replace(package_kind(load_profile(device), fmt), fused=False)  # no fused-vs-plain timing
            built[device, fmt] = build_target_package(split, load_profile(device), kind, root / f"{device}-{fmt}",
                                                      calib=list(feats[:4]), calib_source="tones (test)")
        return built[device, fmt]

    return get


def _run(path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input_features": x})[0]


def _cos(a, b) -> float:
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("device, fmt, kind", [
    ("jetson-orin-nano", "fp16", (False, False, None)), ("edge-server", "fp16", (False, False, None)),
    ("iphone", "fp16", (False, True, "Runtime")), ("android-mid", "qdq_a8w8", (False, True, "Runtime")),
    ("android-flagship", "qdq_a16w8", (False, True, "Runtime")), ("raspberry-pi-5", "int8_dynamic", (True, False, None)),
    ("watch", "int8_dynamic", (True, False, "Fixed")), ("host", "int8_dynamic", (True, False, None)),
])
def test_kind_per_target_class(device, fmt, kind):
    """The first EP picks the format; accelerators get unfused graphs, NPUs fixed shapes, phones .ort."""
    k = package_kind(load_profile(device))
    assert (k.format, (k.fused, k.fixed_shapes, k.ort_style)) == (fmt, kind)


def test_bad_format_and_opset_are_user_errors():
    with pytest.raises(UserError, match="NNAPI, the first EP of android-mid, does not run fp16"):
        package_kind(load_profile("android-mid"), "fp16")
    with pytest.raises(UserError, match="opset 16 is too low for fp16"):
        package_kind(load_profile("jetson-orin-nano"), opset=16)
    assert package_kind(load_profile("raspberry-pi-5"), "int4").format == "int4"


@pytest.mark.parametrize("device, fmt, ops, precision", [
    ("jetson-orin-nano", None, set(), "fp16"),
    ("raspberry-pi-5", None, {"MatMulInteger"}, "int8"),
    ("raspberry-pi-5", "int4", {"MatMulNBits"}, "int4"),
])
def test_package_runs_on_cpu(packages, split, feats, device, fmt, ops, precision):
    """Each kind loads (hashes checked), runs in the device runner, and is close to PyTorch."""
    pkg = Package.load(packages(device, fmt))
    man = pkg.manifest
    graph = onnx.load(str(pkg.onnx_path))
    assert man["onnx"]["precision"] == precision and man["onnx"]["parity"]["ok"]
    assert ops <= {n.op_type for n in graph.graph.node}
    if precision == "fp16":
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.graph.initializer)
        assert not any(n.domain == "com.microsoft" for n in graph.graph.node)  # TensorRT takes no contrib op
    sym = DeviceRunner(pkg).encode_audio(np.zeros(16000, np.float32) + 0.01)
    assert sym.shape[1] == 16 and np.isfinite(sym).all()
    assert set(man["node_assignment"]) == set(load_profile(device).ep_names)


def test_qdq_package_static_shapes_parity_and_ort(packages, split, feats):
    """NNAPI target: fixed [1, 80, 3000], static QDQ; parity vs the fp32 graph on held-out inputs:
    cosine >= 0.999 and max |diff| <= 5% of the output scale; the .ort model gives the same."""
    pkg = Package.load(packages("android-mid"))
    man = pkg.manifest
    assert man["onnx"]["inputs"][0]["shape"] == [1, 80, 3000] and man["target"]["fixed_shapes"]
    assert man["target"]["calibration"] == {"inputs": 4, "source": "tones (test)"}
    graph = onnx.load(str(pkg.onnx_path))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.graph.node}
    # mixed A8W8: 8-bit activations only where they hold; the outlier paths and the first layer stay fp32
    made_by = {o: n.op_type for n in graph.graph.node for o in n.output}
    quantized = {n.name for n in graph.graph.node if made_by.get(n.input[0]) == "DequantizeLinear"}
    assert "/layers.1/self_attn/k_proj/MatMul" in quantized
    assert not {q for q in quantized if "/layers.0/" in q or "self_attn/MatMul" in q or "/fc2/" in q
                or q.startswith(("/conv", "/jsc"))}
    fp32 = packages("android-mid", "fp32").joinpath("device.onnx")
    for x in feats[4:]:
        ref, got = _run(fp32, x[None]), _run(pkg.onnx_path, x[None])
        assert _cos(ref, got) >= 0.999 and np.abs(ref - got).max() <= 0.05 * np.abs(ref).max()
        ort_out = _run(pkg.file(man["target"]["ort_format"]["file"]), x[None])
        assert _cos(ref, ort_out) >= 0.999
    assert pkg.file("required_operators.config").read_text().count("QuantizeLinear") >= 1


def test_cost_model_resolves_qdq_and_fp16_graphs_as_an_accelerator_runs_them(packages):
    """A16W8 (opset 21, ORT's com.microsoft Q/DQ after folding) resolves; as written, 8-bit QDQ MatMuls are
    int8 with 8-bit weights, 16-bit ones run at the unit's fp16 peak, and fp16 stays fp16."""
    from semedge.runtime import costmodel

    nnapi = costmodel.analyze(Package.load(packages("android-mid")).onnx_path, as_written=True)
    assert not nnapi.unresolved and not nnapi.dynamic
    k_proj = next(n for n in nnapi.nodes if n.name == "/layers.1/self_attn/k_proj/MatMul")
    assert (k_proj.cls, k_proj.qdq_bits) == ("matmul_int8", 8) and k_proj.weight_bytes == 64 * 64  # int8 weights
    a16 = Package.load(packages("android-flagship")).onnx_path
    for as_written in (False, True):
        assert not costmodel.analyze(a16, as_written=as_written).unresolved
    mm = [n for n in costmodel.analyze(a16, as_written=True).nodes if n.qdq_bits == 16]
    assert mm and {costmodel.unit_class(n, "npu") for n in mm} == {"matmul_fp16"}
    assert {costmodel.unit_class(n, "cpu") for n in mm} <= {"matmul_fp32", "attention", "conv"}
    fp16 = costmodel.analyze(Package.load(packages("jetson-orin-nano")).onnx_path, as_written=True)
    assert "matmul_fp16" in {n.cls for n in fp16.nodes}  # ORT's CPU EP would cast these to fp32 (fold, not as written)
    assert "matmul_fp16" not in {n.cls for n in costmodel.analyze(Package.load(packages("jetson-orin-nano")).onnx_path).nodes}


@pytest.mark.parametrize("device, precision, style", [("iphone", "fp16", "Runtime"), ("watch", "int8", "Fixed")])
def test_ort_mobile_packages_carry_a_runnable_ort_model(packages, feats, device, precision, style):
    """CoreML (fp16, fixed shapes) and XNNPACK watch (int8) packages: the .ort model runs like device.onnx."""
    pkg = Package.load(packages(device))
    rec = pkg.manifest["target"]["ort_format"]
    assert rec["optimization_style"] == style and pkg.manifest["onnx"]["precision"] == precision
    x = feats[5][None]
    onnx_out, ort_out = _run(pkg.onnx_path, x), _run(pkg.file(rec["file"]), x)
    assert _cos(onnx_out, ort_out) >= 0.999
    assert "ai.onnx" in pkg.file(rec["operators_config"]).read_text()


def test_node_assignment_per_ep(packages):
    """NNAPI from ORT's usability checker, QNN and XNNPACK from the stated tables, CPU from a session."""
    nnapi = Package.load(packages("android-mid")).manifest["node_assignment"]
    assert [nnapi[e]["method"] for e in ("NNAPI", "XNNPACK", "CPU")] == ["mobile_usability_checker", "op_table", "session"]
    a = nnapi["NNAPI"]
    assert a["taken"] > a["fallback"] > 0 and a["taken"] + a["fallback"] == a["nodes"]
    assert len(a["fallback_nodes"]) == a["fallback"] and "nnapi_supported_ops.md" in a["source"]
    assert all(reason for reason in a["why"].values()) and nnapi["CPU"]["fallback"] == 0
    trt = Package.load(packages("jetson-orin-nano")).manifest["node_assignment"]["TensorRT"]
    assert trt["method"] == "op_table" and "onnx-tensorrt" in trt["source"] and trt["fallback"] == 0
    pi = Package.load(packages("raspberry-pi-5")).manifest["node_assignment"]["XNNPACK"]
    assert "MatMulInteger" in pi["fallback_ops"]  # XNNPACK has no integer matmul: those nodes go to CPU


def test_parity_limits_fail_float_and_record_integer(split, tmp_path, monkeypatch):
    """Out of the format's limits: fp16 raises ExportParityError (exit 4); int8 is written with ok false."""
    from semedge.compress import targets
    from semedge.export.onnx import ExportParityError

    monkeypatch.setitem(targets.TOLERANCE, "fp16", (0.0, 1.0))
    monkeypatch.setitem(targets.TOLERANCE, "int8_dynamic", (0.0, 1.0))
    fp16 = dataclasses.replace(package_kind(load_profile("jetson-orin-nano")), fused=False)
    with pytest.raises(ExportParityError, match="fp16 package"):
        targets.build_target_graph(split, fp16, tmp_path)
    int8 = dataclasses.replace(package_kind(load_profile("host")), fused=False)
    assert targets.build_target_graph(split, int8, tmp_path).parity.ok is False
    # a plan's fp16 step is judged by fp16's limits too (`semedge build` packages planned fp16 this way)
    from semedge.compress.plan import Plan

    plan = Plan.make([{"op": "quantize_onnx", "config": {"mode": "fp16"}}], "fp16")
    planned = package_kind(load_profile("jetson-orin-nano"), plan=plan)
    with pytest.raises(ExportParityError, match="fp16 package"):
        targets.build_target_graph(split, planned, tmp_path, plan=plan)
    monkeypatch.setitem(targets.TOLERANCE, "fp16", (0.05, 0.9999))
    assert targets.build_target_graph(split, planned, tmp_path, plan=plan).parity.ok


def run_cli(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=120)


@pytest.mark.parametrize("args, words", [
    (["--device", "android-mid", "--format", "fp16"], ["NNAPI", "fp16", "--format qdq_a8w8"]),
    (["--device", "jetson-orin-nano", "--opset", "16"], ["opset 16", "--opset 17"]),
    (["--device", "host", "--format", "int3"], ["int3", "int8_dynamic"]),
])
def test_cli_bad_target_is_one_line_exit_2_nothing_written(tmp_path, args, words):
    r = run_cli("export", "--model", "tiny:whisper:0", *args, "--out", str(tmp_path / "pkg"), cwd=tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr and all(w in lines[0] for w in words), lines[0]
    assert list(tmp_path.iterdir()) == []
