"""Device-half latency: PyTorch eager vs ONNX Runtime (ours, optimum's stock export), fp32 and int8.

    python benchmarks/latency.py [--quick]   -> table + benchmarks/results/latency.json

Sections (one function each): `speech` (whisper-base encoder + identity JSC, one 30 s
window, batch 1), `text` (a bart-base-sized random encoder, 128 tokens, batch 1), and
`server` (left for the server half's timing). Every variant is timed in its own
subprocess (PyTorch and ORT thread pools would fight over the cores otherwise), with
warm-up, 2 intra-op threads; medians and p95 in ms. Ratios compare runs of this one
invocation only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "latency.json"
THREADS = 2
SERVER_THREADS = int(os.environ.get("SEMEDGE_SERVER_THREADS", "1"))
TEXT_TOKENS = 128


# ----------------------------------------------------------------------------- models (same weights in every process)


def _whisper_split():
    from semedge.semcom.jsc import JSCCodec, JSCConfig
    from semedge.semcom.models import load_model
    from semedge.semcom.split import build_split

    lm = load_model("whisper-base")
    return build_split(lm, JSCCodec(JSCConfig(lm.d_model, lm.d_model, identity=True)))


def _bart_split():
    """bart-base-sized encoder (d 768, 6 layers, 12 heads, ffn 3072), seeded random weights."""
    import torch
    from transformers import BartConfig, BartModel

    from semedge.semcom.jsc import JSCCodec, JSCConfig
    from semedge.semcom.models import LoadedModel
    from semedge.semcom.split import build_split

    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=1, encoder_attention_heads=12,
                     decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024)
    model = BartModel(cfg).float().eval()
    lm = LoadedModel(model, "text", "random:bart-base-size", "random-seed-0", None, None, 768)
    return build_split(lm, JSCCodec(JSCConfig(768, 768, identity=True)))


def _inputs(section: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if section == "speech":
        return {"input_features": rng.standard_normal((1, 80, 3000)).astype(np.float32) * 0.5}
    ids = rng.integers(4, 50000, (1, TEXT_TOKENS)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


# ----------------------------------------------------------------------------- timing workers (subprocesses)


def _stats(ts: list[float]) -> dict:
    a = np.asarray(ts) * 1000
    return {"median_ms": round(float(np.median(a)), 2), "p95_ms": round(float(np.percentile(a, 95)), 2), "runs": len(ts)}


def _time(fn, runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return ts


def worker_torch(section: str, runs: int, warmup: int, ref_out: str) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    split = _whisper_split() if section == "speech" else _bart_split()
    feeds = _inputs(section)
    args = [torch.from_numpy(v) for v in feeds.values()]
    with torch.inference_mode():
        out = split.device(*args)
        np.save(ref_out, out.numpy())
        ts = _time(lambda: split.device(*args), runs, warmup)
    return _stats(ts)


def worker_ort(section: str, path: str, runs: int, warmup: int, ref_out: str) -> dict:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feeds = {k: v for k, v in _inputs(section).items() if k in {i.name for i in sess.get_inputs()}}
    out = sess.run(None, feeds)[0].astype(np.float64)
    ts = _time(lambda: sess.run(None, feeds), runs, warmup)
    res = _stats(ts)
    if os.path.exists(ref_out):
        ref = np.load(ref_out).astype(np.float64)
        if ref.shape == out.shape:
            res["cosine_vs_torch"] = round(float((ref.ravel() @ out.ravel()) / (np.linalg.norm(ref) * np.linalg.norm(out))), 6)
            res["max_abs_rel_vs_torch"] = float(np.abs(ref - out).max() / np.abs(ref).max())
    return res


def _run_worker(*args: str, timeout: int = 900) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
    p = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, timeout=timeout, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- exports (main process)


def _stock_export(split, section: str, out: Path) -> Path:
    """optimum's own export of the same encoder (its encoder OnnxConfig, as main_export uses for
    the encoder_model.onnx of a seq2seq model; the decoder is not needed here)."""
    from optimum.exporters.onnx import export
    from optimum.exporters.onnx.model_configs import BartOnnxConfig, WhisperOnnxConfig

    model = split.loaded.model
    if section == "speech":
        cfg = WhisperOnnxConfig(model.config, task="automatic-speech-recognition").with_behavior("encoder")
    else:
        cfg = BartOnnxConfig(model.config, task="text2text-generation").with_behavior("encoder")
    export(model.get_encoder(), cfg, out, opset=17)
    return out


def _quantize(src: Path, dst: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8)
    return dst


def _bench_section(section: str, runs: int, warmup: int, work: Path, log) -> dict:
    import torch

    from semedge.export.onnx import export_device_half

    torch.set_num_threads(THREADS)
    log(f"[{section}] building model and exporting")
    split = _whisper_split() if section == "speech" else _bart_split()
    calib = _inputs(section)
    paths = {}
    ours = export_device_half(split, work / f"{section}-ours.onnx", calib_inputs=calib)
    paths["ort_fp32_ours"] = ours.path
    try:
        paths["ort_fp32_stock"] = _stock_export(split, section, work / f"{section}-stock.onnx")
    except Exception as e:  # noqa: BLE001 - recorded in the results
        log(f"[{section}] stock optimum export failed: {e}")
        paths["ort_fp32_stock"] = None
    paths["ort_int8_ours"] = _quantize(paths["ort_fp32_ours"], work / f"{section}-ours-int8.onnx")
    if paths["ort_fp32_stock"] is not None:
        paths["ort_int8_stock"] = _quantize(paths["ort_fp32_stock"], work / f"{section}-stock-int8.onnx")
    del split
    ref = str(work / f"{section}-ref.npy")
    res = {"fused": ours.fused, "parity_fp32": {"max_abs_rel": ours.parity.max_abs_rel, "cosine": ours.parity.cosine}}
    log(f"[{section}] timing pytorch eager")
    res["pytorch_fp32"] = _run_worker("torch", section, str(runs), str(warmup), ref)
    for name, p in paths.items():
        if p is None:
            res[name] = {"error": "stock export failed"}
            continue
        log(f"[{section}] timing {name}")
        res[name] = _run_worker("ort", section, str(p), str(runs), str(warmup), ref)
        res[name]["bytes"] = Path(p).stat().st_size
    res["ratios"] = _ratios(res)
    return res


def _ratios(res: dict) -> dict:
    def med(k):
        return res.get(k, {}).get("median_ms")

    out = {}
    pairs = {"ours_vs_stock_fp32": ("ort_fp32_ours", "ort_fp32_stock"), "ours_vs_stock_int8": ("ort_int8_ours", "ort_int8_stock"),
             "pytorch_vs_ours_fp32": ("pytorch_fp32", "ort_fp32_ours"), "ours_fp32_vs_ours_int8": ("ort_fp32_ours", "ort_int8_ours")}
    for name, (a, b) in pairs.items():
        if med(a) and med(b):
            out[name] = round(med(a) / med(b), 3)
    return out


def speech(runs: int, warmup: int, work: Path, log) -> dict:
    r = _bench_section("speech", runs, warmup, work, log)
    r["setup"] = "whisper-base encoder + identity JSC, input_features [1,80,3000] (30 s window)"
    return r


def text(runs: int, warmup: int, work: Path, log) -> dict:
    r = _bench_section("text", runs, warmup, work, log)
    r["setup"] = f"bart-base-sized random encoder (d 768, 6 layers, 12 heads, ffn 3072) + identity JSC, [1,{TEXT_TOKENS}] tokens"
    return r


def server(quick: bool, log) -> dict:
    """Server half on real speech: ms per generated token and per utterance, ours (PyTorch fp32
    and torch dynamic int8) vs CTranslate2 (int8, fp32) decoding the same encoder states.

    Identity JSC (so CT2's stock weights are the same model), content frames + silence fill,
    greedy, one utterance at a time. Each backend is timed in its own block."""
    import numpy as np
    import torch

    import ctranslate2
    from semedge.compress import quantize_torch
    from semedge.semcom.ct2 import ct2_model_dir
    from semedge.semcom.metrics import score
    from semedge.semcom.models import load_model
    from semedge.semcom.split import build_split
    from semedge.semcom.system import device_encode
    from semedge.semcom.tasks.speech import load_split

    n = 8 if quick else 30
    # One intra-op thread for both backends: on a busy 2-core host two PyTorch threads
    # spin against the other load (measured: 10x slower per token), CT2's pool does not.
    threads = SERVER_THREADS
    torch.set_num_threads(threads)
    utts = load_split("test", n, progress=False)
    refs = [u.text for u in utts]
    split = build_split(load_model("whisper-base"))
    tok = split.loaded.tokenizer
    log(f"server: encoding {n} test utterances")
    msgs = [device_encode(split, [u.audio])[0] for u in utts]
    with torch.no_grad():
        states = [split.server.encoder_states([m])[0][0].numpy() for m in msgs]

    def summary(times, ntoks, hyps):
        per_tok = [t / k for t, k in zip(times, ntoks)]
        sc = score(refs, hyps, with_similarity=False)
        return {"ms_per_token_median": round(1e3 * float(np.median(per_tok)), 2),
                "ms_per_utterance_median": round(1e3 * float(np.median(times)), 1),
                "tokens_mean": round(float(np.mean(ntoks)), 1), "wer": round(sc["wer"], 4), "wer_ci95": sc["wer_ci95"],
                "normalizer": sc["normalizer"], "n": n}

    def ours(sp):  # torch backend, or CTranslate2 when sp.server.ct2 is set (the server's default)
        sp.server.generate([msgs[0]], max_new_tokens=96)  # warm-up
        times, ntoks, hyps = [], [], []
        for m in msgs:
            t0 = time.perf_counter()
            ids = sp.server.generate([m], max_new_tokens=96)[0]
            times.append(time.perf_counter() - t0)
            body = [i for i in (ids.tolist() if hasattr(ids, "tolist") else ids) if i not in tok.all_special_ids]
            ntoks.append(len(body) + 1)  # + end of text
            hyps.append(tok.decode(body).strip())
        return summary(times, ntoks, hyps)

    out = {"setup": f"whisper-base decoder, {n} test utterances, identity JSC, greedy, batch 1, {threads} thread(s)"}
    log("server: ours fp32")
    out["ours_fp32"] = ours(split)
    log("server: ours torch int8")
    out["ours_torch_int8"] = ours(quantize_torch.apply(split, {"mode": "torch_int8"}))
    from semedge.semcom.ct2_backend import CT2Whisper
    from semedge.semcom.jsc import with_tail
    from semedge.semcom.split import identity_codec

    engine = CT2Whisper(split.loaded, "int8", threads=threads)
    for label, tail in (("ours_ct2_int8", None), ("ours_ct2_int8_tail300", 300)):
        log(f"server: {label}")
        sp = build_split(split.loaded, with_tail(identity_codec(split.loaded), tail))
        sp.server.ct2 = engine
        out[label] = ours(sp)
    prompt = ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
    for ct in ("int8", "float32"):
        log(f"server: CTranslate2 {ct}")
        model = ctranslate2.models.Whisper(str(ct2_model_dir("whisper-base")), compute_type=ct, intra_threads=threads)
        model.generate(ctranslate2.StorageView.from_array(states[0][None]), [prompt], max_length=96, beam_size=1)
        times, ntoks, hyps = [], [], []
        for st in states:
            t0 = time.perf_counter()
            r = model.generate(ctranslate2.StorageView.from_array(st[None]), [prompt], max_length=96, beam_size=1)[0]
            times.append(time.perf_counter() - t0)
            ids = [i for i in r.sequences_ids[0] if i not in tok.all_special_ids]
            ntoks.append(len(ids) + 1)
            hyps.append(tok.decode(ids).strip())
        out[f"ct2_{ct}"] = summary(times, ntoks, hyps)
        del model
    out["ratios"] = {"ours_torch_int8_vs_ct2_int8_per_token": round(
        out["ours_torch_int8"]["ms_per_token_median"] / out["ct2_int8"]["ms_per_token_median"], 3),
        "ours_fp32_vs_ct2_int8_per_token": round(
        out["ours_fp32"]["ms_per_token_median"] / out["ct2_int8"]["ms_per_token_median"], 3)}
    for label in ("ours_ct2_int8", "ours_ct2_int8_tail300"):
        out["ratios"][f"{label}_vs_ct2_int8_per_utterance"] = round(
            out[label]["ms_per_utterance_median"] / out["ct2_int8"]["ms_per_utterance_median"], 3)
    return out


def print_server(r: dict) -> None:
    if "setup" not in r:
        return
    print(f"\nserver: {r['setup']}")
    print(f"{'backend':18} {'ms/token':>9} {'ms/utt':>8} {'tokens':>7} {'WER':>6}")
    for k in ("ours_fp32", "ours_torch_int8", "ours_ct2_int8", "ours_ct2_int8_tail300", "ct2_int8", "ct2_float32"):
        if k not in r:
            continue
        x = r[k]
        print(f"{k:18} {x['ms_per_token_median']:9.1f} {x['ms_per_utterance_median']:8.0f} {x['tokens_mean']:7.1f} {x['wer']:6.3f}")
    print("ratios:", r["ratios"])


# ----------------------------------------------------------------------------- output


GOALS = {"ours_vs_stock_fp32": ("<=", 1.0), "ours_vs_stock_int8": ("<=", 1.0), "pytorch_vs_ours_fp32": (">=", 1.15)}


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    for sec in ("speech", "text"):
        r = results.get(sec)
        if not r:
            continue
        t = Table(title=f"{sec}: {r['setup']}")
        for c in ("variant", "median ms", "p95 ms", "MB", "cos vs torch"):
            t.add_column(c, justify="right" if c != "variant" else "left")
        for v in ("pytorch_fp32", "ort_fp32_ours", "ort_fp32_stock", "ort_int8_ours", "ort_int8_stock"):
            x = r.get(v, {})
            if "error" in x:
                t.add_row(v, x["error"], "", "", "")
                continue
            if not x:
                continue
            t.add_row(v, f"{x['median_ms']:.1f}", f"{x['p95_ms']:.1f}", f"{x['bytes'] / 1e6:.1f}" if "bytes" in x else "",
                      f"{x['cosine_vs_torch']:.5f}" if "cosine_vs_torch" in x else "")
        con.print(t)
        for name, val in r["ratios"].items():
            goal = GOALS.get(name)
            mark = ""
            if goal:
                ok = val <= goal[1] if goal[0] == "<=" else val >= goal[1]
                mark = f"  (goal {goal[0]} {goal[1]}: {'met' if ok else 'NOT met'})"
            con.print(f"  {name}: {val:.3f}{mark}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer runs (finishes in a few minutes)")
    ap.add_argument("--sections", default="speech,text,server", help="comma list of speech,text,server")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        kind, *rest = a.worker
        if kind == "torch":
            sec, runs, warm, ref = rest
            res = worker_torch(sec, int(runs), int(warm), ref)
        else:
            sec, path, runs, warm, ref = rest
            res = worker_ort(sec, path, int(runs), int(warm), ref)
        print(json.dumps(res))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    plan = {"speech": (5, 1) if a.quick else (20, 2), "text": (10, 2) if a.quick else (50, 5)}
    results = {"host": {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
                        "threads": THREADS, "load_avg_start": os.getloadavg()},
               "quick": a.quick, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="semedge-latency-") as tmp:
        for sec in a.sections.split(","):
            if sec == "server":
                continue
            runs, warm = plan[sec]
            results[sec] = {"speech": speech, "text": text}[sec](runs, warm, Path(tmp), log)
    if "server" in a.sections.split(","):
        results["server"] = server(a.quick, log)
    results["host"]["load_avg_end"] = os.getloadavg()
    results["seconds"] = round(time.time() - t0, 1)
    from semedge.core.files import write_atomic

    write_atomic(RESULTS, json.dumps(results, indent=2, default=str) + "\n")
    print_table(results)
    print_server(results.get("server", {}))
    print(f"wrote {RESULTS} ({results['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
