"""`semedge plan` / `semedge build` with --task text|image (issue 16 item 4): the task planner's
candidates, cost model, accuracy and choice; packages a real server hosts; the report's task
section; bad --task / --model through the installed `semedge` script (exit 2, one line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from semedge.compress.plan import Plan
from semedge.core.errors import UserError

SCRIPT = Path(sys.executable).parent / "semedge"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", COLUMNS="100")
PROFILES = ("android-mid", "jetson-agx-orin")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _plans(*names):
    from semedge.compress.candidates import PRECISIONS

    return [Plan.make([{"op": "quantize_onnx", "config": PRECISIONS[n]}] if PRECISIONS[n] else [], n) for n in names]


def _profiles(tmp_path, **budgets):
    """The shipped android-mid and jetson profiles copied into a folder (budgets overridden per file)."""
    import yaml

    from semedge.runtime.profiles import profiles_dir

    d = tmp_path / "profiles"
    d.mkdir(exist_ok=True)
    for name in PROFILES:
        doc = yaml.safe_load((profiles_dir() / f"{name}.yaml").read_text())
        doc.update(budgets.get(name.replace("-", "_"), {}))
        (d / f"{name}.yaml").write_text(yaml.safe_dump(doc))
    return d


# ---------------------------------------------------------------- bad input, through the script


@pytest.mark.parametrize("cmd, args, words", [
    ("plan", ["--task", "video"], ["--task", "unknown", "speech", "image"]),
    ("build", ["--task", "image", "--model", "whisper-base"], ["--task image", "--model whisper-base", "speech model", "drop --model"]),
    ("plan", ["--task", "text", "--model", "whisper-base"], ["--task text", "speech model", "text seq2seq"]),
    ("build", ["--task", "text"], ["--task text needs --model"]),
    ("build", ["--task", "speech,image"], ["one task per run", "--task speech, then --task image"]),
    ("plan", ["--task", "image", "--data", "nowhere"], ["--data", "--task speech only"]),
])
def test_bad_task_or_model_exits_2_with_one_line(tmp_path, cmd, args, words):
    out = tmp_path / "out"
    r = subprocess.run([str(SCRIPT), cmd, *args, "--out", str(out / "plans.json" if cmd == "plan" else out)],
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "fix:" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]
    assert not out.exists()  # nothing written


def test_task_and_model_checks():
    from semedge.compress.task_subjects import check_task_model, parse_task

    with pytest.raises(UserError, match="--task speech: --model tiny:bart:0 is a text model"):
        check_task_model("speech", "tiny:bart:0")

    assert parse_task(None) == "speech" and parse_task(" image ") == "image"
    assert check_task_model("speech", None) == "whisper-base"
    assert check_task_model("image", None) is None  # the shipped codec
    assert check_task_model("text", "tiny:t5:1") == "tiny:t5:1"
    from semedge.semcom.tasks.image import DEFAULT_CODEC

    assert check_task_model("image", str(DEFAULT_CODEC)) == str(DEFAULT_CODEC)
    with pytest.raises(UserError, match="image codec"):
        check_task_model("text", str(DEFAULT_CODEC))


# ---------------------------------------------------------------- the choice


def _cand(cid, nbytes, lat, values):
    from semedge.compress.candidates import Cand

    c = Cand(cid, Plan.make([], cid), bytes=nbytes)
    c.predicted["dev"] = {"latency_ms": lat, "memory_mb": 10.0}
    c.accuracy["awgn@5"] = {"psnr": float(np.mean(values)), "per_example": list(values)}
    return c


def test_choice_ties_go_to_the_least_compressed_and_worse_plans_lose():
    from semedge.compress.task_plan import choose
    from semedge.compress.task_subjects import Subject

    subj = Subject("image", "x", "h", 16, Path("."), "psnr", ("psnr",), 256)
    rng = np.random.default_rng(0)
    base = 20 + rng.standard_normal(64)
    big = _cand("fp32", 1000, 50.0, base)
    tied = _cand("int8", 300, 40.0, base + 0.001 * rng.standard_normal(64))
    worse = _cand("int4", 250, 30.0, base - 2.0)
    info = {"budgets": {"memory_mb": 64.0, "latency_ms": 100.0}, "channel": "awgn", "eval_snrs": [5.0]}
    got = choose(subj, [big, tied, worse], "dev", info)
    assert got["chosen"] == "fp32" and got["fits"]
    assert "significantly worse" in got["rejected"]["int4"] and "tied" in got["rejected"]["int8"]
    # a latency budget only the compressed plans meet: the tied int8 wins
    got = choose(subj, [big, tied, worse], "dev", dict(info, budgets={"memory_mb": 64.0, "latency_ms": 45.0}))
    assert got["chosen"] == "int8" and "latency 50.0 ms > budget 45 ms" in got["rejected"]["fp32"]
    # nothing fits: the closest plan and the failing budget
    got = choose(subj, [big, tied, worse], "dev", dict(info, budgets={"memory_mb": 64.0, "latency_ms": 10.0}))
    assert not got["fits"] and got["closest"] == "int4" and got["failing_budget"] == "latency"


# ---------------------------------------------------------------- image: plan, build, serve


@pytest.fixture(scope="module")
def image_build(tmp_path_factory):
    """A planned and built image task: fp32 and int8 candidates, 4 patches, 2 devices (int8 forced on android-mid by memory)."""
    from semedge.compress.planner import NoPlanFits
    from semedge.compress.task_plan import plan_task
    from semedge.compress.task_subjects import open_subject
    from semedge.runtime.profiles import load_profiles
    from semedge.task_build import build_task

    root = tmp_path_factory.mktemp("image_task")
    subj = open_subject("image", None, workdir=root / "out" / "planner")
    # android-mid's memory budget between the int8 and the fp32 graph's predictions: int8 is chosen there
    probe = plan_task(subj, list(load_profiles(_profiles(root)).values()), n_eval=4, realise=False,
                      candidates=_plans("fp32", "int8"))
    mem = {c: probe["candidates"][c]["predicted"]["android-mid"]["memory_mb"] for c in ("fp32", "int8")}
    assert mem["int8"] < mem["fp32"]  # int8 weights: less memory at the same activations
    profs = _profiles(root, android_mid={"memory_budget_mb": (mem["int8"] + mem["fp32"]) / 2})
    try:
        plan_task(subj, list(load_profiles(profs).values()), n_eval=4, out=root / "plans.json", realise=False,
                  candidates=_plans("fp32", "int8"))
    except NoPlanFits:
        pass
    rec = build_task("image", None, profs, root / "out", quick=True, plans=root / "plans.json", n_eval=4, progress=False)
    return root, rec


def test_image_plan_records_costs_and_psnr(image_build):
    root, rec = image_build
    doc = json.loads((root / "plans.json").read_text())
    assert doc["format"] == "semedge-plans/1" and doc["task"] == "image" and doc["metric"]["primary"] == "psnr"
    fp32, int8 = doc["candidates"]["fp32"], doc["candidates"]["int8"]
    assert int8["bytes"] < fp32["bytes"] / 2  # int8 weights (the convs stored as int8)
    for c in (fp32, int8):
        for d in PROFILES:
            assert c["predicted"][d]["latency_ms"] > 0 and c["predicted"][d]["memory_mb"] > 0
        a = c["accuracy_by_channel"]
        assert a and all(10 < v["psnr"] < 60 and len(v["per_example"]) == 4 for v in a.values())
    assert doc["devices"]["android-mid"]["chosen"] == "int8"
    assert doc["devices"]["jetson-agx-orin"]["chosen"] == "fp32"  # tied or better: the least compressed


def test_image_build_packages_are_served(image_build):
    from semedge.runtime.client import answer_images, send
    from semedge.runtime.package import Package
    from semedge.runtime.runner import DeviceRunner
    from semedge.runtime.server import ServerConfig, create_app, serve_in_thread
    from semedge.semcom.image_data import load_photo
    from semedge.semcom.image_eval import psnr

    root, rec = image_build
    assert rec["task"] == "image" and rec["exit_code"] == 0 and rec["unfit"] == []
    pkgs = {d: Package.load(root / "out" / r["package"]["path"]) for d, r in rec["devices"].items()}
    assert pkgs["android-mid"].manifest["onnx"]["precision"] != "fp32"
    assert pkgs["android-mid"].manifest["plan"]["name"] == "int8"
    assert pkgs["jetson-agx-orin"].manifest["onnx"]["precision"] == "fp32"
    rgb = np.ascontiguousarray(load_photo("coffee")[:48, :64])
    cfg = ServerConfig(max_batch=4, max_wait_ms=5, max_new_tokens=8, backend="torch")
    with serve_in_thread(create_app(list(pkgs.values()), config=cfg)) as url:
        for d, pkg in pkgs.items():
            out = send(url, pkg.package_id, DeviceRunner(pkg).encode_image(rgb), task="image", image_size=(48, 64))
            img = answer_images(out)[0]
            assert img.shape == (48, 64, 3)
            ref = rgb.transpose(2, 0, 1) / 255.0
            assert psnr(ref, img.transpose(2, 0, 1) / 255.0) > 15, d  # a real reconstruction, not noise


def test_image_build_record_and_report(image_build):
    root, rec = image_build
    for d in PROFILES:
        r = rec["devices"][d]
        assert r["metric"] == "psnr" and r["host"]["latency_ms_p50"] > 0 and r["host"]["length"] == 256
        assert r["predicted"]["latency_ms"] > 0 and r["latency"]["link_ms_predicted"] > 0
        assert set(r["curve"]["snrs"]) >= {-5.0, 5.0, 20.0} and all(10 < v < 60 for v in r["curve"]["psnr"])
    html = (root / "out" / "report" / "index.html").read_text()
    assert "Task: image" in html and "PSNR" in html and "task_snr.png" in html
    assert (root / "out" / "report" / "task_snr.png").stat().st_size > 1000
    report = json.loads((root / "out" / "report" / "report.json").read_text())
    assert report["task"] == "image" and len(report["devices"]) == 2
    # a second build is up to date: every stage skipped
    from semedge.task_build import build_task

    again = build_task("image", None, root / "profiles", root / "out", quick=True, plans=root / "plans.json", n_eval=4,
                       progress=False)
    assert all(v["skipped"] for v in again["stages"].values()), again["stages"]


def test_a_plans_file_of_another_task_is_refused(image_build, tmp_path):
    from semedge.task_build import build_task

    root, _ = image_build
    doc = json.loads((root / "plans.json").read_text())
    doc["task"] = "text"
    bad = tmp_path / "plans.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(UserError, match="text task, not image"):
        build_task("image", None, root / "profiles", tmp_path / "out", quick=True, plans=bad, n_eval=4, progress=False)


# ---------------------------------------------------------------- text: pruning x precision, a text package


def test_text_plan_prunes_and_quantizes_the_encoder(tmp_path):
    from semedge.compress.task_plan import plan_task
    from semedge.compress.task_subjects import open_subject
    from semedge.runtime.profiles import load_profiles

    subj = open_subject("text", "tiny:bart:0", workdir=tmp_path / "planner")
    plans = [Plan.make([], "dense.fp32"),
             Plan.make([{"op": "prune", "config": {"heads": 0.5, "ffn": 0.5}},
                        {"op": "quantize_onnx", "config": {"mode": "int8_dynamic", "other_weights": "int8"}}], "h50f50.int8")]
    doc = plan_task(subj, list(load_profiles(_profiles(tmp_path)).values()), n_eval=3, realise=False, candidates=plans,
                    out=tmp_path / "plans.json")
    dense, small = doc["candidates"]["dense.fp32"], doc["candidates"]["h50f50.int8"]
    assert doc["task"] == "text" and doc["metric"]["primary"] == "similarity"
    assert small["bytes"] < dense["bytes"] / 2
    p_d, p_s = dense["predicted"]["android-mid"], small["predicted"]["android-mid"]
    assert p_s["weights_mb"] < p_d["weights_mb"]
    for c in (dense, small):
        for a in c["accuracy_by_channel"].values():
            assert -1 <= a["similarity"] <= 1 and 0 <= a["bleu"] <= 100 and len(a["per_example"]) == 3
    assert {d["chosen"] for d in doc["devices"].values()} <= {"dense.fp32", "h50f50.int8"}


def test_plan_and_build_through_the_script(image_build, tmp_path):
    """`semedge plan --task image --json` and `semedge build --task image --json` (up to date: every stage skipped)."""
    root, _ = image_build
    cands = tmp_path / "cands.json"
    cands.write_text(json.dumps([p.to_dict() for p in _plans("fp32", "int8")]))
    r = subprocess.run([str(SCRIPT), "plan", "--task", "image", "--profiles", str(root / "profiles"), "--devices",
                        "jetson-agx-orin", "--n-full", "4", "--candidates", str(cands), "--no-realise", "--json",
                        "--workdir", str(root / "out" / "planner"), "--out", str(tmp_path / "plans.json")], capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["task"] == "image" and got["devices"]["jetson-agx-orin"]["chosen"] in ("fp32", "int8")
    assert "PSNR" in r.stderr  # the summary table names the task's metric
    r = subprocess.run([str(SCRIPT), "build", "--task", "image", "--profiles", str(root / "profiles"), "--plans",
                        str(root / "plans.json"), "--quick", "--n-eval", "4", "--no-progress", "--json",
                        "--out", str(root / "out")], capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["task"] == "image" and got["exit_code"] == 0 and got["devices"]["android-mid"]["package"]["kind"] == "image"


def test_a_speech_build_refuses_an_image_plans_file(image_build, tmp_path):
    root, _ = image_build
    out = tmp_path / "out"
    r = subprocess.run([str(SCRIPT), "build", "--model", "tiny:whisper:0", "--profiles", str(root / "profiles"),
                        "--plans", str(root / "plans.json"), "--quick", "--no-progress", "--out", str(out)],
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 2, (r.stdout, r.stderr)
    last = [ln for ln in r.stderr.splitlines() if ln.strip()][-1]
    assert last.startswith("error: plans.json is for the image task, not speech") and "--task image" in last
    assert not (out / "packages").exists()
