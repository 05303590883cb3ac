"""SNR sweep: semedge JSC (fixed k and --k auto) vs the conventional link, on whisper-base.

Systems x channels (awgn, rayleigh) x SNR {-5, 0, 5, 10, 15, 20} dB: WER, BLEU,
similarity and complex channel uses per utterance (mean). Writes
benchmarks/results/snr_sweep.json and snr_sweep.png, and prints a table.

  python benchmarks/snr_sweep.py            # 200 test utterances (slow on a small CPU)
  python benchmarks/snr_sweep.py --quick    # 10 utterances, a smoke run
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"
SNRS = (-5.0, 0.0, 5.0, 10.0, 15.0, 20.0)
CHANNELS = ("awgn", "rayleigh")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10 utterances")
    ap.add_argument("--n", type=int, default=None, help="test utterances (default 200, --quick 10)")
    ap.add_argument("--model", default="whisper-base")
    ap.add_argument("--jsc", default="default", help="codec checkpoint folder or 'default'")
    ap.add_argument("--baseline", default="1600", help="Codec 2 mode of the conventional link (LDPC 1/2 + QPSK)")
    ap.add_argument("--no-similarity", action="store_true")
    ap.add_argument("--backend", default="ct2", choices=("ct2", "ct2-float32", "torch"),
                    help="the JSC system's decoder (ct2: the server's default, CTranslate2 int8)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS / "snr_sweep.json")
    args = ap.parse_args(argv)
    n = args.n if args.n is not None else (10 if args.quick else 200)

    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from semedge.semcom.baseline import BaselineConfig, ConventionalLink
    from semedge.semcom.checkpoint import load_for_inference
    from semedge.semcom.models import load_model
    from semedge.semcom.tasks.speech import load_split
    from semedge.semcom.train import evaluate_system, plot_results, score_row, write_json

    t0 = time.perf_counter()
    sim = not args.no_similarity
    rows = []
    base = load_model(args.model)
    _, ck = load_for_inference(base, args.jsc)
    if ck is None:
        print(f"error: {args.model} has no JSC codec (--jsc {args.jsc})", file=sys.stderr)
        return 2
    for k, label in ((None, f"semedge-jsc-k{ck.k}"), ("auto", "semedge-jsc-auto")):
        print(f"== {label}", flush=True)
        rows += evaluate_system(args.model, args.jsc, CHANNELS, SNRS, k=k, n=n, with_similarity=sim, system=label,
                                backend=args.backend)

    cfg = BaselineConfig(mode=args.baseline)
    link = ConventionalLink(base, cfg)
    utts = load_split("test", n)
    refs = [u.text for u in utts]
    print(f"== conventional {cfg.name}", flush=True)
    for ch in CHANNELS:
        for s in SNRS:
            hyps, uses, st = link.run(utts, ch, s)
            row = {"system": f"conventional-{cfg.name}", "channel": ch, "snr_db": s, "n": n,
                   "channel_uses": float(np.mean(uses)), "ber_after_ldpc": st["ber"], "source_bits": st["bits_per_utt"],
                   **score_row(refs, hyps, sim)}
            rows.append(row)
            print(f"  {row['system']} {ch} {s:g} dB: WER {row['wer']:.3f}  BER {st['ber']:.4f}  uses {row['channel_uses']:.0f}",
                  flush=True)
    # the same receiver on clean audio and on error-free Codec 2 (references, no channel)
    clean = {"system": "whisper-clean-audio", "n": n}
    from semedge.semcom.system import unsplit_outputs
    from semedge.semcom.split import build_split

    clean.update(score_row(refs, unsplit_outputs(build_split(base), [u.audio for u in utts]), sim))
    c2, _, _ = link.run(utts, "none", math.inf)
    refs_rows = [clean, {"system": f"codec2-{cfg.mode}-error-free", "n": n, **score_row(refs, c2, sim)}]

    out = {
        "benchmark": "snr_sweep", "quick": args.quick, "n_utterances": n, "model": args.model,
        "jsc_decoder_backend": args.backend,
        "baseline_receiver": "transformers (PyTorch fp32) Whisper on the decoded audio",
        "jsc": {"path": str(ck.path), "k": ck.k, "rate_policy": ck.manifest.get("rate_policy"),
                "trained": {kk: ck.manifest.get(kk) for kk in ("command", "channels", "snr_range_db", "lora", "step")}},
        "baseline": {"name": cfg.name, "codec2_mode": cfg.mode, "ldpc_rate": cfg.rate, "bits_per_symbol": cfg.bits_per_symbol,
                     "ldpc_block_bits": cfg.block_bits, "ldpc_iters": cfg.ldpc_iters,
                     "receiver": "ZF with perfect CSI, APP demapper, 5G LDPC BP (sionna-no-rt), c2dec, unmodified Whisper"},
        "channel_uses": "complex channel uses per utterance (JSC: ceil(real symbols / 2))",
        "references": refs_rows, "rows": rows,
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(out, args.out)
    plot_results(rows, args.out.with_suffix(".png"))
    print(f"\n{'system':<44} {'channel':<9} " + " ".join(f"{s:>6g}" for s in SNRS) + "   uses")
    for key in dict.fromkeys((r["system"], r["channel"]) for r in rows):
        rs = {r["snr_db"]: r for r in rows if (r["system"], r["channel"]) == key}
        print(f"{key[0]:<44} {key[1]:<9} " + " ".join(f"{rs[s]['wer']:6.3f}" for s in SNRS)
              + f"   {np.mean([r['channel_uses'] for r in rs.values()]):.0f}")
    for r in refs_rows:
        print(f"reference {r['system']}: WER {r['wer']:.3f}")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} in {out['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
