"""Which parts of Whisper's device half hold 8-bit activations: A8W8 QDQ variants screened by the
cosine of their symbols to the fp32 fixed-shape graph, then the WER of packages through the link.

1. `semedge export --device android-mid --format fp32` (fixed [1, 80, 3000], the default codec);
2. each variant in VARIANTS: quantize_onnx int8_static (uint8 activations, minmax, calibrated on
   8 train utterances as the export does), cosine to fp32 on --n-val held-out val utterances;
3. with --wer N: `semedge export --device android-mid` (the qdq_a8w8 kind) and the fp32 package,
   each through DeviceRunner (1 thread) -> AWGN (seed 1000 + i, the same for both) -> a real
   in-process server, on N test sentences of the voices mix: WER and the paired difference.
Writes benchmarks/results/nnapi_a8w8.json.

    python benchmarks/a8w8.py [--variants a,b] [--wer 100]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
MM = ["MatMul", "Gemm", "Conv"]
ATT, FC2, FIRST = "attention_matmuls", "ffn_out", r"layers\.0[./]"
VARIANTS = {  # name -> (op_types, keep_fp32)
    "all_ops": ([], ["jsc"]),
    "mm_conv": (MM, ["jsc"]),
    "mm_conv+att": (MM, ["jsc", ATT]),
    "mm_conv+att+fc2": (MM, ["jsc", ATT, FC2]),
    "mm_conv+att+fc2+first": (MM, ["jsc", ATT, FC2, FIRST]),
    "mm_conv+att+fc2+frontend": (MM, ["jsc", "frontend", ATT, FC2]),
    "mm_conv+att+fc2+first+frontend": (MM, ["jsc", "frontend", FIRST, ATT, FC2]),
    "mm_conv+att+fc2+critical": (MM, ["critical", ATT, FC2]),
}


def export(out: Path, fmt: str | None) -> Path:
    args = [str(Path(sys.executable).parent / "semedge"), "export", "--model", "whisper-base", "--device", "android-mid",
            "--out", str(out)]
    subprocess.run(args + (["--format", fmt] if fmt else []), check=True)
    return out


def _session(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def screen(fp32: Path, names: list[str], n_val: int, tmp: Path) -> dict:
    from semedge.compress import quantize_onnx
    from semedge.compress.targets import builtin_calibration
    from semedge.runtime.evaluate import speech_features
    from semedge.semcom.models import load_model
    from semedge.semcom.tasks.speech import load_split

    loaded = load_model("whisper-base")
    calib = builtin_calibration(loaded)
    val = list(speech_features(loaded, load_split("val", n_val, progress=False)))

    def run(path):
        s = _session(path)
        return [s.run(None, {s.get_inputs()[0].name: v[None].astype(np.float32)})[0] for v in val]

    ref, out = run(fp32), {}
    for name in names:
        ops, keep = VARIANTS[name]
        cfg = {"mode": "int8_static", "activations": "uint8", "op_types": ops, "keep_fp32": keep}
        q = quantize_onnx.apply(fp32, tmp / f"{len(out)}.onnx", cfg, calib=calib)
        cos = [float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(ref, run(q))]
        out[name] = {"config": cfg, "cos_min": min(cos), "cos_mean": float(np.mean(cos)), "mb": q.stat().st_size / 1e6}
        print(f"{name:34s} cosine {np.mean(cos):.4f} (min {min(cos):.4f})  {out[name]['mb']:.1f} MB", flush=True)
    return out


def wer_rows(pkgs: dict[str, Path], n: int) -> dict:
    from semedge.runtime.client import make_client, send
    from semedge.runtime.link import make_channel
    from semedge.runtime.package import Package
    from semedge.runtime.runner import DeviceRunner
    from semedge.runtime.server import create_app, serve_in_thread
    from semedge.semcom.metrics import word_errors_per_utt
    from semedge.semcom.models import load_model
    from semedge.semcom.stats import fmt_ci, paired_wer_diff, wer_ci
    from semedge.semcom.tasks.speech import load_split

    utts = load_split("test", n, family="mix", progress=False)
    refs, loaded, ch = [u.text for u in utts], load_model("whisper-base"), make_channel("awgn")
    msgs = {k: [DeviceRunner(p, threads=1).encode_audio(np.asarray(u.audio, np.float32)) for u in utts] for k, p in pkgs.items()}
    P = {k: Package.load(p) for k, p in pkgs.items()}
    rows = {}
    with serve_in_thread(create_app(list(P.values()), loader=lambda s: loaded)) as url, make_client(300.0) as c:
        for snr in ("clean", 10.0):
            pairs = {}
            for k, pkg in P.items():
                ys = [m if snr == "clean" else ch.transmit(m[None], snr, np.random.default_rng(1000 + i))[0]
                      for i, m in enumerate(msgs[k])]
                hyps = [send(url, pkg.package_id, y.astype(np.float32), timeout=300.0, client=c)["text"][0] for y in ys]
                pairs[k] = word_errors_per_utt(refs, hyps)
                rows[f"{k}@{snr}"] = {"wer": wer_ci(pairs[k])}
            d = paired_wer_diff(pairs["fp32"], pairs["qdq_a8w8"])
            rows[f"qdq_a8w8@{snr}"]["minus_fp32"] = d
            print(f"{snr}: fp32 {fmt_ci(rows[f'fp32@{snr}']['wer'])}  qdq_a8w8 {fmt_ci(rows[f'qdq_a8w8@{snr}']['wer'])}"
                  f"  difference {fmt_ci(d, scale=100)} points", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from VARIANTS")
    ap.add_argument("--n-val", type=int, default=6, help="held-out val utterances for the cosine")
    ap.add_argument("--wer", type=int, default=0, help="test sentences for the package WER (0: skip)")
    ap.add_argument("--out", type=Path, default=RESULTS / "nnapi_a8w8.json")
    a = ap.parse_args(argv)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="semedge-a8w8-") as td:
        tmp = Path(td)
        fp32 = export(tmp / "fp32", "fp32")
        res = {"benchmark": "a8w8", "model": "whisper-base + the shipped default codec",
               "screen": screen(fp32 / "device.onnx", a.variants.split(","), a.n_val, tmp)}
        if a.wer:
            res["wer"] = {"n": a.wer, "rows": wer_rows({"fp32": fp32, "qdq_a8w8": export(tmp / "a8", None)}, a.wer)}
    res["seconds"] = round(time.time() - t0, 1)
    from semedge.core.files import write_atomic

    write_atomic(a.out, json.dumps(res, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
