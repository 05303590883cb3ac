"""The log-mel front end in the graph (`semedge export --frontend graph`) against today's numpy one.

Builds two host fp32 packages of the model (default codec), one per front end, and runs N built-in
test utterances (load_split("test", N, family="mix")) through each:
- log-mel: the graph front end alone vs runtime.features.log_mel and vs the model's
  WhisperFeatureExtractor (max |Δ| over each utterance's fit window), and its time vs numpy's;
- symbols: DeviceRunner on each package (PCM vs log-mel in), max |Δ| and time per utterance;
- transcripts: each package's symbols through a real server in this process (no channel noise),
  identical texts out of N, WER of each.
Prints a table, writes benchmarks/results/frontend.json.

    python benchmarks/frontend.py [--model whisper-base] [--n 50]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def build_packages(model: str, root: Path) -> tuple[object, dict[str, Path]]:
    """(loaded model, {"numpy": package, "graph": package}): host fp32, unfused, default codec."""
    from semedge.compress.targets import build_target_package, package_kind
    from semedge.runtime.profiles import load_profile
    from semedge.semcom.checkpoint import device_encoder, load_for_inference
    from semedge.semcom.models import load_source
    from semedge.semcom.split import build_split

    loaded, ckpt = load_for_inference(load_source(model), None)
    split = build_split(loaded, ckpt.codec if ckpt is not None else None, encoder=device_encoder(ckpt))
    prof = load_profile("host")
    out = {}
    for fe in ("numpy", "graph"):
        kind = dataclasses.replace(package_kind(prof, "fp32", frontend=fe), fused=False)
        t = time.perf_counter()
        out[fe] = build_target_package(split, prof, kind, root / fe)
        print(f"{fe} package built in {time.perf_counter() - t:.0f} s", flush=True)
    return loaded, out


def log_mel_figures(loaded, utts) -> dict:
    """The graph front end alone vs numpy log_mel and the WhisperFeatureExtractor, and its time."""
    import onnxruntime as ort

    from semedge.core.frames import window_frames
    from semedge.export import frontend as fe
    from semedge.runtime.features import log_mel

    front, filters = fe.params(loaded)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(fe.standalone(front, filters).SerializeToString(), so, providers=["CPUExecutionProvider"])
    d_np, d_hf, t_graph, t_np, n_diff, n_all = [], [], [], [], 0, 0
    for u in utts:
        a = np.asarray(u.audio, dtype=np.float32)
        w = window_frames(a.size)
        t = time.perf_counter()
        got = sess.run(None, {fe.INPUT: a[None]})[0][0]
        t_graph.append(time.perf_counter() - t)
        t = time.perf_counter()
        ref = log_mel(a)[:, :w]
        t_np.append(time.perf_counter() - t)
        hf = loaded.feature_extractor([a], sampling_rate=16000, return_tensors="np").input_features[0][:, :w]
        d_np.append(float(np.abs(got - ref).max()))
        n_diff, n_all = n_diff + int((got != ref).sum()), n_all + got.size
        d_hf.append(float(np.abs(got - hf).max()))
    return {"max_abs_vs_numpy": max(d_np), "max_abs_vs_transformers": max(d_hf),
            "numpy_vs_transformers_note": "runtime.features.log_mel is float64; transformers' extractor differs from it too",
            "median_abs_vs_numpy": float(np.median(d_np)), "values_not_bit_equal_to_numpy": [n_diff, n_all], "ms_graph_median": round(1000 * float(np.median(t_graph)), 1),
            "ms_numpy_median": round(1000 * float(np.median(t_np)), 1)}


def encode_all(packages: dict[str, Path], utts) -> tuple[dict, dict]:
    """Symbols per package (DeviceRunner, 1 thread) and the median ms per utterance."""
    from semedge.runtime.runner import DeviceRunner

    msgs, ms = {}, {}
    for fe, path in packages.items():
        runner, times, out = DeviceRunner(path, threads=1), [], []
        for u in utts:
            t = time.perf_counter()
            out.append(runner.encode_audio(np.asarray(u.audio, dtype=np.float32)))
            times.append(time.perf_counter() - t)
        msgs[fe], ms[fe] = out, round(1000 * float(np.median(times)), 1)
    return msgs, ms


def transcripts(loaded, packages: dict[str, Path], msgs: dict) -> dict[str, list[str]]:
    """Each package's messages decoded by a real server (HTTP, in this process), no channel noise."""
    from semedge.runtime.client import make_client, send
    from semedge.runtime.package import Package
    from semedge.runtime.server import create_app, serve_in_thread

    pkgs = {fe: Package.load(p) for fe, p in packages.items()}
    server = serve_in_thread(create_app(list(pkgs.values()), loader=lambda s: loaded))
    texts = {}
    with server as url, make_client(120.0) as c:
        for fe, pkg in pkgs.items():
            texts[fe] = [send(url, pkg.package_id, m, timeout=120.0, client=c)["text"][0] for m in msgs[fe]]
    return texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="whisper-base")
    ap.add_argument("--n", type=int, default=50, help="test utterances")
    ap.add_argument("--out", type=Path, default=RESULTS / "frontend.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from semedge.core.files import write_atomic
    from semedge.semcom.metrics import wer
    from semedge.semcom.tasks.speech import load_split

    utts = load_split("test", args.n, family="mix", progress=False)
    with tempfile.TemporaryDirectory(prefix="semedge-frontend-") as tmp:
        loaded, packages = build_packages(args.model, Path(tmp))
        mel = log_mel_figures(loaded, utts)
        msgs, ms = encode_all(packages, utts)
        texts = transcripts(loaded, packages, msgs)
    refs = [u.text for u in utts]
    same = sum(a == b for a, b in zip(texts["numpy"], texts["graph"]))
    sym = max(float(np.abs(a - b).max()) for a, b in zip(msgs["numpy"], msgs["graph"]))
    res = {"benchmark": "frontend", "model": args.model, "n": len(utts), "split": "test, family=mix",
           "package": "host fp32, unfused, default codec; DeviceRunner 1 thread; server in process, channel none",
           "log_mel": mel, "symbols_max_abs": sym, "device_ms_median": ms,
           "transcripts_identical": same, "wer": {fe: round(wer(refs, t), 4) for fe, t in texts.items()},
           "differing": [{"i": i, "numpy": a, "graph": b} for i, (a, b) in enumerate(zip(texts["numpy"], texts["graph"])) if a != b],
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()}}
    print(f"log-mel max|Δ| graph vs numpy {mel['max_abs_vs_numpy']:.2e}, vs transformers {mel['max_abs_vs_transformers']:.2e}"
          f" ({len(utts)} utterances); front end {mel['ms_graph_median']} ms graph, {mel['ms_numpy_median']} ms numpy")
    print(f"symbols max|Δ| {sym:.2e}; device ms/utt numpy {ms['numpy']}, graph {ms['graph']}")
    print(f"transcripts identical {same}/{len(utts)}; WER numpy {res['wer']['numpy']}, graph {res['wer']['graph']}")
    write_atomic(args.out, json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
