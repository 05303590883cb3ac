"""WER against channel uses: the JSC link at several k' vs the conventional links (Codec 2
at several modes and LDPC code rates; Opus at 6-16 kb/s, where higher-order QAM brings it
down to the budgets it can reach) at each SNR (AWGN), on whisper-base, with bootstrap 95%
intervals.

Both receivers run Whisper in CTranslate2 int8: the JSC link with the server's decoder
(its own LoRA-merged weights, from encoder states), the conventional link the unmodified
Whisper on the decoded audio. Every system runs on the same test utterances. Channel uses
of a conventional link count the LDPC codewords of every bit its source codec wrote (for
Opus the whole Ogg file: page headers, OpusHead, OpusTags). Writes
benchmarks/results/rate_curve.json and .png (one panel per SNR: WER vs complex channel
uses per utterance, one line per system; error bars are the 95% intervals). `paired` holds,
per SNR, each JSC k' against each conventional configuration on the same utterances: the
paired bootstrap 95% interval of WER(conventional) - WER(JSC) (above 0: the JSC link is better).

  python benchmarks/rate_curve.py            # 200 test utterances, SNR 0 5 10 dB
  python benchmarks/rate_curve.py --quick    # 10 utterances, one configuration per source codec
  python benchmarks/rate_curve.py --conventional opus:6k:0.5:2,opus:6k:0.75:4 --snr 10,15,20
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
# codec : setting : LDPC rate : bits per QAM symbol (semcom.baseline.BaselineConfig.parse)
CONVENTIONAL = ("codec2:700C:0.5:2", "codec2:1200:0.5:2", "codec2:1600:0.5:2", "codec2:3200:0.5:2",
                "codec2:1600:0.33:2", "codec2:1600:0.75:2",
                "opus:6k:0.5:2", "opus:8k:0.5:2", "opus:16k:0.5:2", "opus:6k:0.75:2", "opus:6k:0.5:4", "opus:6k:0.75:4")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10 utterances, one conventional configuration per source codec")
    ap.add_argument("--n", type=int, default=None, help="test utterances (default 200, --quick 10)")
    ap.add_argument("--jsc", default="default", help="a nested codec (its k' <= k are sent): folder or default (the shipped codec)")
    ap.add_argument("--k", default="16,24,32,40,48,64", help="k' values of the JSC curve")
    ap.add_argument("--conventional", default=",".join(CONVENTIONAL),
                    help="CODEC:SETTING:LDPC_RATE:BITS_PER_SYMBOL configurations, comma-separated (codecs: codec2, opus)")
    ap.add_argument("--family", default="espeak", help="voice family of the test utterances (tasks.speech.load_split)")
    ap.add_argument("--snr", default="0,5,10", help="AWGN SNRs in dB, comma-separated")
    ap.add_argument("--reuse-conventional", type=Path, default=None,
                    help="take conventional rows from an earlier run's JSON (same n, family, SNRs, normaliser) "
                         "instead of rerunning them; configurations it lacks still run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "rate_curve.json")
    args = ap.parse_args(argv)
    n = args.n if args.n is not None else (10 if args.quick else 200)
    snrs = [float(s) for s in args.snr.split(",")]
    ks = [int(k) for k in args.k.split(",")]

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from semedge.semcom.baseline import BaselineConfig, ConventionalLink, LinkCache
    from semedge.core.errors import UserError
    from semedge.semcom.models import load_model
    from semedge.semcom.stats import fmt_ci
    from semedge.semcom.tasks.speech import load_split
    from semedge.semcom.training.artifacts import write_json
    from semedge.semcom.training.evaluate import evaluate_system, score_row

    try:
        convs = [BaselineConfig.parse(s) for s in args.conventional.split(",") if s.strip()]
        utts = load_split("test", n, progress=False, family=args.family)
    except UserError as e:
        ap.error(f"--conventional / --family: {e}")
    if args.quick:  # the first configuration of each source codec
        convs = list({c.codec: c for c in reversed(convs)}.values())[::-1]
    prev_rows = _previous(args.reuse_conventional, n, args.family, snrs, ap)
    t0 = time.perf_counter()
    base = load_model("whisper-base")
    rows = []
    for k in ks:
        for r in evaluate_system("whisper-base", args.jsc, ["awgn"], snrs, k=k, n=n, with_similarity=False,
                                 system="semedge-jsc", backend="ct2", progress=False, data=utts, keep_errors=True):
            rows.append(r)
            print(f"jsc k'={k:<3} {r['snr_db']:>4g} dB  uses {r['channel_uses']:6.0f}  WER {fmt_ci(r['wer_ci95'])}", flush=True)
    refs = [u.text for u in utts]
    caches: dict[str, LinkCache] = {}  # per source setting: its bits and transcripts, shared by the code rates
    for cfg in convs:
        old = [r for r in prev_rows if r["config"] == cfg.name]
        if {r["snr_db"] for r in old} >= set(snrs):
            rows += [r for r in old if r["snr_db"] in snrs]
            print(f"{cfg.name:<28} reused from {args.reuse_conventional}", flush=True)
            continue
        link = ConventionalLink(base, cfg, backend="ct2", cache=caches.setdefault(cfg.source.label, LinkCache()))
        for s in snrs:
            t1 = time.perf_counter()
            hyps, uses, st = link.run(utts, "awgn", s)
            r = {"system": "conventional", "config": cfg.name, "codec": cfg.codec, "channel": "awgn", "snr_db": s, "n": n,
                 "channel_uses": float(np.mean(uses)), "ber_after_ldpc": st["ber"], "source_bits": st["bits_per_utt"],
                 "container_bits": st["overhead_bits_per_utt"], "lost_utterances": st["lost_utts"],
                 **score_row(refs, hyps, with_similarity=False, keep_errors=True)}
            rows.append(r)
            print(f"{cfg.name:<28} {s:>4g} dB  uses {r['channel_uses']:6.0f}  BER {st['ber']:.4f}  lost {st['lost_utts']:.2f}"
                  f"  WER {fmt_ci(r['wer_ci95'])}  ({time.perf_counter() - t1:.0f} s)", flush=True)
    paired = paired_rows(rows)
    for p in paired:
        print(f"{p['snr_db']:>4g} dB  JSC k'={p['k_sent']:<3} vs {p['config']:<28} WER(conv) - WER(JSC) {fmt_ci(p['diff'])}")
    out = {"benchmark": "rate_curve", "quick": args.quick, "n_utterances": n, "family": args.family, "jsc": args.jsc,
           "snrs_db": snrs,
           "conventional_reused_from": str(args.reuse_conventional) if args.reuse_conventional else None,
           "receivers": "CTranslate2 int8 for both (JSC: the server's decoder; conventional: unmodified Whisper on decoded audio)",
           "channel_uses": "complex channel uses per utterance (JSC: ceil(real symbols / 2); conventional: LDPC "
                           "codewords of every bit the source codec wrote, Ogg/Opus container included, / bits per symbol)",
           "rows": rows, "paired": paired, "seconds": round(time.perf_counter() - t0, 1)}
    write_json(out, args.out)
    plot(rows, snrs, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} in {out['seconds']} s")
    return 0


def paired_rows(rows) -> list[dict]:
    """Each JSC row against each conventional row at the same SNR (both with per-utterance
    errors): {snr_db, k_sent, jsc_uses, config, conv_uses, diff}; diff = WER(conv) - WER(JSC)."""
    from semedge.semcom.stats import paired_wer_diff

    jsc = [r for r in rows if r["system"] == "semedge-jsc" and "word_errors" in r]
    conv = [r for r in rows if r["system"] == "conventional" and "word_errors" in r]
    return [{"snr_db": j["snr_db"], "k_sent": j["k_sent"], "jsc_uses": j["channel_uses"], "config": c["config"],
             "conv_uses": c["channel_uses"], "diff": paired_wer_diff(j["word_errors"], c["word_errors"])}
            for j in jsc for c in conv if c["snr_db"] == j["snr_db"]]


def _previous(path, n: int, family: str, snrs, ap) -> list[dict]:
    """Conventional rows of an earlier run to reuse, checked against this run ([] without --reuse-conventional)."""
    if path is None:
        return []
    import json

    from semedge.semcom.metrics import normalizer_name

    prev = json.loads(path.read_text())
    rows = [r for r in prev.get("rows", []) if r["system"] == "conventional"]
    norm = {r.get("normalizer") for r in rows}
    if prev.get("n_utterances") != n or prev.get("family", "espeak") != family or norm - {normalizer_name()}:
        ap.error(f"--reuse-conventional {path}: it ran n={prev.get('n_utterances')}, family {prev.get('family', 'espeak')}, "
                 f"normaliser {sorted(map(str, norm))}; this run is n={n}, family {family}, normaliser {normalizer_name()}")
    return [r for r in rows if r["snr_db"] in snrs]


def plot(rows, snrs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from semedge.semcom.training.artifacts import ci_yerr

    fig, axes = plt.subplots(1, len(snrs), figsize=(5 * len(snrs), 4), squeeze=False)
    for ax, s in zip(axes[0], snrs):
        jsc = sorted((r for r in rows if r["system"] == "semedge-jsc" and r["snr_db"] == s), key=lambda r: r["channel_uses"])
        ax.errorbar([r["channel_uses"] for r in jsc], [r["wer"] for r in jsc], yerr=ci_yerr(jsc, "wer"), fmt="o-", capsize=2,
                    label="JSC (k' = " + ", ".join(str(r["k_sent"]) for r in jsc) + ")")
        for line in sorted({_line(r["config"]) for r in rows if r["system"] == "conventional"}):
            conv = sorted((r for r in rows if r["system"] == "conventional" and r["snr_db"] == s and _line(r["config"]) == line),
                          key=lambda r: r["channel_uses"])
            if conv:
                ax.errorbar([r["channel_uses"] for r in conv], [r["wer"] for r in conv], yerr=ci_yerr(conv, "wer"),
                            fmt="s--" if line.startswith("codec2") else "^:", capsize=2,
                            label=f"{line} (" + ", ".join(r["config"].split("+")[0].split("-", 1)[1] for r in conv) + ")")
        ax.set_title(f"AWGN {s:g} dB")
        ax.set_xlabel("complex channel uses per utterance (log)")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylabel("WER")
        ax.set_ylim(0, min(2.0, max(r["wer"] for r in rows) * 1.05))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    from semedge.core.files import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def _line(config: str) -> str:
    """One plotted line per source codec, LDPC rate and modulation: "opus-6k+ldpc-0.5+QPSK" -> "opus + ldpc-0.5 + QPSK"."""
    src, rest = config.split("+", 1)
    return src.split("-", 1)[0] + " + " + rest.replace("+", " + ")


if __name__ == "__main__":
    sys.exit(main())
