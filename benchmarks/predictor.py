"""How well does the cost model predict measured ONNX Runtime latency and memory on this host?

Builds ONNX encoder variants (whisper-base and whisper-tiny.en encoders, a
bart-base-sized encoder; random weights: latency does not depend on their
values; fp32, int8 dynamic, int4 MatMulNBits block 32; several input lengths),
measures each (p50 latency with the host profile's threads, peak RSS in a fresh
process), calibrates the cost model on one set of variants and predicts a
disjoint set. Prints a table, writes benchmarks/results/predictor.json.

    python benchmarks/predictor.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> (kind, config dims, test lengths, calibration lengths)
MODELS = {
    "whisper-tiny.en": ("whisper", dict(d_model=384, encoder_layers=4, encoder_attention_heads=6,
                                        encoder_ffn_dim=1536), [200, 600, 1000, 1600], [400, 1200]),
    "whisper-base": ("whisper", dict(d_model=512, encoder_layers=6, encoder_attention_heads=8,
                                     encoder_ffn_dim=2048), [200, 600, 1000, 1600], [400, 1200]),
    "bart-base": ("bart", dict(d_model=768, encoder_layers=6, encoder_attention_heads=12,
                               encoder_ffn_dim=3072, vocab_size=50265), [32, 96, 192, 384], [64, 256]),
}
PRECISIONS = ["fp32", "int8", "int4"]


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    d = base / "semedge" / "bench"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _atomic_save(model, path: Path) -> None:
    import onnx

    from semedge.core.files import atomic_path

    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))


def export_fp32(name: str, length: int) -> Path:
    """fp32 ONNX of the encoder at a fixed input length (frames for whisper, tokens for bart)."""
    kind, dims, _, _ = MODELS[name]
    out = cache_dir() / f"{name}_L{length}_fp32.onnx"
    if out.is_file():
        return out
    import torch

    torch.manual_seed(0)
    if kind == "whisper":
        from transformers import WhisperConfig
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        cfg = WhisperConfig(num_mel_bins=80, max_source_positions=length // 2, attn_implementation="eager", **dims)
        enc = WhisperEncoder(cfg).eval()
        args = (torch.randn(1, 80, length),)
        names = ["input_features"]
    else:
        from transformers import BartConfig
        from transformers.models.bart.modeling_bart import BartEncoder

        cfg = BartConfig(max_position_embeddings=1024, attn_implementation="eager", **dims)
        enc = BartEncoder(cfg).eval()
        args = (torch.randint(0, 1000, (1, length)), torch.ones(1, length, dtype=torch.long))
        names = ["input_ids", "attention_mask"]

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *a):
            return self.m(*a, return_dict=False)[0]

    from semedge.core.files import atomic_path

    with torch.no_grad(), atomic_path(out) as tmp:
        torch.onnx.export(Wrap(enc), args, str(tmp), input_names=names, output_names=["hidden"],
                          opset_version=17, dynamo=False)
    return out


def quantized(name: str, length: int, prec: str) -> Path:
    fp32 = export_fp32(name, length)
    if prec == "fp32":
        return fp32
    out = cache_dir() / f"{name}_L{length}_{prec}.onnx"
    if out.is_file():
        return out
    import onnx

    if prec == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        from semedge.core.files import atomic_path

        with atomic_path(out) as tmp:
            quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(onnx.load(str(fp32)), block_size=32, is_symmetric=True)
        q.process()
        _atomic_save(q.model.model, out)
    return out


def variants(which: str) -> list[tuple[str, str, int]]:
    """(model, precision, length) for the 'test' or 'calib' set (disjoint lengths)."""
    out = []
    for name, (_, _, test, calib) in MODELS.items():
        for prec in PRECISIONS:
            for length in (test if which == "test" else calib):
                out.append((name, prec, length))
    return out


def measure_interleaved(paths: list[Path], threads: int, runs: int, warmup: int, rounds: int) -> list[dict]:
    """p50/p95 wall and thread-CPU time of each model, its `runs` timed runs spread over `rounds`
    rounds; each round visits every model (one warm-up run first) in a seeded random order."""
    import numpy as np

    from semedge.runtime import profiler

    rounds = max(1, min(rounds, runs))
    sessions = [profiler.session(p, threads) for p in paths]
    feeds = [profiler.make_inputs(s, None) for s in sessions]
    for s, f in zip(sessions, feeds):
        for _ in range(warmup):
            s.run(None, f)
    wall, cpu = [[] for _ in paths], [[] for _ in paths]
    rng = np.random.default_rng(0)
    for r in range(rounds):
        n = runs // rounds + (r < runs % rounds)
        for i in rng.permutation(len(paths)):
            sessions[i].run(None, feeds[i])
            w, c = profiler.timed_runs(sessions[i], feeds[i], n)
            wall[i] += w
            cpu[i] += c
    return [{"p50_ms": round(float(np.percentile(w, 50)), 4), "p95_ms": round(float(np.percentile(w, 95)), 4),
             "cpu_p50_ms": round(float(np.percentile(c, 50)), 4)} for w, c in zip(wall, cpu)]


def repeatability(path: Path, threads: int, runs: int) -> list[dict]:
    """p50 (wall and thread CPU time) of the same model in 3 separate processes."""
    code = ("import json,sys; from semedge.runtime.profiler import time_onnx; "
            f"print(json.dumps(time_onnx(sys.argv[1], None, {threads}, {runs}, 3)))")
    p50s = []
    for _ in range(3):
        r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True,
                           env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        d = json.loads(r.stdout.strip().splitlines()[-1])
        p50s.append({"p50_ms": d["p50_ms"], "cpu_p50_ms": d["cpu_p50_ms"]})
    return p50s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer runs per variant")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "predictor.json"))
    ap.add_argument("--refit", action="store_true", help="re-fit the measurements already in --out")
    ap.add_argument("--profile", default="host", help="profile name or path whose peaks the model uses")
    ap.add_argument("--rounds", type=int, default=5,
                    help="measure every variant in this many interleaved rounds (calibration and test "
                         "variants alternate, in a new order each round), so slow drifts of a shared "
                         "host hit both sets alike; 1 = one variant after another")
    a = ap.parse_args(argv)

    from semedge.runtime import costmodel, profiler
    from semedge.runtime.profiles import load_profile

    prof = load_profile(a.profile)
    threads = prof.threads
    runs, warmup = (10, 2) if a.quick else (30, 5)
    t_start = time.time()

    rows = {"calib": [], "test": []}
    if a.refit:  # re-fit and re-score the measurements of an earlier run
        old = json.loads(Path(a.out).read_text())
        for which in rows:
            for r in old[which]:
                r["_cost"] = costmodel.analyze(quantized(r["model"], r["length"], r["precision"]))
                rows[which].append(r)
        runs, warmup = old["runs"], old["warmup"]
    if not a.refit:
        todo = [(which, v) for which in ("calib", "test") for v in variants(which)]
        lats = measure_interleaved([quantized(n, L, p) for _, (n, p, L) in todo], threads, runs, warmup, a.rounds)
        for (which, (name, prec, length)), lat in zip(todo, lats):
            path = quantized(name, length, prec)
            cost = costmodel.analyze(path)
            mem = profiler.peak_rss(path, [None], threads)
            rows[which].append({"model": name, "precision": prec, "length": length, "path": str(path),
                                "measured_ms": lat["p50_ms"], "p95_ms": lat["p95_ms"],
                                "measured_cpu_ms": lat["cpu_p50_ms"],
                                "measured_peak_mb": mem["peak_mb"]["None"], "gflops": round(cost.flops / 1e9, 3),
                                "weights_mb": round(cost.weight_bytes / 1e6, 2), "_cost": cost})
            print(f"  measured {which:5s} {name:16s} {prec:4s} L={length:5d}  p50 {lat['p50_ms']:9.2f} ms  "
                  f"rss {mem['peak_mb']['None']:7.1f} MB", flush=True)

    samples = [(r["_cost"], r["measured_ms"]) for r in rows["calib"]]
    eff = costmodel.calibrate(samples, prof, label=f"predictor.py calibration set ({len(samples)} variants)")
    eff = costmodel.calibrate_memory([(r["_cost"], r["measured_peak_mb"]) for r in rows["calib"]], eff)
    cal = prof.model_copy(update={"efficiency": eff})
    # the same fit against thread CPU time (robust to other processes on a shared machine)
    eff_cpu = costmodel.calibrate([(r["_cost"], r["measured_cpu_ms"]) for r in rows["calib"]], prof,
                                  label="predictor.py calibration set, thread CPU time")
    cal_cpu = prof.model_copy(update={"efficiency": eff_cpu})

    def score(rs):
        for r in rs:
            r["predicted_ms"] = round(costmodel.predict_latency_ms(r["_cost"], cal), 3)
            r["predicted_peak_mb"] = round(costmodel.predict_memory_mb(r["_cost"], cal), 1)
            r["error"] = round(r["predicted_ms"] / r["measured_ms"] - 1, 4)
            r["mem_error"] = round(r["predicted_peak_mb"] / r["measured_peak_mb"] - 1, 4)
            r["predicted_cpu_ms"] = round(costmodel.predict_latency_ms(r["_cost"], cal_cpu), 3)
            r["cpu_error"] = round(r["predicted_cpu_ms"] / r["measured_cpu_ms"] - 1, 4)
        n = len(rs)
        return {"n": n,
                "within_10pct": round(sum(abs(r["error"]) <= 0.10 for r in rs) / n, 4),
                "within_25pct": round(sum(abs(r["error"]) <= 0.25 for r in rs) / n, 4),
                "median_abs_error": round(sorted(abs(r["error"]) for r in rs)[n // 2], 4),
                "cpu_within_10pct": round(sum(abs(r["cpu_error"]) <= 0.10 for r in rs) / n, 4),
                "cpu_within_25pct": round(sum(abs(r["cpu_error"]) <= 0.25 for r in rs) / n, 4),
                "mem_within_10pct": round(sum(abs(r["mem_error"]) <= 0.10 for r in rs) / n, 4),
                "mem_within_25pct": round(sum(abs(r["mem_error"]) <= 0.25 for r in rs) / n, 4)}

    s_test, s_cal = score(rows["test"]), score(rows["calib"])
    rep_path = quantized("whisper-base", 1000, "fp32")
    rep = old["repeatability"]["raw"] if a.refit else repeatability(rep_path, threads, runs)
    p50s = [r["p50_ms"] for r in rep]
    cpus = [r["cpu_p50_ms"] for r in rep]
    spread = max(abs(p / (sum(p50s) / 3) - 1) for p in p50s)
    spread_cpu = max(abs(p / (sum(cpus) / 3) - 1) for p in cpus)

    print(f"\n{'model':16s} {'prec':5s} {'len':>5s} {'measured':>10s} {'predicted':>10s} {'err':>7s}"
          f" {'rss MB':>8s} {'pred MB':>8s}")
    for r in rows["test"]:
        print(f"{r['model']:16s} {r['precision']:5s} {r['length']:5d} {r['measured_ms']:10.2f} "
              f"{r['predicted_ms']:10.2f} {100 * r['error']:+6.1f}% {r['measured_peak_mb']:8.1f} "
              f"{r['predicted_peak_mb']:8.1f}")
    print(f"\ntest variants: {s_test['n']}; within ±10%: {100 * s_test['within_10pct']:.0f}%, "
          f"within ±25%: {100 * s_test['within_25pct']:.0f}% (calibration set: "
          f"{100 * s_cal['within_10pct']:.0f}% / {100 * s_cal['within_25pct']:.0f}%)")
    print(f"thread CPU time: within ±10%: {100 * s_test['cpu_within_10pct']:.0f}%, within ±25%: "
          f"{100 * s_test['cpu_within_25pct']:.0f}%")
    print(f"memory within ±10%: {100 * s_test['mem_within_10pct']:.0f}%, ±25%: {100 * s_test['mem_within_25pct']:.0f}%")
    print(f"repeatability (whisper-base fp32 L=1000, 3 processes): p50 {p50s} ms, max deviation from mean "
          f"{100 * spread:.1f}%; thread CPU p50 {cpus} ms, {100 * spread_cpu:.1f}%")

    for rs in rows.values():
        for r in rs:
            r.pop("_cost")
    result = {
        "benchmark": "predictor", "quick": a.quick or (a.refit and old.get("quick")), "refit": a.refit, "profile": prof.name, "threads": threads,
        "runs": runs, "warmup": warmup, "rounds": None if a.refit else max(1, min(a.rounds, runs)),
        "host": profiler._host_info(),
        "note": "2-core machine shared with other jobs: timings are noisy",
        "efficiency": eff.model_dump(exclude_none=True),
        "summary": {"test": s_test, "calib": s_cal},
        "efficiency_cpu_time": eff_cpu.model_dump(exclude_none=True),
        "repeatability": {"model": "whisper-base fp32 L=1000", "p50_ms": p50s, "max_dev": round(spread, 4),
                          "cpu_p50_ms": cpus, "cpu_max_dev": round(spread_cpu, 4), "raw": rep},
        "test": rows["test"], "calib": rows["calib"], "seconds": round(time.time() - t_start, 1),
    }
    out = Path(a.out)
    from semedge.core.files import write_atomic

    write_atomic(out, json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
