"""The planner's realised check: each chosen ONNX measured on this host and evaluated on the test split."""

from __future__ import annotations

from semedge.compress.candidates import Cand
from semedge.compress.choose import cond_key
from semedge.compress.workspace import LazySplit, Workspace
from semedge.core.channel_spec import snr_key
from semedge.core.errors import UserError


def measure_host(c: Cand, threads: int, runs: int) -> dict:
    """p50 latency (ORT, `runs` runs) and peak RSS in a fresh process of the candidate's ONNX."""
    from semedge.runtime.profiler import peak_rss, time_onnx

    lat = time_onnx(c.path, threads=threads, runs=runs, warmup=1)
    rss = peak_rss(c.path, threads=threads)
    peak = max(rss["peak_mb"].values())
    return {"latency_ms_p50": lat["p50_ms"], "cpu_ms_p50": lat.get("cpu_p50_ms"), "peak_rss_mb": peak,
            "baseline_rss_mb": rss["baseline_mb"], "model_rss_mb": round(peak - rss["baseline_mb"], 2),
            "threads": threads, "runs": runs}


def host_prediction(ws: Workspace, c: Cand) -> dict | None:
    """The cost model's prediction for this host (the `host` profile), beside the host measurement."""
    try:
        from semedge.runtime.profiles import load_profile

        host = load_profile("host")
    except UserError:
        return None
    probe = Cand(c.cid, c.plan, c.path, c.bytes)  # a copy: a device may itself be named "host"
    ws.predict(probe, [host], all_formats=True)
    return probe.predicted["host"]


def check_on_host(ws: Workspace, by_id: dict[str, Cand], devs: dict, test_split: str, test: list, acc_cache,
                  threads: int, say, runs: int, segment_s: float | None = None) -> None:
    """Fill devices[d]["realised"] for each device with a chosen plan, measured on `test`
    (the utterances of `test_split`: a built-in split's name or the user's data folder)."""
    from semedge.runtime.evaluate import evaluate_onnx
    base_parts = {"weights": ws.loaded.weight_hash, "codec": ws.chash}
    for d, info in devs.items():
        if not info["chosen"]:
            continue
        c = by_id[info["chosen"]]
        if c.host is None:
            say(f"realised: measuring {c.cid} on this host ({runs} runs, peak RSS in a fresh process)")
            c.host = measure_host(c, threads, runs)
        res = evaluate_onnx(c.path, LazySplit(ws, c.plan), test, info["channel"], info["eval_snrs"], threads=threads,
                            cache=acc_cache, key_parts={**base_parts, "plan": c.plan.hash()}, segment_s=segment_s)
        p = info["predicted"]  # for its first EP, or the fallback EP it was planned for
        info["realised"] = {
            "plan": c.cid, "bytes": c.bytes, "host_latency_ms_p50": c.host["latency_ms_p50"],
            "host_cpu_ms_p50": c.host["cpu_ms_p50"], "peak_rss_mb": c.host["peak_rss_mb"],
            "model_rss_mb": c.host["model_rss_mb"], "predicted_latency_ms": p["latency_ms"],
            "predicted_memory_mb": p["memory_mb"], "host_predicted": host_prediction(ws, c),
            "fits_memory_measured": c.host["model_rss_mb"] <= info["budgets"]["memory_mb"],
            "wer": {snr_key(s): r["wer"] for s, r in res.items()},
            "wer_ci95": {snr_key(s): r.get("wer_ci95") for s, r in res.items()},
            "wer_calibration": {snr_key(s): c.accuracy.get(cond_key(info["channel"], s), {}).get("wer")
                                for s in info["eval_snrs"]},
            "test_split": test_split, "n": len(test), "package": None,
        }
        say(f"realised {d}: {c.cid} {c.bytes / 1e6:.1f} MB, host p50 {c.host['latency_ms_p50']:.0f} ms, "
            f"model RSS {c.host['model_rss_mb']:.0f} MB (budget {info['budgets']['memory_mb']:g}), "
            f"test WER {info['realised']['wer']}")
