"""Profiler on real ONNX Runtime sessions (tiny models): latency, RSS in a subprocess, op summary,
bench -> calibrate with the host standing in for the target, measure-host into tmp."""

import json
import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from _tinyonnx import tiny_encoder
from semedge.runtime import costmodel, profiler
from semedge.runtime.profiles import load_profile, profiles_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_encoder(tmp_path_factory.mktemp("pr") / "tiny.onnx", d=128, ffn=512, layers=2)


def test_time_onnx_percentiles(tiny):
    r = profiler.time_onnx(tiny, length=64, threads=1, runs=15, warmup=2)
    assert r["runs"] == 15 and 0 < r["min_ms"] <= r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
    slow = profiler.time_onnx(tiny, length=512, threads=1, runs=5, warmup=1)
    assert slow["p50_ms"] > r["p50_ms"]


def test_op_profile_by_type(tiny):
    ops = profiler.op_profile(tiny, length=128, threads=1, runs=3)
    names = {o["op"] for o in ops}
    assert "MatMul" in names and "Softmax" in names
    assert sum(o["share"] for o in ops) == pytest.approx(1.0, abs=0.02)
    assert ops[0]["ms"] >= ops[-1]["ms"]


def test_peak_rss_subprocess(tiny):
    m = profiler.peak_rss(tiny, [16, 2048], threads=1)
    assert m["baseline_mb"] > 5
    assert m["peak_mb"]["2048"] >= m["peak_mb"]["16"] >= m["baseline_mb"]
    # T=2048: the [1,T,T] fp32 scores alone are 16 MB
    assert m["peak_mb"]["2048"] - m["peak_mb"]["16"] > 10


def test_summarize_ops():
    ev = [{"cat": "Node", "name": "a_kernel_time", "dur": 3000, "args": {"op_name": "MatMul",
                                                                        "provider": "CUDAExecutionProvider"}},
          {"cat": "Node", "name": "b_kernel_time", "dur": 1000, "args": {"op_name": "Add"}},
          {"cat": "Node", "name": "b_fence_before", "dur": 9000, "args": {"op_name": "Add"}},
          {"cat": "Session", "name": "x", "dur": 100000}]
    rows = profiler.summarize_ops(ev)
    assert rows == [{"op": "MatMul", "ms": 3.0, "share": 0.75, "count": 1, "providers": ["CUDAExecutionProvider"]},
                    {"op": "Add", "ms": 1.0, "share": 0.25, "count": 1, "providers": ["?"]}]
    by_ep = profiler.summarize_providers(ev)
    assert by_ep["CUDAExecutionProvider"] == {"n_nodes": 1, "nodes": ["a"], "ms": 3.0, "share": 0.75}


def test_profile_torch_block():
    torch = pytest.importorskip("torch")
    lin = torch.nn.Sequential(torch.nn.Linear(128, 512), torch.nn.ReLU(), torch.nn.Linear(512, 128))
    r = profiler.profile_torch(lin, (torch.randn(64, 128),), threads=1, runs=10, warmup=2)
    assert 0 < r["p50_ms"] <= r["p99_ms"]
    assert any("linear" in o["op"] or "addmm" in o["op"] for o in r["ops"])


def test_bench_then_calibrate_host_as_target(tiny, tmp_path, monkeypatch):
    """`device bench` on the host, then `profiles calibrate` fits the profile to it."""
    from semedge.cli import app

    for n in ("raspberry-pi-5",):
        (tmp_path / f"{n}.yaml").write_text((profiles_dir() / f"{n}.yaml").read_text())
    monkeypatch.setenv("SEMEDGE_PROFILES", str(tmp_path))
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "device.onnx").write_bytes(tiny.read_bytes())
    (pkg / "manifest.json").write_text("{}")
    bench = tmp_path / "bench.json"
    r = CliRunner().invoke(app, ["device", "bench", str(pkg), "--lengths", "32,128,512", "--runs", "5",
                                 "--json", "--out", str(bench)])
    assert r.exit_code == 0, r.output
    data = json.loads(bench.read_text())
    assert [x["length"] for x in data["results"]] == [32, 128, 512]
    assert all(x["peak_rss_mb"] > 0 for x in data["results"])
    prof = load_profile("raspberry-pi-5")
    before = [math.log(costmodel.predict_latency_ms(costmodel.analyze(tiny, x["length"]), prof) / x["p50_ms"])
              for x in data["results"]]
    r = CliRunner().invoke(app, ["profiles", "calibrate", "raspberry-pi-5", str(bench)])
    assert r.exit_code == 0, r.output
    cal = load_profile("raspberry-pi-5")
    assert cal.efficiency.calibrated_on and "bench.json" in cal.efficiency.calibrated_on
    after = [math.log(costmodel.predict_latency_ms(costmodel.analyze(tiny, x["length"]), cal) / x["p50_ms"])
             for x in data["results"]]
    # 3 lengths: one common scale is fitted, which minimises the squared log error
    assert sum(e * e for e in after) < sum(e * e for e in before)
    assert abs(sum(after)) < 1e-2
    assert (tmp_path / "raspberry-pi-5.yaml").read_text().startswith("# Raspberry Pi 5")
    # a GPU-first profile is not fitted from CPU timings: refused (exit 2, file untouched) ...
    jet = tmp_path / "jetson-orin-nano.yaml"
    jet.write_text((Path(__file__).resolve().parent.parent / "device_profiles" / "jetson-orin-nano.yaml").read_text())
    text = jet.read_text()
    r = CliRunner().invoke(app, ["profiles", "calibrate", "jetson-orin-nano", str(bench)])
    assert type(r.exception).__name__ == "UserError" and "cannot fit its gpu roofline" in str(r.exception)
    assert jet.read_text() == text
    # ... unless only its CPU entry (the fallback nodes) is fitted, and said so
    r = CliRunner().invoke(app, ["profiles", "calibrate", "jetson-orin-nano", str(bench), "--unit", "cpu"])
    assert r.exit_code == 0, r.output
    cal = load_profile("jetson-orin-nano")
    assert "cpu only" in cal.efficiency.calibrated_on and not cal.accelerators["gpu"].efficiency.calibrated_on


def test_profile_cmd_host_measured_beside_predicted(tiny):
    from semedge.cli import app

    r = CliRunner().invoke(app, ["profile", str(tiny), "--device", "host", "--lengths", "64", "--runs", "5",
                                 "--json"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.output)["results"][0]
    assert row["predicted_ms"] > 0 and row["measured_ms"] > 0 and row["measured_peak_mb"] > 0
    r = CliRunner().invoke(app, ["profile", str(tiny), "--device", "watch", "--lengths", "64"])
    assert r.exit_code == 0 and "predicted" in r.output and "measured" not in r.output


def test_cli_user_errors(tmp_path):
    from semedge.cli import main

    assert main(["profile", str(tmp_path / "nope.onnx"), "--device", "watch"]) == 2
    assert main(["device", "bench", str(tmp_path)]) == 2  # folder without device.onnx
    assert main(["profile", str(tmp_path / "nope.onnx"), "--device", "no-such"]) == 2


def test_measure_host_to_tmp(tmp_path):
    from semedge.cli import app

    out = tmp_path / "host.yaml"
    r = CliRunner().invoke(app, ["profiles", "measure-host", "--threads", "1", "--seconds", "0.2",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    d = yaml.safe_load(out.read_text())
    assert d["name"] == "host" and d["threads"] == 1 and "CPU" in d["execution_providers"]
    assert d["peak_gflops"]["fp32"] > 1 and d["mem_bandwidth_gbs"] > 0.5
    from semedge.runtime.profiles import validate_file

    assert validate_file(out) == []


# ---------------------------------------------------------------- on-target bench through the console script


def _semedge(*args, cwd=None):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "semedge"
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="120")
    return subprocess.run([str(script), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def test_bench_ep_cpu_with_op_profile_and_node_assignment(tiny, tmp_path):
    out = tmp_path / "bench.json"
    r = _semedge("device", "bench", str(tiny), "--ep", "cpu", "--lengths", "32", "--runs", "3", "--warmup", "1",
                 "--profile-ops", "--json", "--out", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["providers"][0] == "CPUExecutionProvider" and res["results"][0]["p50_ms"] > 0
    assign = res["node_assignment"]
    assert list(assign) == ["CPUExecutionProvider"] and assign["CPUExecutionProvider"]["n_nodes"] > 0
    ops = {o["op"]: o for o in res["ops"]}
    assert "Softmax" in ops and ops["Softmax"]["providers"] == ["CPUExecutionProvider"]
    assert sum(o["share"] for o in res["ops"]) == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("args, words", [
    (["--ep", "tensorrt"], ["TensorrtExecutionProvider", "not available", "CPUExecutionProvider"]),
    (["--ep", "cuda", "--ep-option", "device_id=0"], ["CUDAExecutionProvider", "not available"]),
    (["--ep", "gpu"], ["--ep 'gpu'", "tensorrt"]),
    (["--ep", "cpu", "--ep-option", "fp16=1"], ["fp16", "not an option of CPU"]),
    (["--ep", "xnnpack", "--ep-option", "threads"], ["KEY=VALUE"]),
    (["--ep-option", "trt_fp16_enable=1"], ["needs --ep"]),
])
def test_bench_ep_errors_are_one_line_exit_2(tiny, tmp_path, args, words):
    """An EP this onnxruntime build lacks is an error naming the ones it has, not a silent CPU run."""
    r = _semedge("device", "bench", str(tiny), *args, "--out", str(tmp_path / "b.json"), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert not (tmp_path / "b.json").exists()


def test_bench_profile_without_its_ep_says_so(tiny):
    """A profile's EPs this build lacks: its list's fallback runs, and a note says which."""
    r = _semedge("device", "bench", str(tiny), "--profile", "jetson-orin-nano", "--threads", "1",
                 "--lengths", "16", "--runs", "2", "--warmup", "0", "--json")
    assert r.returncode == 0, r.stderr
    assert "TensorrtExecutionProvider" in r.stderr and "not in this onnxruntime build" in r.stderr
    assert json.loads(r.stdout)["providers"][0] == "CPUExecutionProvider"
