"""Compression of the whisper-base device half (ONNX) and server half (PyTorch), measured.

For each device-half setting: bytes on disk, peak RSS, ORT latency p50 (a 5 s
utterance's trimmed input and the 30 s window), WER clean and at 10 dB AWGN, beside
the fp32 ONNX baseline. Every WER has its bootstrap 95% interval over utterances, and
"points lost vs fp32" a paired one (same utterances, same channel noise; semcom.stats). For the server half: decoder bytes, time for a 20-token
transcript, WER. Writes benchmarks/results/compression.json.

    python benchmarks/compression.py [--quick] [--n N] [--family mix] [--threads 1] [--codec NAME=CKPT ...]

--codec adds the fp32 device half of a trained codec (its own JSC, LoRA decoder and
device encoder: e.g. the whisper-tiny.en student of `semedge train --encoder`).

Timings on a shared host are noisy: cpu_p50_ms (the calling thread's CPU time,
1 thread) is printed beside the wall-clock p50.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results"
TRIM_FRAMES = 500  # log-mel frames of 5 s (100 per second)


def export(split, path: Path) -> Path:
    """The device half as ONNX with dynamic frames (no offline fusions: ORT fuses at load)."""
    x = torch.zeros(1, 80, 3000)
    with torch.no_grad():
        torch.onnx.export(split.device.eval(), (x,), str(path), input_names=["input_features"],
                          output_names=["symbols"], opset_version=17, dynamo=False, do_constant_folding=True,
                          dynamic_axes={"input_features": {0: "batch", 2: "frames"}, "symbols": {0: "batch", 1: "tokens"}})
    return path


def _peak(rss: dict):
    v = rss.get("peak_mb")
    return round(max(v.values()), 1) if isinstance(v, dict) else v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer utterances, runs and distillation steps (<= 10 min)")
    ap.add_argument("--n", type=int, default=None, help="test utterances for WER (default 8 quick, 50 full)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--family", default="mix", help="voice family of the test utterances (tasks.speech.load_split)")
    ap.add_argument("--backend", default="ct2", choices=("ct2", "torch"), help="server decoder for the WER columns")
    ap.add_argument("--distill-steps", type=int, default=None, help="default 16 quick, 1500 full")
    ap.add_argument("--only", default="", help="comma-separated setting names to run (with fp32, their baseline)")
    ap.add_argument("--merge", action="store_true",
                    help="keep --out's other rows: replace only the settings run now (each row's ratios are against "
                         "the fp32 row measured in its own run)")
    ap.add_argument("--no-server", action="store_true", help="skip the server-half rows (with --merge: keep the old ones)")
    ap.add_argument("--codec", action="append", default=[], metavar="NAME=CKPT",
                    help="also measure the fp32 device half of a trained codec (e.g. a --encoder whisper-tiny.en student)")
    ap.add_argument("--out", default=str(RESULTS / "compression.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    quick = args.quick
    n = args.n or (8 if quick else 50)
    runs = 3 if quick else 10
    d_steps = args.distill_steps or (16 if quick else 1500)
    n_train = 8 if quick else 1024
    d_cfg = {"steps": d_steps, "warmup": min(100, d_steps // 10), "save_every": 100}  # the rest: DistillConfig's defaults

    from semedge.compress import plan as P
    from semedge.compress import quantize_onnx as QO
    from semedge.compress import quantize_torch as QT
    from semedge.runtime.evaluate import evaluate_onnx, speech_features
    from semedge.runtime.profiler import peak_rss, time_onnx
    from semedge.semcom.models import load_model
    from semedge.semcom.split import build_split
    from semedge.semcom.tasks.speech import load_split
    from semedge.semcom.training.data import target_ids

    t_start = time.time()
    loaded = load_model("whisper-base")
    from semedge.semcom.jsc import with_tail
    from semedge.semcom.split import identity_codec

    # identity JSC; the server decodes from the content + 300 silence frames (docs/runtime.md)
    split = build_split(loaded, with_tail(identity_codec(loaded), 300))
    test = load_split("test", n, progress=False, family=args.family)
    train = load_split("train", max(n_train, 8), progress=False)
    tfeats = speech_features(loaded, train)
    calib = torch.from_numpy(tfeats[:8])
    with torch.no_grad():  # identity JSC standardised on training features: unit power on the channel
        h = torch.cat([split.device.encoder(calib[i : i + 1]).last_hidden_state for i in range(4)])
    split.codec.set_stats(h)
    snrs = [math.inf, 10.0]
    from semedge.core.frames import window_frames

    # static quantization calibrates on what the device runs: fitted windows of training utterances
    fit_calib = [tfeats[i][:, : window_frames(len(u.audio))] for i, u in enumerate(train[:8])]

    settings = [
        ("fp32", []),
        ("int8", [{"op": "quantize_onnx", "config": {"mode": "int8_dynamic", "other_weights": "int8"}}]),
        ("int8-matmul-only", [{"op": "quantize_onnx", "config": {"mode": "int8_dynamic"}}]),
        ("int8-qdq-static", [{"op": "quantize_onnx", "config": {"mode": "int8_static", "calib_size": 4}}]),
        ("int8-qdq-matmul-pct", [{"op": "quantize_onnx", "config": {"mode": "int8_static", "calib_size": 8, "op_types": ["MatMul"],
                                                                     "calibrate": "percentile", "keep_fp32": ["critical"]}}]),
        ("int8-qdq-a16w8", [{"op": "quantize_onnx", "config": {"mode": "int8_static", "calib_size": 8, "activations": "uint16"}}]),
        ("fp16", [{"op": "quantize_onnx", "config": {"mode": "fp16"}}]),
        ("int4", [{"op": "quantize_onnx", "config": {"mode": "int4", "block_size": 128, "other_weights": "int8"}}]),
        ("int4-mixed-critical", [{"op": "quantize_onnx", "config": {"mode": "int4", "block_size": 64, "keep_fp32": ["critical"]}}]),
        ("int4-mixed-jsc-frontend", [{"op": "quantize_onnx", "config": {"mode": "int4", "block_size": 64, "keep_fp32": ["jsc", "frontend"]}}]),
        ("prune-h25-f25", [{"op": "prune", "config": {"heads": 0.25, "ffn": 0.25}}]),
        ("prune-h25-f25+int8", [{"op": "prune", "config": {"heads": 0.25, "ffn": 0.25}},
                                {"op": "quantize_onnx", "config": {"mode": "int8_dynamic", "other_weights": "int8"}}]),
        ("distill-4L", [{"op": "distill", "config": {"layers": 4, **d_cfg}}]),
        ("prune-h25-f25+distill", [{"op": "prune", "config": {"heads": 0.25, "ffn": 0.25}},
                                   {"op": "distill", "config": {"layers": 6, **d_cfg}}]),
    ]
    if quick:  # the extra variants only in the full run
        settings = [s for s in settings if s[0] not in ("int8-matmul-only", "prune-h25-f25+int8", "int4-mixed-jsc-frontend", "int8-qdq-matmul-pct")]
    only = [s for s in args.only.split(",") if s]
    if only:
        settings = [s for s in settings if s[0] in only or s[0] == "fp32"]

    from semedge.semcom.checkpoint import apply_checkpoint, device_encoder, load_checkpoint

    codec_splits = {}
    for spec in args.codec:
        name, _, path = spec.partition("=")
        if not path:
            ap.error(f"--codec {spec!r}: give NAME=CKPT")
        ck = load_checkpoint(path, loaded)
        codec_splits[name] = (build_split(apply_checkpoint(loaded, ck), ck.codec, encoder=device_encoder(ck)), ck)
        settings.append((name, []))

    rows = []
    errors: dict[str, dict] = {}  # setting -> {"clean"/"10dB": per-utterance [errors, words]}, for the paired intervals
    torch_cache: dict[str, object] = {}
    work = Path(tempfile.mkdtemp(prefix="semedge-compress-"))
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "semedge" / "distill"
    for name, steps in settings:
        t0 = time.time()
        plan = P.Plan.make(steps, name)
        torch_steps = [s.to_dict() for s in plan.ops(P.TORCH_OPS)]
        key = json.dumps(torch_steps, sort_keys=True) + (name if name in codec_splits else "")
        if name in codec_splits and key not in torch_cache:
            sp = codec_splits[name][0]
            base = work / f"{len(torch_cache)}.onnx"
            export(sp, base)
            torch_cache[key] = (sp, base)
        if key not in torch_cache:
            # KL teacher-forced on the reference transcripts (no generation: cheap for 1024 utterances)
            dcal = {"features": torch.from_numpy(tfeats[:n_train]),
                    "n_frames": [math.ceil(len(u.audio) / 320) for u in train[:n_train]],
                    "ids": [target_ids(loaded, u.text) for u in train[:n_train]]}
            cal = dcal if any(s["op"] == "distill" for s in torch_steps) else calib
            wd = cache / (plan.hash()[:16] + f"-n{n_train}-fit-ref")
            sp = P.apply_torch_steps(split, P.Plan.make(torch_steps), cal, progress=True, workdir=wd)
            base = work / f"{len(torch_cache)}.onnx"
            export(sp, base)
            torch_cache[key] = (sp, base)
        sp, base = torch_cache[key]
        out = work / f"{name}.onnx"
        P.apply_onnx_steps(base, out, plan, calib=fit_calib)
        lat5 = time_onnx(out, length=TRIM_FRAMES, threads=args.threads, runs=runs, warmup=1)
        lat30 = time_onnx(out, length=3000, threads=args.threads, runs=max(2, runs // 2), warmup=1)
        rss = peak_rss(out, lengths=[3000], threads=args.threads)
        if args.backend == "ct2":  # the server's default decoder; the same for every setting
            from semedge.semcom.ct2_backend import engine_for

            # pruning and distillation change only the encoder: decode with the base model's decoder
            # (a codec row brings its own LoRA decoder)
            sp.server.ct2 = engine_for(sp.loaded if name in codec_splits else loaded, "int8", threads=args.threads)
        acc = evaluate_onnx(out, sp, test, "awgn", snrs, threads=args.threads)
        acc = {"clean" if math.isinf(k) else f"{k:g}dB": v for k, v in acc.items()}
        errors[name] = {k: v["word_errors"] for k, v in acc.items()}
        row = {"setting": name, "plan": P.describe(plan), "plan_hash": plan.hash()[:12], "bytes": out.stat().st_size,
               "peak_rss_mb": _peak(rss), "p50_ms_5s": lat5["p50_ms"], "cpu_p50_ms_5s": lat5["cpu_p50_ms"],
               "p50_ms_30s": lat30["p50_ms"], "cpu_p50_ms_30s": lat30["cpu_p50_ms"],
               "wer_clean": round(acc["clean"]["wer"], 4), "wer_clean_ci95": acc["clean"]["wer_ci95"],
               "wer_10dB": round(acc["10dB"]["wer"], 4), "wer_10dB_ci95": acc["10dB"]["wer_ci95"],
               "normalizer": acc["clean"]["normalizer"],
               "quant_ops": QO.quantized_nodes(out), "seconds": round(time.time() - t0, 1)}
        if name in codec_splits:
            ck = codec_splits[name][1]
            de = ck.manifest.get("device_encoder") or {"source": "whisper-base"}
            row["codec"] = {"path": str(ck.path), "k": ck.k, "device_encoder": de["source"],
                            "tail_frames": ck.codec.cfg.tail_frames, "lora": ck.manifest.get("lora") is not None}
        if hasattr(sp, "prune_info"):
            row["encoder_shapes"] = {k: sp.prune_info[k] for k in ("heads", "ffn")}
        if any(s["op"] == "distill" for s in torch_steps):
            row["label"] = (f"distillation: {d_steps} steps on {n_train} train utterances (fitted windows, cached teacher "
                            "features, KL on the reference transcripts)")
            row["final_loss"] = round(float(np.mean(sp.distill_losses[-5:])), 5) if getattr(sp, "distill_losses", None) else None
        rows.append(row)
        print(f"[{time.time() - t_start:6.0f}s] {name}: {row['bytes'] / 1e6:.1f} MB  5s {row['cpu_p50_ms_5s']:.0f} ms  "
              f"30s {row['cpu_p50_ms_30s']:.0f} ms  WER {fmt_ci(row['wer_clean_ci95'])} / {fmt_ci(row['wer_10dB_ci95'])}",
              flush=True)

    base = rows[0]
    for r in rows:
        r["smaller_x"] = round(base["bytes"] / r["bytes"], 2)
        r["size_cut_pct"] = round(100 * (1 - r["bytes"] / base["bytes"]), 1)
        r["faster_x_5s"] = round(base["cpu_p50_ms_5s"] / r["cpu_p50_ms_5s"], 2)
        r["faster_x_30s"] = round(base["cpu_p50_ms_30s"] / r["cpu_p50_ms_30s"], 2)
        r["wer_points_lost"] = round(100 * (r["wer_clean"] - base["wer_clean"]), 2)
        r["wer_points_lost_10dB"] = round(100 * (r["wer_10dB"] - base["wer_10dB"]), 2)
        for cond, key in (("clean", "wer_points_lost_ci95"), ("10dB", "wer_points_lost_10dB_ci95")):
            r[key] = points_lost(errors[base["setting"]][cond], errors[r["setting"]][cond])
        if r is not base:  # the fp32 row these ratios are against (same run)
            r["fp32_same_run"] = {k: base[k] for k in ("bytes", "cpu_p50_ms_5s", "cpu_p50_ms_30s", "wer_clean", "wer_10dB")}

    # server half
    from semedge.semcom.metrics import score
    from semedge.semcom.system import device_encode

    run_id = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t_start))
    for r in rows:
        r["run"] = run_id
    server_rows = []
    split.server.ct2 = None  # the server-half rows are PyTorch decoders (CTranslate2: benchmarks/latency.py)
    msgs = []
    with torch.no_grad():
        for b in range(0, len(test), 4):
            msgs += device_encode(split, [u.audio for u in test[b : b + 4]])
    refs = [u.text for u in test]
    for mode in () if args.no_server else ("fp32", "torch_int8", "bnb_int8", "bnb_nf4"):
        t0 = time.time()
        sp = split if mode == "fp32" else QT.apply(split, {"mode": mode})
        nbytes = QT.decoder_bytes(sp.loaded.model)
        from transformers.modeling_outputs import BaseModelOutput

        from semedge.semcom.split import generate_kwargs

        h, _ = sp.server.encoder_states(msgs[:1])
        times = []
        for _ in range(2 if quick else 5):
            t1 = time.perf_counter()
            with torch.no_grad():
                sp.loaded.model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=h), max_new_tokens=20,
                                         min_new_tokens=20, **generate_kwargs(sp.loaded))
            times.append((time.perf_counter() - t1) * 1e3)
        hyps = []
        for b in range(0, len(msgs), 8):
            hyps += sp.server.transcribe(msgs[b : b + 8])
        sc = score(refs, hyps, with_similarity=False, keep_errors=True)
        errors[f"server:{mode}"] = {"clean": sc["word_errors"]}
        server_rows.append({"mode": mode, "decoder_bytes": nbytes, "ms_20_tokens": round(float(np.median(times)), 1),
                            "wer_clean": round(sc["wer"], 4), "wer_clean_ci95": sc["wer_ci95"],
                            "wer_points_lost_ci95": points_lost(errors["server:fp32"]["clean"], sc["word_errors"]),
                            "normalizer": sc["normalizer"], "seconds": round(time.time() - t0, 1)})
        print(f"server {mode}: {nbytes / 1e6:.1f} MB  20 tokens {server_rows[-1]['ms_20_tokens']:.0f} ms  "
              f"WER {fmt_ci(sc['wer_ci95'])}", flush=True)

    result = {"model": "whisper-base", "quick": quick, "n_test": n, "family": args.family, "threads": args.threads, "trim_frames": TRIM_FRAMES,
              "normalizer": rows[0]["normalizer"], "interval": INTERVAL,
              "wer_setup": f"identity JSC (codec rows: their own), server decoder {args.backend} "
                           "(int8 CTranslate2 unless torch), content + 300 silence frames, fitted device windows",
              "runs": runs, "host_note": "shared 2-core host: wall p50 noisy; cpu_p50 (1 thread) used for speed-ups",
              "device_half": rows, "server_half": server_rows, "seconds": round(time.time() - t_start, 1)}
    from semedge.compress.plan import write_atomic

    if args.merge and Path(args.out).is_file():
        old = json.loads(Path(args.out).read_text())
        new = {r["setting"] for r in rows if r["setting"] != "fp32" or not only}
        kept = [r for r in old.get("device_half", []) if r["setting"] not in new]
        order = [r["setting"] for r in old.get("device_half", [])]
        merged = kept + [r for r in rows if r["setting"] in new]
        merged.sort(key=lambda r: order.index(r["setting"]) if r["setting"] in order else len(order))
        result["device_half"] = merged
        if args.no_server:
            result["server_half"] = old.get("server_half", [])
        result["merged_from"] = sorted({r.get("run", "earlier") for r in merged})
    write_atomic(args.out, (json.dumps(result, indent=1) + "\n").encode())
    print_table(result)
    print(f"wrote {args.out} in {result['seconds']:.0f} s")
    return 0


INTERVAL = "bootstrap 95% over utterances; points lost vs fp32: paired bootstrap (same utterances and noise)"


def points_lost(fp32_errors, errors) -> dict:
    """WER points lost vs fp32 (100 x paired WER difference) with its paired 95% interval;
    worse: significantly worse than fp32 at 95%."""
    from semedge.semcom.stats import paired_wer_diff

    d = paired_wer_diff(fp32_errors, errors)
    return {**d, "delta": round(100 * d["delta"], 2), "ci95": [round(100 * x, 2) for x in d["ci95"]]}


def fmt_ci(d, digits: int = 3) -> str:
    from semedge.semcom.stats import fmt_ci as f

    return f(d, digits)


def _wer_cell(r: dict, key: str) -> str:
    """'0.376 [0.351, 0.402]', or the bare figure for a row merged from a run without intervals."""
    return fmt_ci(r.get(f"{key}_ci95")) if r.get(f"{key}_ci95") else f"{r[key]:.3f}"


def print_table(res: dict) -> None:
    print(f"n = {res['n_test']} test utterances, text normaliser {res.get('normalizer', 'basic')}; [95% interval]; "
          "lost = WER points vs fp32, paired")
    hdr = (f"{'setting':26} {'MB':>6} {'x small':>7} {'RSS MB':>7} {'5s ms':>7} {'x':>5} {'30s ms':>7} {'x':>5} "
           f"{'WER clean':>21} {'lost':>19} {'WER 10 dB':>21}")
    print(hdr)
    for r in res["device_half"]:
        lost = fmt_ci(r.get("wer_points_lost_ci95"), 1) if r["setting"] != "fp32" else ""
        print(f"{r['setting']:26} {r['bytes'] / 1e6:6.1f} {r['smaller_x']:7.2f} {r['peak_rss_mb'] or 0:7.0f} "
              f"{r['cpu_p50_ms_5s']:7.0f} {r['faster_x_5s']:5.2f} {r['cpu_p50_ms_30s']:7.0f} {r['faster_x_30s']:5.2f} "
              f"{_wer_cell(r, 'wer_clean'):>21} {lost:>19} {_wer_cell(r, 'wer_10dB'):>21}")
    print(f"{'server':12} {'dec MB':>7} {'20 tok ms':>9} {'WER':>21} {'lost':>19}")
    for r in res["server_half"]:
        lost = fmt_ci(r.get("wer_points_lost_ci95"), 1) if r["mode"] != "fp32" else ""
        print(f"{r['mode']:12} {r['decoder_bytes'] / 1e6:7.1f} {r['ms_20_tokens']:9.0f} {_wer_cell(r, 'wer_clean'):>21} {lost:>19}")


if __name__ == "__main__":
    sys.exit(main())
