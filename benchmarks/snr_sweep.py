"""SNR sweep: semedge JSC (fixed k and --k auto) vs the conventional link, on whisper-base.

Systems x channels (awgn, rayleigh) x SNR {-5, 0, 5, 10, 15, 20} dB: WER, BLEU,
similarity and complex channel uses per utterance (mean). Writes
benchmarks/results/snr_sweep.json and snr_sweep.png, and prints a table.

  python benchmarks/snr_sweep.py            # 200 test utterances (slow on a small CPU)
  python benchmarks/snr_sweep.py --quick    # 10 utterances, a smoke run
  python benchmarks/snr_sweep.py --extra-k 16,32 --reuse-baseline benchmarks/results/snr_sweep.json
                                            # more JSC widths; the conventional rows from the last run
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
    ap.add_argument("--extra-k", default="", help="also send these fixed k' (comma-separated, <= the codec's k)")
    ap.add_argument("--reuse-baseline", type=Path, default=None,
                    help="take the conventional link's rows from an earlier run's JSON (same n and mode) instead of rerunning it")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS / "snr_sweep.json")
    args = ap.parse_args(argv)
    n = args.n if args.n is not None else (10 if args.quick else 200)

    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from semedge.semcom.baseline import BaselineConfig
    from semedge.semcom.checkpoint import load_for_inference
    from semedge.semcom.models import load_model
    from semedge.semcom.train import evaluate_system, plot_results, write_json

    t0 = time.perf_counter()
    sim = not args.no_similarity
    rows = []
    base = load_model(args.model)
    _, ck = load_for_inference(base, args.jsc)
    if ck is None:
        print(f"error: {args.model} has no JSC codec (--jsc {args.jsc})", file=sys.stderr)
        return 2
    try:
        extra = [int(x) for x in args.extra_k.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--extra-k {args.extra_k!r}: give whole numbers, e.g. 16,32")
    systems = [(None, f"semedge-jsc-k{ck.k}"), ("auto", "semedge-jsc-auto")] + [(kk, f"semedge-jsc-k{ck.k}-send{kk}") for kk in extra]
    for k, label in systems:
        print(f"== {label}", flush=True)
        rows += evaluate_system(args.model, args.jsc, CHANNELS, SNRS, k=k, n=n, with_similarity=sim, system=label,
                                backend=args.backend)

    cfg = BaselineConfig(mode=args.baseline)
    if args.reuse_baseline is not None:
        import json

        prev = json.loads(args.reuse_baseline.read_text())
        if prev.get("n_utterances") != n or prev.get("baseline", {}).get("codec2_mode") != cfg.mode:
            ap.error(f"--reuse-baseline {args.reuse_baseline}: it ran n={prev.get('n_utterances')}, mode "
                     f"{prev.get('baseline', {}).get('codec2_mode')}; this run is n={n}, mode {cfg.mode}")
        rows += [r for r in prev["rows"] if r["system"].startswith("conventional-")]
        refs_rows = prev["references"]
        print(f"== conventional {cfg.name}: rows reused from {args.reuse_baseline}", flush=True)
    else:
        rows_c, refs_rows = _baseline(base, cfg, n, sim)
        rows += rows_c
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
        "baseline_reused_from": str(args.reuse_baseline) if args.reuse_baseline else None,
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


def _baseline(base, cfg, n: int, sim: bool):
    """The conventional link's rows, plus the receiver on clean audio and on error-free Codec 2."""
    import numpy as np

    from semedge.semcom.baseline import ConventionalLink
    from semedge.semcom.split import build_split
    from semedge.semcom.system import unsplit_outputs
    from semedge.semcom.tasks.speech import load_split
    from semedge.semcom.train import score_row

    link = ConventionalLink(base, cfg)
    utts = load_split("test", n)
    refs = [u.text for u in utts]
    rows = []
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
    clean = {"system": "whisper-clean-audio", "n": n}
    clean.update(score_row(refs, unsplit_outputs(build_split(base), [u.audio for u in utts]), sim))
    c2, _, _ = link.run(utts, "none", math.inf)
    return rows, [clean, {"system": f"codec2-{cfg.mode}-error-free", "n": n, **score_row(refs, c2, sim)}]


if __name__ == "__main__":
    sys.exit(main())
