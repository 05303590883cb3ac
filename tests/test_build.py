"""`semedge build` end to end on a tiny random Whisper: packages, profile, evaluation, report, resumability.

The plans come from a synthetic plans.json (format semedge-plans/1) so the test does
not depend on the planner's search; every later stage runs for real.
"""

from __future__ import annotations

import json
import re
import warnings

import pytest

from semedge.compress.targets import FORMATS
from semedge.runtime.package import Package
from semedge.core.errors import UserError

warnings.filterwarnings("ignore")
MODEL = "tiny:whisper:0"


def _profile(name: str, mem: float, channel: str, snr: tuple[float, float], eps: str = "CPU") -> str:
    return (f"name: {name}\ndevice_class: phone\nmemory_budget_mb: {mem}\n"
            "peak_gflops: {fp32: 50.0, fp16: 100.0, int8: 200.0}\nmem_bandwidth_gbs: 10.0\ncores: 2\nthreads: 1\n"
            f"execution_providers: [{eps}]\nlatency_budget_ms: 2000\n"
            f"link: {{uplink_mbps: 10, snr_db: [{snr[0]}, {snr[1]}], channel: {channel}}}\nsources: [synthetic test profile]\n")


def _plans(devices: dict) -> dict:
    cands = {
        "fp32": {"plan": {"name": "fp32", "steps": []}, "describe": "fp32", "k": 64, "bytes": 900_000},
        "int8": {"plan": {"name": "int8", "steps": [{"op": "quantize_onnx", "config": {"mode": "int8_dynamic"}}]},
                 "describe": "int8", "k": 64, "bytes": 400_000},
        "prune": {"plan": {"name": "prune", "steps": [{"op": "prune", "config": {"heads": 0.5, "ffn": 0.5}}]},
                  "describe": "prune(h=0.5,f=0.5)", "k": 64, "bytes": 600_000},
        "qdq": {"plan": {"name": "qdq", "steps": [{"op": "quantize_onnx", "config": FORMATS["qdq_a8w8"]}]},
                "describe": "qdq a8w8", "k": 64, "bytes": 500_000},
    }
    for i, c in enumerate(cands.values()):
        c["predicted"] = {d: {"latency_ms": 10.0 + i, "memory_mb": 70.0 + 5 * i} for d in devices}
        c["accuracy"] = {s: {"wer": 0.9 - 0.1 * i, "bleu": 1.0, "similarity": 0.1, "n": 2, "level": "cheap"}
                         for s in ("0", "10", "20")}
    devs = {}
    for d, (chosen, snrs, channel) in devices.items():
        devs[d] = {"profile": d, "device_class": "phone", "budgets": {"memory_mb": 100, "latency_ms": 2000},
                   "snr_db": snrs, "eval_snrs": snrs, "channel": channel, "fits": chosen is not None, "chosen": chosen,
                   "closest": chosen or "int8", "failing_budget": None if chosen else "memory",
                   "pareto": ["int8", "fp32"], "rejected": {} if chosen else {"fp32": "memory 80 MB > budget 1 MB"}}
    return {"format": "semedge-plans/1", "model": MODEL, "weight_hash": "x", "task": "speech", "created": "now",
            "calibration": {"split": "val", "n_cheap": 2, "n_full": 2}, "candidates": cands, "devices": devs,
            "timing": {"seconds": 0}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("build")
    prof = root / "profiles"
    prof.mkdir()
    (prof / "phone-a.yaml").write_text(_profile("phone-a", 200, "awgn", (0, 20)))
    (prof / "phone-b.yaml").write_text(_profile("phone-b", 200, "rayleigh", (10, 20), eps="TensorRT, CPU"))
    (prof / "tiny-watch.yaml").write_text(_profile("tiny-watch", 1, "awgn", (0, 10)))
    plans = root / "plans.json"
    plans.write_text(json.dumps(_plans({"phone-a": ("int8", [0.0, 20.0], "awgn"),
                                         "phone-b": ("prune", [10.0, 20.0], "rayleigh"),
                                         "tiny-watch": (None, [0.0, 10.0], "awgn")})))
    return root, prof, plans


@pytest.fixture(scope="module", autouse=True)
def short_decodes():
    from semedge import pipeline

    old = dict(pipeline.QUICK)
    pipeline.QUICK["max_new_tokens"] = 8  # a random tiny model never stops on its own
    yield
    pipeline.QUICK.clear()
    pipeline.QUICK.update(old)


@pytest.fixture(scope="module")
def first(setup):
    from semedge.pipeline import build

    root, prof, plans = setup
    out = root / "out"
    rec = build(MODEL, prof, out, quick=True, progress=False, plans=plans, n_eval=2, sweep=[0, 20], runs=2)
    return out, rec


def test_build_writes_packages_and_report(first):
    out, rec = first
    assert rec["exit_code"] == 3 and rec["unfit"] == ["tiny-watch"]
    for d in ("phone-a", "phone-b"):
        pkg = Package.load(out / "packages" / d)  # verifies every file's sha256
        assert (out / "packages" / f"{d}.zip").stat().st_size > 0
        dev = rec["devices"][d]
        assert dev["package"]["bytes"] > dev["package"]["onnx_bytes"] > 0
        assert pkg.manifest["profile"] == d and pkg.manifest["plan"]["name"] == dev["chosen"]
        assert dev["host"]["latency_ms_p50"] > 0 and dev["host"]["peak_rss_mb"] > 10
        assert dev["predicted"]["latency_ms"] > 0 and dev["predicted"]["memory_mb"] > 0
        assert set(dev["accuracy"]) == {f"{s:g}" for s in dev["eval_snrs"]}
        for a in dev["accuracy"].values():
            assert 0 <= a["wer"] and 0 <= a["bleu"] <= 100 and -1 <= a["similarity"] <= 1 and a["n"] == 2
            lo, hi = a["wer_ci95"]["ci95"]  # with its bootstrap 95% interval and the normaliser named
            assert lo <= a["wer"] <= hi and a["wer_ci95"]["n"] == 2 and a["normalizer"] == "whisper-english"
        lat = dev["latency"]
        assert lat["link_ms_predicted"] > 0 and lat["server_ms_host"] > 0 and lat["channel_uses"] > 0
    assert rec["devices"]["phone-a"]["package"]["precision"] == "int8"
    assert rec["devices"]["phone-b"]["package"]["precision"] == "fp32"
    assert rec["devices"]["phone-b"]["curve"]["channel"] == "rayleigh"
    base = rec["baseline"]  # the conventional link (Codec 2 + LDPC + QAM) on both channels
    assert sorted(base["curves"]) == ["awgn", "rayleigh"] and base["name"].startswith("codec2")
    assert all(0 <= w for c in base["curves"].values() for w in c["wer"])
    assert all(len(c["wer_ci95"]) == len(c["wer"]) for c in base["curves"].values())
    watch = rec["devices"]["tiny-watch"]
    assert watch["package"] is None and not (out / "packages" / "tiny-watch").exists() and "no plan fits" in watch["note"]
    # the record on disk is the one returned
    assert json.loads((out / "build.json").read_text())["devices"].keys() == rec["devices"].keys()


def test_report_references_existing_plots(first):
    out, rec = first
    index = out / rec["report"]
    html = index.read_text()
    imgs = re.findall(r"<img src='([^']+)'", html)
    assert len(imgs) == 5
    for src in imgs:
        p = index.parent / src
        assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", src
    for d in ("phone-a", "phone-b", "tiny-watch"):
        assert d in html
    assert (index.parent / "report.md").is_file()
    rep = json.loads((index.parent / "report.json").read_text())
    assert {h["device"] for h in rep["headline"]} == {"phone-a", "phone-b", "tiny-watch"}


def test_report_shows_ep_share_calibration_and_predictor_error(first):
    """Per device: the first EP and its share of the graph (cost model), the profile's calibration, and
    predicted vs measured latency on the host for every package."""
    out, rec = first
    a, b = rec["devices"]["phone-a"], rec["devices"]["phone-b"]
    assert (a["predicted"]["ep"], a["predicted"]["unit"], a["predicted"]["node_share"]) == ("CPU", "cpu", 1.0)
    assert (b["predicted"]["ep"], b["predicted"]["unit"]) == ("TensorRT", "gpu")
    assert 0.5 < b["predicted"]["node_share"] <= 1.0 and a["predicted"]["calibrated_on"] is None
    for dev in (a, b):
        hc = dev["host_check"]
        assert hc["profile"] == "host" and hc["measured_ms"] == dev["host"]["latency_ms_p50"] > 0
        assert hc["error"] == pytest.approx(hc["predicted_ms"] / hc["measured_ms"] - 1, abs=1e-3)
    watch = rec["devices"]["tiny-watch"]["predicted"]
    assert watch["ep"] == "CPU" and watch["efficiency"].startswith("cost-model defaults")
    md = (out / "report" / "report.md").read_text()
    share = f"{100 * b['predicted']['node_share']:.0f}% / {100 * b['predicted']['flop_share']:.0f}% on TensorRT"
    assert f"| phone-b | TensorRT (gpu) | {share}" in md and "| phone-a | CPU (cpu) | no accelerator |" in md
    hc = a["host_check"]
    assert (f"host: {hc['predicted_ms']:.0f} vs {hc['measured_ms']:.0f} ms ({100 * hc['error']:+.0f}%)") in md
    assert "| tiny-watch | CPU (cpu) | no accelerator | uncalibrated (cost-model defaults) | device: not measured; " \
           "host: not measured |" in md


def test_second_run_skips_every_stage(first, setup):
    from semedge.pipeline import build

    out, rec1 = first
    _, prof, plans = setup
    rec2 = build(MODEL, prof, out, quick=True, progress=False, plans=plans, n_eval=2, sweep=[0, 20], runs=2)
    assert all(s["skipped"] for s in rec2["stages"].values()), rec2["stages"]
    assert rec2["devices"]["phone-a"]["accuracy"] == rec1["devices"]["phone-a"]["accuracy"]
    assert "up to date, skipped" in (out / "build.log").read_text()
    # a changed output is noticed: that device's package is rebuilt, the others stay skipped
    (out / "packages" / "phone-b" / "manifest.json").write_text("{}")
    rec3 = build(MODEL, prof, out, quick=True, progress=False, plans=plans, n_eval=2, sweep=[0, 20], runs=2,
                 devices=["phone-b"])
    assert rec3["stages"]["package"]["skipped"] is False
    Package.load(out / "packages" / "phone-b")


def test_bad_inputs_raise_user_errors(setup, tmp_path):
    from semedge.pipeline import build

    _, prof, plans = setup
    with pytest.raises(UserError, match="no profile"):
        build(MODEL, prof, tmp_path / "o", devices=["nope"], progress=False, plans=plans)
    with pytest.raises(UserError, match="does not exist"):
        build(MODEL, tmp_path / "missing", tmp_path / "o", progress=False, plans=plans)
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "other"}')
    with pytest.raises(UserError, match="not a plans file"):
        build(MODEL, prof, tmp_path / "o2", progress=False, plans=bad)


def test_cli_build_exit_3_and_summary(setup, tmp_path):
    from typer.testing import CliRunner

    from semedge.cli import app

    _, prof, plans = setup
    r = CliRunner().invoke(app, ["build", "--model", MODEL, "--profiles", str(prof), "--out", str(tmp_path / "o"),
                                 "--devices", "tiny-watch", "--plans", str(plans), "--quick", "--n-eval", "1", "--no-progress"])
    assert r.exit_code == 3, r.output
    assert "Report:" in r.output and "tiny-watch" in r.output
    assert (tmp_path / "o" / "report" / "index.html").is_file()


def test_semedge_build_refuses_a_plan_the_first_ep_cannot_run_exit_2(setup, tmp_path):
    """Through the `semedge` script: phone-b (TensorRT) given an int8 plan is one line, exit 2, no package."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    _, prof, plans = setup
    bad = json.loads(plans.read_text())
    bad["devices"]["phone-b"]["chosen"] = "int8"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    r = subprocess.run([str(Path(sys.executable).parent / "semedge"), "build", "--model", MODEL, "--profiles", str(prof),
                        "--out", str(tmp_path / "o"), "--devices", "phone-b", "--plans", str(tmp_path / "bad.json"),
                        "--quick", "--no-progress"], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", COLUMNS="200"))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "a int8_dynamic plan, which TensorRT (its first EP) does not run" in r.stderr
    assert not (tmp_path / "o" / "packages").exists()


@pytest.mark.slow
def test_index_html_loads_every_plot_in_chromium(first, tmp_path):
    import shutil
    import subprocess

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("Debian `chromium` is not installed (apt-get install -y chromium)")
    out, rec = first
    index = out / rec["report"]
    # a copy of the page whose script records each image's naturalWidth once the page has loaded
    probe = index.parent / "_probe.html"
    probe.write_text(index.read_text().replace(
        "</body>", "<script>window.addEventListener('load',()=>{document.body.setAttribute('data-imgs',"
        "Array.from(document.images).map(i=>i.complete&&i.naturalWidth>0?1:0).join(''));});</script></body>"))
    try:
        r = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                            "--disable-background-networking", "--disable-component-update", "--disable-sync",
                            "--allow-file-access-from-files", f"--user-data-dir={tmp_path / 'chrome'}",
                            "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                           capture_output=True, text=True, timeout=120)
    finally:
        probe.unlink()
    m = re.search(r'data-imgs="([01]*)"', r.stdout)
    assert m, f"chromium printed no DOM with the probe: {r.stderr[-500:]}"
    assert m.group(1) == "1" * 5, f"images that failed to load: {m.group(1)}"


# ---------------------------------------------------------------- stage functions alone


def test_stamps_skip_until_an_output_changes(tmp_path):
    from semedge.stamps import Stamps

    st = Stamps(tmp_path, lambda msg: None)
    runs = []

    def make():
        runs.append(1)
        (tmp_path / "f.txt").write_text("x")
        return {"n": len(runs)}

    outs = lambda r: [tmp_path / "f.txt"]  # noqa: E731
    assert st.run("s", {"a": 1}, make, outs) == {"n": 1}
    assert st.run("s", {"a": 1}, make, outs) == {"n": 1} and st.stages["s"]["skipped"]
    (tmp_path / "f.txt").write_text("changed")
    assert st.run("s", {"a": 1}, make, outs) == {"n": 2}
    assert st.run("s", {"a": 2}, make, outs) == {"n": 3}


def test_plan_checks_and_fitting_devices(setup):
    from semedge.runtime.profiles import load_profiles
    from semedge.stages import check_plans, device_record, fitting_devices

    _, prof, plans = setup
    doc = json.loads(plans.read_text())
    profs = load_profiles(prof)
    check_plans(doc, profs)
    assert fitting_devices(doc, profs) == (["phone-a", "phone-b"], ["tiny-watch"])
    rec = device_record("tiny-watch", profs["tiny-watch"], doc, ["phone-a", "phone-b"], [0.0], {}, {}, {})
    assert rec["package"] is None and not rec["fits"] and rec["closest"] == "int8"
    assert set(rec["accuracy"]) == {"0", "10"} and rec["predicted"]["memory_mb"] == 75.0
    bad = json.loads(plans.read_text())
    bad["devices"]["phone-b"]["chosen"] = "int8"  # TensorRT runs no MatMulInteger
    with pytest.raises(UserError, match="a int8_dynamic plan, which TensorRT .its first EP. does not run"):
        check_plans(bad, profs)
    bad["devices"]["phone-b"]["chosen"] = "prune"
    bad["devices"]["phone-a"]["chosen"] = "nope"
    with pytest.raises(UserError, match="not a candidate"):
        check_plans(bad, profs)
    del bad["devices"]["phone-b"]
    with pytest.raises(UserError, match="no entry"):
        check_plans(bad, profs)



def test_build_packages_an_nnapi_device_as_export_device_does(tmp_path):
    """An NNAPI phone's chosen QDQ plan is packaged as `semedge export --device` packages it: plain graph,
    fixed input shapes, .ort for ORT Mobile, node assignment; then profiled and evaluated like any other."""
    from semedge.pipeline import build

    prof = tmp_path / "profiles"
    prof.mkdir()
    (prof / "phone-n.yaml").write_text(_profile("phone-n", 200, "awgn", (0, 20), eps="NNAPI, CPU"))
    plans = tmp_path / "plans.json"
    plans.write_text(json.dumps(_plans({"phone-n": ("qdq", [0.0], "awgn")})))
    rec = build(MODEL, prof, tmp_path / "out", quick=True, progress=False, plans=plans, n_eval=2, sweep=[0], runs=2)
    pkg = Package.load(tmp_path / "out" / "packages" / "phone-n")
    man = pkg.manifest
    assert man["target"]["format"] == "qdq_a8w8" and man["target"]["fixed_shapes"] and not man["target"]["fused"]
    assert man["onnx"]["inputs"][0]["shape"] == [1, 80, 3000] and "NNAPI" in man["node_assignment"]
    assert (pkg.path / "device.ort").is_file()
    dev = rec["devices"]["phone-n"]
    assert dev["predicted"]["ep"] == "NNAPI" and dev["predicted"]["node_share"] > 0.5
    assert dev["accuracy"]["0"]["n"] == 2 and dev["host"]["latency_ms_p50"] > 0


def test_build_on_user_data_segments_long_recordings(first, setup, tmp_path):
    """--data: the build re-evaluates on the user's recordings (packages and profiles stay up to date);
    a recording longer than the window goes as two messages, scored on the joined transcript."""
    from test_audiofolder import SENTENCES, write_folder

    from semedge.pipeline import build
    from semedge.semcom.tasks.speech import synthesize

    d = write_folder(tmp_path / "data", [synthesize(s) for s in SENTENCES[:3]], long=True)
    out, _ = first
    _, prof, plans = setup
    rec = build(MODEL, prof, out, quick=True, progress=False, plans=plans, n_eval=5, sweep=[0, 20], runs=2, data=d)
    assert rec["stages"]["package"]["skipped"] and rec["stages"]["profile"]["skipped"], rec["stages"]
    assert not rec["stages"]["evaluate"]["skipped"]
    ev = json.loads((out / ".stamps" / "evaluate-phone-a.json").read_text())["result"]
    assert ev["n"] == 5 and ev["messages"] == 6, ev  # the long recording: two messages
    assert rec["devices"]["phone-a"]["accuracy"]["0"]["n"] == 5
