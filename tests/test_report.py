"""The report from a synthetic build record: files, plots, headline numbers, unfit devices, bad input."""

from __future__ import annotations

import json
import re

import pytest

from semedge.report import PLOTS, _pareto_2d, candidate_points, write_report
from semedge.core.errors import UserError

PNG = b"\x89PNG\r\n\x1a\n"


def _build() -> dict:
    cands = {
        "fp32": {"describe": "fp32", "bytes": 80_000_000, "predicted": {"phone": {"memory_mb": 300, "latency_ms": 900},
                                                                         "watch": {"memory_mb": 300, "latency_ms": 9000}},
                 "accuracy": {"5": {"wer": 0.30}, "20": {"wer": 0.28}, "0": {"wer": 0.5}}},
        "int8": {"describe": "int8", "bytes": 21_000_000, "predicted": {"phone": {"memory_mb": 140, "latency_ms": 400},
                                                                         "watch": {"memory_mb": 140, "latency_ms": 4000}},
                 "accuracy": {"5": {"wer": 0.31}, "20": {"wer": 0.29}, "0": {"wer": 0.52}}},
        "int4": {"describe": "int4+fp32[critical]", "bytes": 14_000_000,
                 "predicted": {"phone": {"memory_mb": 120, "latency_ms": 500}, "watch": {"memory_mb": 120, "latency_ms": 5000}},
                 "accuracy": {"5": {"wer": 0.45}, "20": {"wer": 0.40}, "0": {"wer": 0.7}}},
    }
    sweep = [-5.0, 0.0, 5.0, 10.0, 20.0]
    phone = {
        "device_class": "phone", "budgets": {"memory_mb": 512, "latency_ms": 1000}, "snr_db": [5, 20], "channel": "rayleigh",
        "eval_snrs": [5.0, 20.0], "fits": True, "chosen": "int8", "describe": "int8", "failing_budget": None,
        "package": {"path": "packages/phone", "bytes": 21_345_678, "onnx_bytes": 21_000_000},
        "host": {"latency_ms_p50": 812.0, "latency_ms_p95": 900.0, "peak_rss_mb": 260.0},
        "predicted": {"latency_ms": 412.5, "memory_mb": 140.0},
        "accuracy": {"5": {"wer": 0.3125, "bleu": 55.0, "similarity": 0.9, "n": 16},
                     "20": {"wer": 0.2875, "bleu": 60.0, "similarity": 0.92, "n": 16}},
        "curve": {"channel": "rayleigh", "snrs": sweep, "n": 16, "wer": [0.9, 0.6, 0.31, 0.3, 0.29],
                  "bleu": [5, 20, 55, 58, 60], "similarity": [0.3, 0.6, 0.9, 0.91, 0.92]},
        "latency": {"device_ms_host": 812.0, "device_ms_predicted": 412.5, "link_ms_predicted": 3.2, "server_ms_host": 350.0},
    }
    watch = {
        "device_class": "watch", "budgets": {"memory_mb": 48, "latency_ms": 3000}, "snr_db": [0, 10], "channel": "awgn",
        "eval_snrs": [0.0], "fits": False, "chosen": None, "closest": "int4", "describe": "int4+fp32[critical]",
        "failing_budget": "memory", "package": None, "predicted": {"latency_ms": 5000, "memory_mb": 120},
        "accuracy": {"0": {"wer": 0.7}}, "note": "no plan fits (memory)",
    }
    return {
        "format": "semedge-build/1", "model": "whisper-base", "weight_hash": "ab" * 32, "created": "2025-01-01T00:00:00Z",
        "quick": False, "settings": {"n_eval": 16, "threads": 1, "sweep": sweep}, "host": {"cpu": "test cpu"},
        "plans": {"candidates": cands, "devices": {
            "phone": {"chosen": "int8", "pareto": ["int8", "int4"], "rejected": {}, "budgets": {"memory_mb": 512},
                      "eval_snrs": [5.0, 20.0]},
            "watch": {"chosen": None, "pareto": [], "budgets": {"memory_mb": 48}, "eval_snrs": [0.0],
                      "rejected": {c: "memory > 48 MB" for c in cands}}}},
        "devices": {"phone": phone, "watch": watch},
        "baseline": {"name": "codec2-1600+ldpc-0.5+QPSK", "curves": {"rayleigh": {
            "snrs": sweep, "wer": [1.0, 1.0, 0.8, 0.4, 0.31], "bleu": [0, 0, 5, 30, 50], "similarity": [0.1, 0.1, 0.3, 0.7, 0.85]}}},
        "timing": {"seconds": 1234},
    }


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("rep")
    return out, write_report(_build(), out)


def test_files_and_plots(report):
    out, index = report
    assert index == out / "report" / "index.html"
    html = index.read_text()
    srcs = re.findall(r"<img src='([^']+)'", html)
    assert sorted(srcs) == sorted(PLOTS)
    for p in PLOTS:
        data = (index.parent / p).read_bytes()
        assert data[:8] == PNG and len(data) > 5000, p
    assert (index.parent / "report.md").read_text().count("![") == len(PLOTS)


def test_headline_numbers(report):
    _, index = report
    html = index.read_text()
    rep = json.loads((index.parent / "report.json").read_text())
    head = {h["device"]: h for h in rep["headline"]}
    assert head["phone"]["plan"] == "int8" and head["phone"]["package_bytes"] == 21_345_678
    assert head["phone"]["predicted_latency_ms"] == 412.5
    assert head["phone"]["wer_at_snr"] == {"5": 0.3125, "20": 0.2875}
    assert "21.3 MB" in html and "412 ms" in html and "5 dB: 0.312" in html and "20 dB: 0.28" in html
    assert head["watch"]["fits"] is False and "No plan fits the budgets of: watch" in html
    md = (index.parent / "report.md").read_text()
    assert "| phone | yes | int8 | 21.3 MB | 412 ms |" in md


def test_plot_data(report):
    _, index = report
    rep = json.loads((index.parent / "report.json").read_text())
    fa = rep["footprint_accuracy"]["phone"]
    assert fa["x_is_memory"] and fa["chosen"] == "int8" and fa["budget_mb"] == 512
    assert {p["cid"]: p["wer"] for p in fa["points"]} == {"fp32": 0.30, "int8": 0.31, "int4": 0.45}  # at 5 dB
    assert fa["realised"] == {"x": 140.0, "wer": 0.3125, "snr": "5"}  # the package's own test-set WER
    assert all(p["rejected"] for p in rep["footprint_accuracy"]["watch"]["points"])
    assert rep["footprint_accuracy"]["watch"]["closest"] == "int4"
    kinds = [ln["kind"] for ln in rep["snr_curves"]]
    assert kinds == ["jsc", "baseline"]  # the watch has no curve (no package)
    lat = rep["latency_breakdown"]["phone"]
    assert lat["device_ms_predicted"] == 412.5 and lat["link_ms_predicted"] == 3.2 and lat["server_ms_host"] == 350.0


def test_pareto_front():
    pts = [(120, 0.45), (140, 0.31), (300, 0.30), (200, 0.5)]
    assert _pareto_2d(pts) == [(120, 0.45), (140, 0.31), (300, 0.30)]


def test_candidate_points_fall_back_to_bytes():
    b = _build()
    del b["plans"]["candidates"]["fp32"]["predicted"]["phone"]
    cp = candidate_points(b, "phone")
    assert not cp["x_is_memory"] and {p["cid"]: p["x"] for p in cp["points"]}["int8"] == 21.0


def test_bad_input(tmp_path):
    with pytest.raises(UserError, match="no 'devices'"):
        write_report({"model": "x"}, tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        write_report(tmp_path / "nope.json", tmp_path)
    (tmp_path / "b.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        write_report(tmp_path / "b.json", tmp_path)


def test_intervals_in_tables_and_plots(tmp_path):
    b = _build()
    ci = lambda v, lo, hi: {"value": v, "ci95": [lo, hi], "n": 16}  # noqa: E731
    phone = b["devices"]["phone"]
    phone["accuracy"]["5"].update(wer_ci95=ci(0.3125, 0.25, 0.38), bleu_ci95=ci(55.0, 48.0, 61.5))
    phone["curve"]["wer_ci95"] = [ci(w, max(0, w - 0.05), w + 0.05) for w in phone["curve"]["wer"]]
    b["plans"]["candidates"]["int8"]["accuracy"]["5"]["wer_ci95"] = ci(0.31, 0.27, 0.35)
    b["normalizer"] = "whisper-english"
    index = write_report(b, tmp_path)
    html = index.read_text()
    assert "5 dB: 0.312 [0.250, 0.380]" in html and "BLEU 55.0 [48.0, 61.5]" in html
    assert "whisper-english" in html and "95% intervals" in html
    rep = json.loads((index.parent / "report.json").read_text())
    assert rep["normalizer"] == "whisper-english"
    assert rep["headline"][0]["wer_ci95_at_snr"]["5"]["ci95"] == [0.25, 0.38]
    assert rep["snr_curves"][0]["wer_ci95"][0]["ci95"] == pytest.approx([0.85, 0.95])
    pts = {p["cid"]: p for p in rep["footprint_accuracy"]["phone"]["points"]}
    assert pts["int8"]["wer_ci95"]["ci95"] == [0.27, 0.35] and pts["fp32"]["wer_ci95"] is None
    assert (index.parent / "snr_wer.png").read_bytes()[:8] == PNG


def test_targets_table_ep_share_calibration_and_predictor_error(tmp_path):
    """Per device: EP, accelerator share, calibration, predicted vs measured (host always; the device
    itself when it is this machine); an unpackaged device shows its EP and 'not measured'."""
    b = _build()
    b["devices"]["phone"]["predicted"].update(ep="NNAPI", unit="npu", node_share=0.75, flop_share=0.9, boundaries=4,
                                              calibrated_on=None)
    b["devices"]["phone"]["host_check"] = {"profile": "host", "predicted_ms": 1000.0, "measured_ms": 812.0,
                                           "error": 0.2315, "calibrated_on": None}
    b["devices"]["watch"]["predicted"].update(ep="XNNPACK", unit="cpu", calibrated_on="bench.json (3 lengths)")
    host = {**b["devices"]["phone"], "device_class": "host"}
    host["predicted"] = {"latency_ms": 700.0, "memory_mb": 140.0, "ep": "CPU", "unit": "cpu", "node_share": 1.0,
                         "flop_share": 1.0, "boundaries": 0, "calibrated_on": "host bench"}
    b["devices"]["host"] = host
    index = write_report(b, tmp_path)
    rows = {r["device"]: r for r in json.loads((index.parent / "report.json").read_text())["devices"]}
    assert rows["phone"]["ep"] == "NNAPI" and rows["phone"]["ep_node_share"] == 0.75
    assert rows["phone"]["host_check"]["error"] == 0.2315 and rows["phone"]["device_check"] is None
    assert rows["host"]["device_check"] == {"predicted_ms": 700.0, "measured_ms": 812.0, "error": -0.1379}
    md = (index.parent / "report.md").read_text()
    assert ("| phone | NNAPI (npu) | 75% / 90% on NNAPI, 4 unit boundaries | uncalibrated (cost-model defaults) "
            "| device: not measured; host: 1000 vs 812 ms (+23%) (host profile uncalibrated) |") in md
    assert "| watch | XNNPACK (cpu) | no accelerator (XNNPACK runs on the CPU) | calibrated: bench.json (3 lengths) " \
           "| device: not measured; host: not measured |" in md
    assert "| host | CPU (cpu) | no accelerator | calibrated: host bench | device: 700 vs 812 ms (-14%)" in md
    html = index.read_text()
    assert "Targets and the cost model" in html and "75% / 90% on NNAPI" in html


def test_targets_table_on_an_old_build_shows_dashes(report):
    _, index = report
    md = (index.parent / "report.md").read_text()
    assert "| phone | – | – | – | device: not measured; host: not measured |" in md
