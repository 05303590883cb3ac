"""Students in the planner (compress/students.py): a codec whose device half runs a smaller model's
encoder enters the candidate space x every precision, is costed on its own graph, evaluated through the
link with intervals, and packaged with its own codec and adapters. Tiny random Whisper models."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from semedge.compress.candidates import QUICK_PRECISIONS, candidate_space
from semedge.compress.plan import Plan
from semedge.compress.planner import plan_devices
from semedge.core.errors import UserError
from semedge.runtime.profiles import DeviceProfile
from semedge.semcom.models import tiny_model

warnings.filterwarnings("ignore")

TEACHER = "tiny:whisper:0"  # the server model (d_model 64)
STUDENT = "tiny:whisper:7:32"  # the device's smaller encoder (d_model 32)


def _profile(name: str, memory_mb: float) -> dict:
    # runtime, session and arena terms off: predicted memory is the weights (as in test_planner)
    return {"name": name, "device_class": "phone", "memory_budget_mb": memory_mb,
            "peak_gflops": {"fp32": 50.0, "fp16": 100.0, "int8": 200.0}, "mem_bandwidth_gbs": 10.0,
            "cores": 4, "threads": 2, "execution_providers": ["CPU"], "latency_budget_ms": 5000,
            "link": {"uplink_mbps": 10, "snr_db": [5, 15], "channel": "awgn"},
            "efficiency": {"runtime_mb": 0.0, "session_mb": 0.0, "arena_factor": 0.0, "weights_factor": 1.0},
            "sources": ["synthetic test profile"]}


def _save_codec(path: Path, teacher, d_in: int, device_encoder: dict | None, adapters: bool) -> Path:
    """A real codec folder (untrained weights): a student when `device_encoder` is given."""
    from semedge.semcom.checkpoint import save_checkpoint
    from semedge.semcom.jsc import JSCCodec, JSCConfig
    from semedge.semcom.training.adapters import adapter_state, prepare_model
    from semedge.semcom.training.config import LoRASpec

    torch.manual_seed(1)
    codec = JSCCodec(JSCConfig(d_model=teacher.d_model, k=8, hidden=64, d_in=d_in))
    info, state = {}, None
    if device_encoder:
        info["device_encoder"] = device_encoder
    if adapters:
        spec = LoRASpec(r=2)
        model = prepare_model(teacher, spec, False)
        state = {k: torch.randn_like(v) * 0.05 for k, v in adapter_state(model).items()}  # non-zero: they change decoding
        info["lora"] = dataclasses.asdict(spec)
    return save_checkpoint(path, teacher, codec, adapters=state, info=info)


@pytest.fixture(scope="module")
def models():
    return tiny_model("whisper", seed=0), tiny_model("whisper", seed=7, d_model=32)


@pytest.fixture(scope="module")
def student(models, tmp_path_factory) -> Path:
    teacher, small = models
    de = {"source": small.source, "weight_hash": small.weight_hash, "d_model": small.d_model}
    return _save_codec(tmp_path_factory.mktemp("students") / "tiny-student", teacher, 32, de, adapters=True)


@pytest.fixture(scope="module")
def not_student(models, tmp_path_factory) -> Path:
    return _save_codec(tmp_path_factory.mktemp("codecs") / "plain", models[0], None, None, adapters=False)


def test_candidate_space_holds_each_student_at_every_precision(models, student):
    teacher, _ = models
    base = candidate_space(teacher, quick=True)
    space = candidate_space(teacher, quick=True, students=[student])
    assert [p.hash() for p in space[:len(base)]] == [p.hash() for p in base]
    added = space[len(base):]
    assert [p.name for p in added] == [f"tiny-student.{q}" for q in QUICK_PRECISIONS]
    for p in added:
        first = p.steps[0]
        assert first.op == "student" and Path(first.config.codec) == student.resolve()
        assert first.config.encoder == STUDENT and len(first.config.sha256) == 64
        assert Plan.from_json(p.to_json()).hash() == p.hash()  # plain data: JSON in and out
    assert len({p.hash() for p in space}) == len(space)
    # the same folder given twice (or a shipped one given again) is one student
    assert len(candidate_space(teacher, quick=True, students=[student, student])) == len(space)


def test_shipped_tinyen_student_is_in_whisper_base_default_space():
    """Matched by the weight hash in its manifest, without loading whisper-base."""
    from semedge.compress.students import assets_dir

    man = json.loads((assets_dir() / "whisper-base-tinyen-jsc" / "manifest.json").read_text())
    base = SimpleNamespace(weight_hash=man["model"]["weight_hash"], source="whisper-base",
                           model=SimpleNamespace(config=SimpleNamespace(encoder_layers=6)))
    names = {p.name: p for p in candidate_space(base, quick=True)}
    for q in QUICK_PRECISIONS:
        step = names[f"whisper-base-tinyen-jsc.{q}"].steps[0]
        assert step.config.codec == "whisper-base-tinyen-jsc"  # a shipped codec by its folder name: portable plans
        assert step.config.sha256 == man["files"]["codec.safetensors"]
    assert sum(p.name.startswith("whisper-base-tinyen-jsc.") for p in candidate_space(base)) == 8  # full: 8 precisions


def test_plan_rules_and_weights_check(student, models):
    step = {"op": "student", "config": {"codec": str(student), "sha256": "0" * 64}}
    quant = {"op": "quantize_onnx", "config": {"mode": "int8_dynamic"}}
    with pytest.raises(UserError, match="first"):
        Plan.make([{"op": "prune", "config": {"heads": 0.5}}, step])
    with pytest.raises(UserError, match="distill"):
        Plan.make([step, {"op": "distill", "config": {"layers": 1}}])
    with pytest.raises(UserError, match="sha256"):
        Plan.make([{"op": "student", "config": {"codec": str(student), "sha256": "abc"}}])
    from semedge.compress.plan import apply_torch_steps
    from semedge.semcom.split import build_split

    with pytest.raises(UserError, match="other weights"):  # the plan names weights the folder does not hold
        apply_torch_steps(build_split(models[0]), Plan.make([step, quant]))


@pytest.fixture(scope="module")
def planned(models, student, tmp_path_factory):
    """The planner on two dense base plans + the student's 5; every fitting candidate evaluated in full."""
    teacher, _ = models
    work = tmp_path_factory.mktemp("plan")
    base = [p for p in candidate_space(teacher, quick=True) if p.name in ("dense.fp32", "dense.int8")]
    prof = DeviceProfile.model_validate(_profile("phone", 4096))
    res = plan_devices(teacher, [prof], candidates=base, students=[student], n_cheap=2, n_full=3,
                       workdir=work / "cache", out=work / "plans.json", progress=False, realise=False,
                       full_share=1.0, shortlist=8, quick=True)
    return res, work


def test_planner_costs_and_evaluates_students_like_other_candidates(planned, student):
    res, _ = planned
    cands = res["candidates"]
    studs = {c: v for c, v in cands.items() if c.startswith("tiny-student.")}
    assert len(studs) == len([q for q in QUICK_PRECISIONS if q in ("fp32", "int8", "int4-b32", "int4-mixed")])  # a CPU device: no fp16, no QDQ
    for cid, c in studs.items():
        assert c["codec"]["checkpoint"] == str(student.resolve()) and c["k"] == 8
        assert c["codec"]["device_encoder"] == STUDENT and c["describe"].startswith(f"student({STUDENT})")
        acc = c["accuracy_by_channel"]["awgn@5"]
        assert acc["level"] == "full" and acc["n"] == 3 and acc["wer_ci95"] is not None
        assert c["predicted"]["phone"]["latency_ms"] > 0
    # costed on its own, smaller encoder graph: the 32-wide student is lighter than the 64-wide base
    assert studs["tiny-student.fp32"]["bytes"] < cands["dense.fp32"]["bytes"]
    assert (studs["tiny-student.fp32"]["predicted"]["phone"]["latency_ms"]
            < cands["dense.fp32"]["predicted"]["phone"]["latency_ms"])
    assert cands["dense.fp32"]["codec"] is None
    info = res["devices"]["phone"]
    assert info["fits"] and set(info["vs_best_by_plan"]) >= set(studs)  # in the same tie test as the rest


def test_student_budget_choice(planned, models, student):
    """A memory budget only the students meet: the planner picks one, on measured WER with its interval."""
    res, work = planned
    teacher, _ = models
    c = res["candidates"]
    smallest_base = min(v["predicted"]["phone"]["memory_mb"] for k, v in c.items() if k.startswith("dense."))
    smallest_student = min(v["predicted"]["phone"]["memory_mb"] for k, v in c.items() if k.startswith("tiny-student."))
    assert smallest_student < smallest_base
    base = [p for p in candidate_space(teacher, quick=True) if p.name in ("dense.fp32", "dense.int8")]
    tight = DeviceProfile.model_validate(_profile("tight", (smallest_student + smallest_base) / 2))
    out = plan_devices(teacher, [tight], candidates=base, students=[student], n_cheap=2, n_full=3,
                       workdir=work / "cache", progress=False, realise=False, full_share=1.0, shortlist=8, quick=True)
    info = out["devices"]["tight"]
    assert info["fits"] and info["chosen"].startswith("tiny-student.")
    assert info["wer_ci95"]["ci95"][0] <= info["wer"] <= info["wer_ci95"]["ci95"][1] + 1e-9
    assert all("memory" in info["rejected"][k] for k in ("dense.fp32", "dense.int8"))


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_student_plan_packages_and_runs_on_ort_with_parity(planned, student, models, precision, tmp_path):
    """The build's package stage (semedge/stages.py) on a student plan: the student's encoder and codec
    in device.onnx, its codec folder's adapters on the server side, ORT output = PyTorch's."""
    from semedge.build_workspace import Workspace
    from semedge.runtime.package import Package
    from semedge.runtime.runner import DeviceRunner
    from semedge.stages import _package_one

    res, _ = planned
    cid = f"tiny-student.{precision}"
    ws = Workspace(TEACHER, "identity", {"n_eval": 2}, tmp_path, progress=False)
    prof = DeviceProfile.model_validate(_profile("phone", 4096))
    rec = _package_one(ws, "phone", prof, cid, res["candidates"][cid])
    man = json.loads((tmp_path / rec["path"] / "manifest.json").read_text())
    assert man["device_encoder"]["source"] == STUDENT and man["model"]["source"] == TEACHER
    assert man["jsc"]["checkpoint"] == str(student.resolve()) and man["jsc"]["k"] == 8
    assert (tmp_path / rec["path"] / "server" / "adapters.safetensors").is_file()
    assert man["plan"]["steps"][0]["op"] == "student"
    sp, _ = ws.realise(res["candidates"][cid]["plan"])
    runner = DeviceRunner(tmp_path / rec["path"], threads=1)
    x = np.random.default_rng(0).standard_normal((1, 80, 3000)).astype(np.float32) * 0.5
    got = runner.session.run(None, {runner.input_names[0]: x})[0]
    with torch.no_grad():
        ref = sp.device(torch.from_numpy(x)).numpy()
    assert got.shape == ref.shape == (1, 1500, 8)
    cos = float((got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref))
    if precision == "fp32":
        assert np.abs(got - ref).max() < 1e-3 and cos > 0.9999
    else:
        # int8 with int8 conv/positions and JSC on random tiny weights reads cosine 0.935: integer plans are
        # judged on WER through the link, their parity recorded, not enforced (compress/targets.py)
        assert cos > 0.9


# ---------------------------------------------------------------- bad input through the real entry point


def _semedge(*args, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "semedge"
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", ["missing", "empty", "not-a-student"])
def test_bad_student_exits_2_one_line_nothing_written(case, not_student, tmp_path):
    pdir = tmp_path / "profiles"
    pdir.mkdir()
    (pdir / "phone.yaml").write_text(yaml.safe_dump(_profile("phone", 4096)))
    bad = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "not-a-student": not_student}[case]
    if case == "empty":
        bad.mkdir()
    out = tmp_path / "out"
    r = _semedge("plan", "--model", TEACHER, "--profiles", str(pdir), "--out", str(out / "plans.json"),
                 "--student", str(bad), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--student" in lines[0] and str(bad) in lines[0] and "fix" in lines[0], r.stderr
    assert ("no device_encoder" in lines[0]) == (case == "not-a-student")
    assert not out.exists()
