"""WER against channel uses: the JSC link at several k' vs the conventional link at several
Codec 2 modes and LDPC code rates, at each SNR (AWGN), on whisper-base.

Both receivers run Whisper in CTranslate2 int8: the JSC link with the server's decoder
(its own LoRA-merged weights, from encoder states), the conventional link the unmodified
Whisper on the decoded audio. Writes benchmarks/results/rate_curve.json and .png (one
panel per SNR: WER vs complex channel uses per utterance, one line per system).

  python benchmarks/rate_curve.py            # 200 test utterances, SNR 0 5 10 dB
  python benchmarks/rate_curve.py --quick    # 10 utterances, two configurations
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"
# Codec 2 mode : LDPC rate : bits per QAM symbol
CONVENTIONAL = ("700C:0.5:2", "1200:0.5:2", "1600:0.5:2", "3200:0.5:2", "1600:0.33:2", "1600:0.75:2")


def parse_config(spec: str):
    from semedge.semcom.baseline import BaselineConfig

    parts = spec.split(":")
    try:
        return BaselineConfig(mode=parts[0], rate=float(parts[1]) if len(parts) > 1 else 0.5,
                              bits_per_symbol=int(parts[2]) if len(parts) > 2 else 2)
    except ValueError:
        raise SystemExit(f"--conventional {spec!r}: give MODE[:RATE[:BITS_PER_SYMBOL]], e.g. 1600:0.5:2") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10 utterances, two conventional configurations")
    ap.add_argument("--n", type=int, default=None, help="test utterances (default 200, --quick 10)")
    ap.add_argument("--jsc", default="semcom/assets/whisper-base-jsc-k64", help="a nested codec (its k' <= k are sent)")
    ap.add_argument("--k", default="16,24,32,40,48,64", help="k' values of the JSC curve")
    ap.add_argument("--conventional", default=",".join(CONVENTIONAL), help="MODE:RATE:BITS configurations, comma-separated")
    ap.add_argument("--snr", default="0,5,10", help="AWGN SNRs in dB, comma-separated")
    ap.add_argument("--reuse-conventional", type=Path, default=None,
                    help="take the conventional rows from an earlier run's JSON (same n and SNRs) instead of rerunning them")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "rate_curve.json")
    args = ap.parse_args(argv)
    n = args.n if args.n is not None else (10 if args.quick else 200)
    convs = [parse_config(s) for s in args.conventional.split(",") if s.strip()]
    if args.quick:
        convs = convs[:2]
    snrs = [float(s) for s in args.snr.split(",")]
    ks = [int(k) for k in args.k.split(",")]

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from semedge.semcom.baseline import ConventionalLink
    from semedge.semcom.models import load_model
    from semedge.semcom.tasks.speech import load_split
    from semedge.semcom.train import evaluate_system, score_row, write_json

    t0 = time.perf_counter()
    base = load_model("whisper-base")
    rows = []
    for k in ks:
        for r in evaluate_system("whisper-base", args.jsc, ["awgn"], snrs, k=k, n=n, with_similarity=False,
                                 system="semedge-jsc", backend="ct2", progress=False):
            rows.append(r)
            print(f"jsc k'={k:<3} {r['snr_db']:>4g} dB  uses {r['channel_uses']:6.0f}  WER {r['wer']:.3f}", flush=True)
    utts = load_split("test", n, progress=False)
    refs = [u.text for u in utts]
    if args.reuse_conventional is not None:
        import json

        prev = json.loads(args.reuse_conventional.read_text())
        if prev.get("n_utterances") != n or prev.get("snrs_db") != snrs:
            ap.error(f"--reuse-conventional {args.reuse_conventional}: it ran n={prev.get('n_utterances')} at "
                     f"{prev.get('snrs_db')} dB; this run is n={n} at {snrs} dB")
        rows += [r for r in prev["rows"] if r["system"] == "conventional"]
        convs = []
    asr: dict[str, dict] = {}  # per Codec 2 mode: transcripts by received stream, shared by the code rates
    for cfg in convs:
        link = ConventionalLink(base, cfg, backend="ct2")
        link._asr = asr.setdefault(cfg.mode, {})
        for s in snrs:
            t1 = time.perf_counter()
            hyps, uses, st = link.run(utts, "awgn", s)
            r = {"system": "conventional", "config": cfg.name, "channel": "awgn", "snr_db": s, "n": n,
                 "channel_uses": float(np.mean(uses)), "ber_after_ldpc": st["ber"], "source_bits": st["bits_per_utt"],
                 **score_row(refs, hyps, with_similarity=False)}
            rows.append(r)
            print(f"{cfg.name:<28} {s:>4g} dB  uses {r['channel_uses']:6.0f}  BER {st['ber']:.4f}  WER {r['wer']:.3f}"
                  f"  ({time.perf_counter() - t1:.0f} s)", flush=True)
    out = {"benchmark": "rate_curve", "quick": args.quick, "n_utterances": n, "jsc": args.jsc, "snrs_db": snrs,
           "conventional_reused_from": str(args.reuse_conventional) if args.reuse_conventional else None,
           "receivers": "CTranslate2 int8 for both (JSC: the server's decoder; conventional: unmodified Whisper on decoded audio)",
           "channel_uses": "complex channel uses per utterance (JSC: ceil(real symbols / 2))",
           "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    write_json(out, args.out)
    plot(rows, snrs, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} in {out['seconds']} s")
    return 0


def plot(rows, snrs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(snrs), figsize=(5 * len(snrs), 4), squeeze=False)
    for ax, s in zip(axes[0], snrs):
        jsc = sorted((r for r in rows if r["system"] == "semedge-jsc" and r["snr_db"] == s), key=lambda r: r["channel_uses"])
        ax.plot([r["channel_uses"] for r in jsc], [r["wer"] for r in jsc], "o-", label="JSC (k' = " + ", ".join(str(r["k_sent"]) for r in jsc) + ")")
        for rate in sorted({r["config"].split("+")[1] for r in rows if r["system"] == "conventional"}):
            conv = sorted((r for r in rows if r["system"] == "conventional" and r["snr_db"] == s and f"+{rate}+" in r["config"]),
                          key=lambda r: r["channel_uses"])
            if conv:
                ax.plot([r["channel_uses"] for r in conv], [r["wer"] for r in conv], "s--",
                        label=f"Codec 2 + {rate} (" + ", ".join(r["config"].split("+")[0].removeprefix("codec2-") for r in conv) + ")")
        ax.set_title(f"AWGN {s:g} dB")
        ax.set_xlabel("complex channel uses per utterance")
        ax.set_ylabel("WER")
        ax.set_ylim(0, min(2.0, max(r["wer"] for r in rows) * 1.05))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
