"""The planner per execution provider, on a tiny random Whisper: each device is offered only the formats
its first EP runs (runtime.partition.formats_for), accelerators are costed on the plain graph as written
(fp16 kept, QDQ at int8, fixed shapes where the EP needs them), and a device whose EP runs none of the
candidates fails as "format" with exit 3 through the `semedge` script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from semedge.compress.candidates import PRECISIONS
from semedge.compress.plan import Plan
from semedge.compress.planner import plan_devices
from semedge.core.errors import UserError
from semedge.runtime.profiles import DeviceProfile
from semedge.semcom.models import tiny_model

warnings.filterwarnings("ignore")
SCRIPT = Path(sys.executable).parent / "semedge"


def _profile(name: str, eps: list, accelerators: dict | None = None, memory_mb: float = 4096) -> dict:
    return {"name": name, "device_class": "phone", "memory_budget_mb": memory_mb,
            "peak_gflops": {"fp32": 50.0, "fp16": 100.0, "int8": 200.0}, "mem_bandwidth_gbs": 10.0,
            "cores": 4, "threads": 2, "execution_providers": eps, "latency_budget_ms": 5000,
            "accelerators": accelerators or {}, "link": {"uplink_mbps": 10, "snr_db": [5, 15], "channel": "awgn"},
            "efficiency": {"runtime_mb": 0.0, "session_mb": 0.0, "arena_factor": 0.0, "weights_factor": 1.0},
            "sources": ["synthetic test profile"]}


NPU = {"npu": {"fp32": 500.0, "fp16": 1000.0, "int8": 4000.0}}
GPU = {"gpu": {"fp32": 1000.0, "fp16": 8000.0, "int8": 16000.0}}
PROFILES = {"cpu": _profile("cpu", ["CPU"]),
            "nnapi": _profile("nnapi", [{"name": "NNAPI"}, "CPU"], NPU),
            "trt": _profile("trt", [{"name": "TensorRT"}, {"name": "CUDA"}, "CPU"], GPU)}
PLANS = [Plan.make([{"op": "quantize_onnx", "config": PRECISIONS[q]}] if PRECISIONS[q] else [], f"dense.{q}")
         for q in ("fp32", "fp16", "int8", "qdq-a8w8")]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    work = tmp_path_factory.mktemp("planner-targets")
    profs = [DeviceProfile.model_validate(p) for p in PROFILES.values()]
    res = plan_devices(tiny_model("whisper", seed=0), profs, candidates=PLANS, n_cheap=2, n_full=2,
                       workdir=work / "cache", out=work / "plans.json", progress=False, realise=False, full_share=1.0)
    return res, work


def test_each_device_gets_only_what_its_first_ep_runs(planned):
    res, _ = planned
    offered = {d: {c for c, v in res["candidates"].items() if d in v["predicted"]} for d in PROFILES}
    assert offered == {"cpu": {"dense.fp32", "dense.int8"}, "nnapi": {"dense.fp32", "dense.qdq-a8w8"},
                       "trt": {"dense.fp32", "dense.fp16", "dense.qdq-a8w8"}}  # TensorRT builds QDQ graphs too
    for d, info in res["devices"].items():
        assert info["fits"] and info["chosen"] in offered[d]
    assert {d: i["ep"] for d, i in res["devices"].items()} == {"cpu": "CPU", "nnapi": "NNAPI", "trt": "TensorRT"}
    assert "format int8_dynamic: NNAPI runs qdq_a8w8, fp32" in res["devices"]["nnapi"]["rejected"]["dense.int8"]
    # 2 utterances: every plan ties, and the tie goes to the format the first EP prefers (formats_for order)
    assert all(not v["worse"] for i in res["devices"].values() for v in i["vs_best_by_plan"].values())
    assert {d: i["chosen"] for d, i in res["devices"].items()} == {
        "cpu": "dense.fp32", "nnapi": "dense.qdq-a8w8", "trt": "dense.fp16"}


def test_accelerators_are_costed_on_the_plain_graph_as_written(planned):
    res, _ = planned
    c = res["candidates"]
    # the unfused graph with fixed shapes: NNAPI takes every node of the QDQ graph, TensorRT every node of fp16
    assert c["dense.qdq-a8w8"]["predicted"]["nnapi"]["ep_flop_share"] > 0.99
    assert c["dense.fp16"]["predicted"]["trt"]["ep_flop_share"] > 0.99
    # fp16 on the GPU's fp16 peak (8x its fp32 here): faster than fp32, which ORT's CPU EP would cast to
    assert c["dense.fp16"]["predicted"]["trt"]["latency_ms"] < c["dense.fp32"]["predicted"]["trt"]["latency_ms"]
    # QDQ A8W8 on the NPU's int8 peak, its weights at 8 bits: faster and smaller than fp32 there
    q, f = c["dense.qdq-a8w8"]["predicted"]["nnapi"], c["dense.fp32"]["predicted"]["nnapi"]
    assert q["latency_ms"] < f["latency_ms"] and q["weights_mb"] < f["weights_mb"]
    assert c["dense.qdq-a8w8"]["plain"] and c["dense.fp16"]["plain"] and not c["dense.int8"]["plain"]


def test_no_candidate_in_a_runnable_format_exits_3_naming_the_formats(planned, tmp_path):
    _, work = planned
    prof = tmp_path / "profiles"
    prof.mkdir()
    (prof / "nnapi.yaml").write_text(yaml.safe_dump(_profile("nnapi", [{"name": "NNAPI"}], NPU)))  # no CPU EP to fall back to
    plans = tmp_path / "cands.json"
    plans.write_text(json.dumps([p.to_dict() for p in PLANS if p.name == "dense.int8"]))
    out = tmp_path / "plans.json"
    r = subprocess.run([str(SCRIPT), "plan", "--model", "tiny:whisper:0", "--profiles", str(prof), "--candidates",
                        str(plans), "--out", str(out), "--workdir", str(work / "cache"), "--n-cheap", "2",
                        "--n-full", "2", "--no-realise"], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", COLUMNS="200"))
    assert r.returncode == 3, r.stderr[-2000:]
    assert "nnapi: no candidate is in a format NNAPI runs (qdq_a8w8, fp32)" in r.stderr
    assert json.loads(out.read_text())["devices"]["nnapi"]["failing_budget"] == "format"


def test_fallback_to_the_first_cpu_ep_when_the_accelerator_runs_nothing_that_fits(planned):
    """An NNAPI phone whose memory budget only an int8 plan meets is planned for XNNPACK, the next EP
    in its profile (recorded as a fallback); `semedge build` then checks and packages it for XNNPACK."""
    from semedge.stages import check_plans, planned_profile

    res, work = planned
    c = res["candidates"]
    int8 = c["dense.int8"]["predicted"]["cpu"]["memory_mb"]
    nnapi_min = min(c[k]["predicted"]["nnapi"]["memory_mb"] for k in ("dense.fp32", "dense.qdq-a8w8"))
    assert int8 < nnapi_min
    small = _profile("small", [{"name": "NNAPI"}, {"name": "XNNPACK"}, "CPU"], NPU, memory_mb=(int8 + nnapi_min) / 2)
    prof = DeviceProfile.model_validate(small)
    out = plan_devices(tiny_model("whisper", seed=0), [prof], candidates=PLANS, n_cheap=2, n_full=2,
                       workdir=work / "cache", progress=False, realise=False, full_share=1.0)
    info = out["devices"]["small"]
    assert set(out["devices"]) == {"small"} and info["fits"] and info["chosen"] == "dense.int8"
    assert info["ep"] == "XNNPACK" and info["fallback"]["from_ep"] == "NNAPI"
    assert "NNAPI (first EP) runs no plan that fits (memory budget" in info["fallback"]["reason"]
    check_plans(out, {"small": prof})  # the int8 plan is checked against XNNPACK, the EP it was planned for
    assert planned_profile(prof, info).first_ep.name == "XNNPACK"
    del info["fallback"]
    with pytest.raises(UserError, match="a int8_dynamic plan, which NNAPI .its first EP. does not run"):
        check_plans(out, {"small": prof})
