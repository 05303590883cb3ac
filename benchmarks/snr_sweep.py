"""SNR sweep: semedge JSC (fixed k and --k auto) vs the conventional links, on whisper-base.

Systems x channels (awgn, rayleigh) x SNR {-5, 0, 5, 10, 15, 20} dB: WER, BLEU,
similarity (each with its bootstrap 95% interval) and complex channel uses per
utterance (mean). The conventional links (semcom/baseline.py: a source codec + 5G LDPC
1/2 + QPSK, then the unmodified Whisper on the decoded audio) are Codec 2 1600 and
Opus 8 kb/s by default (`--baseline`). Every system runs on the same test utterances.
Writes benchmarks/results/snr_sweep.json and snr_sweep.png, and prints a table.

  python benchmarks/snr_sweep.py            # 200 test utterances (slow on a small CPU)
  python benchmarks/snr_sweep.py --quick    # 10 utterances, a smoke run
  python benchmarks/snr_sweep.py --baseline codec2:1600,opus:6k,opus:16k --family mix
  python benchmarks/snr_sweep.py --extra-k 16,32 --reuse-baseline benchmarks/results/snr_sweep.json
                                            # more JSC widths; the conventional rows from the last run
  python benchmarks/snr_sweep.py --family mix --n 100 --snr -5,0,5,10,20 --baseline-backend ct2
                                            # fewer points; Whisper in CTranslate2 on both links
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
    ap.add_argument("--baseline", default="codec2:1600,opus:8k",
                    help="conventional links, CODEC[:SETTING] comma-separated (codec2: modes 3200 ... 700C; "
                         "opus: 6k ... 16k b/s); LDPC 1/2 + QPSK")
    ap.add_argument("--snr", default=",".join(f"{s:g}" for s in SNRS), help="SNRs in dB, comma-separated")
    ap.add_argument("--channels", default=",".join(CHANNELS), help="awgn, rayleigh or both")
    ap.add_argument("--baseline-backend", default="torch", choices=("torch", "ct2"),
                    help="the conventional link's Whisper: transformers fp32 (torch) or CTranslate2 int8 (ct2, "
                         "the JSC receiver's default)")
    ap.add_argument("--family", default="espeak", help="voice family of the test utterances (tasks.speech.load_split)")
    ap.add_argument("--no-similarity", action="store_true")
    ap.add_argument("--backend", default="ct2", choices=("ct2", "ct2-float32", "torch"),
                    help="the JSC system's decoder (ct2: the server's default, CTranslate2 int8)")
    ap.add_argument("--extra-k", default="", help="also send these fixed k' (comma-separated, <= the codec's k)")
    ap.add_argument("--reuse-baseline", type=Path, default=None,
                    help="take conventional rows from an earlier run's JSON (same n, family and normaliser) "
                         "instead of rerunning them; links it lacks still run")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS / "snr_sweep.json")
    args = ap.parse_args(argv)
    n = args.n if args.n is not None else (10 if args.quick else 200)
    try:
        snrs = tuple(float(x) for x in args.snr.split(",") if x.strip())
    except ValueError:
        ap.error(f"--snr {args.snr!r}: give numbers in dB, e.g. -5,0,10")
    chans = tuple(c.strip() for c in args.channels.split(",") if c.strip())
    if not snrs or not chans or set(chans) - set(CHANNELS):
        ap.error(f"--snr {args.snr!r} --channels {args.channels!r}: give at least one SNR and channels from {CHANNELS}")

    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from semedge.semcom.baseline import BaselineConfig
    from semedge.semcom.checkpoint import load_for_inference
    from semedge.core.errors import UserError
    from semedge.semcom.models import load_model
    from semedge.semcom.stats import fmt_ci
    from semedge.semcom.tasks.speech import load_split
    from semedge.semcom.training.artifacts import plot_results, write_json
    from semedge.semcom.training.evaluate import evaluate_system

    try:
        cfgs = [BaselineConfig.parse(b) for b in args.baseline.split(",") if b.strip()]
        utts = load_split("test", n, family=args.family)
    except UserError as e:
        ap.error(f"{e}")
    prev = _previous(args.reuse_baseline, n, args.family, args.baseline_backend, ap)

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
        rows += evaluate_system(args.model, args.jsc, chans, snrs, k=k, n=n, with_similarity=sim, system=label,
                                backend=args.backend, data=utts)

    refs_rows = [_clean_reference(base, utts, sim)]
    for cfg in cfgs:
        reused = _reused(prev, cfg, chans, snrs)
        if reused:
            print(f"== conventional {cfg.name}: rows reused from {args.reuse_baseline}", flush=True)
            rows_c, ref = reused
        else:
            rows_c, ref = _baseline(base, cfg, utts, sim, chans, snrs, args.baseline_backend)
        rows += rows_c
        refs_rows.append(ref)
    out = {
        "benchmark": "snr_sweep", "quick": args.quick, "n_utterances": n, "model": args.model,
        "jsc_decoder_backend": args.backend,
        "baseline_receiver": {"torch": "transformers (PyTorch fp32)", "ct2": "CTranslate2 int8"}[args.baseline_backend]
                             + " Whisper on the decoded audio", "baseline_backend": args.baseline_backend,
        "snrs_db": list(snrs), "channels": list(chans),
        "jsc": {"path": str(ck.path), "k": ck.k, "rate_policy": ck.manifest.get("rate_policy"),
                "trained": {kk: ck.manifest.get(kk) for kk in ("command", "channels", "snr_range_db", "lora", "step")}},
        "family": args.family,
        "baselines": [{"name": c.name, "codec": c.codec, "setting": c.mode, "ldpc_rate": c.rate,
                       "bits_per_symbol": c.bits_per_symbol, "ldpc_block_bits": c.block_bits, "ldpc_iters": c.ldpc_iters}
                      for c in cfgs],
        "baseline_receiver_chain": "ZF with perfect CSI, APP demapper, 5G LDPC BP (sionna-no-rt), source decoder "
                                   "(c2dec; libsndfile Ogg/Opus: pages failing their CRC dropped, no audio = empty "
                                   "transcript), unmodified Whisper",
        "channel_uses": "complex channel uses per utterance (JSC: ceil(real symbols / 2); conventional: LDPC "
                        "codewords of every bit the source codec wrote, Ogg/Opus container included, / bits per symbol)",
        "baseline_reused_from": str(args.reuse_baseline) if args.reuse_baseline else None,
        "references": refs_rows, "rows": rows,
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(out, args.out)
    plot_results(rows, args.out.with_suffix(".png"))
    print(f"\nWER [95% CI] ({rows[0].get('normalizer', '?')} normaliser)")
    print(f"{'system':<44} {'channel':<9} " + " ".join(f"{s:>18g}" for s in snrs) + "   uses")
    for key in dict.fromkeys((r["system"], r["channel"]) for r in rows):
        rs = {r["snr_db"]: r for r in rows if (r["system"], r["channel"]) == key}
        print(f"{key[0]:<44} {key[1]:<9} " + " ".join(f"{fmt_ci(rs[s].get('wer_ci95'), 2):>18}" for s in snrs)
              + f"   {np.mean([r['channel_uses'] for r in rs.values()]):.0f}")
    for r in refs_rows:
        print(f"reference {r['system']}: WER {fmt_ci(r.get('wer_ci95'))}")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} in {out['seconds']} s")
    return 0


def _baseline(base, cfg, utts, sim: bool, chans, snrs, backend: str):
    """One conventional link's rows (chans x snrs), and the receiver on its error-free audio."""
    import numpy as np

    from semedge.semcom.baseline import ConventionalLink
    from semedge.semcom.stats import fmt_ci
    from semedge.semcom.training.evaluate import score_row

    link = ConventionalLink(base, cfg, backend=backend)
    refs = [u.text for u in utts]
    rows = []
    print(f"== conventional {cfg.name}", flush=True)
    for ch in chans:
        for s in snrs:
            hyps, uses, st = link.run(utts, ch, s)
            row = {"system": f"conventional-{cfg.name}", "channel": ch, "snr_db": s, "n": len(utts),
                   "channel_uses": float(np.mean(uses)), "ber_after_ldpc": st["ber"], "source_bits": st["bits_per_utt"],
                   "container_bits": st["overhead_bits_per_utt"], "lost_utterances": st["lost_utts"],
                   **score_row(refs, hyps, sim, keep_errors=True)}
            rows.append(row)
            print(f"  {row['system']} {ch} {s:g} dB: WER {fmt_ci(row['wer_ci95'])}  BER {st['ber']:.4f}  "
                  f"lost {st['lost_utts']:.2f}  uses {row['channel_uses']:.0f}", flush=True)
    clean, _, st = link.run(utts, "none", math.inf)
    return rows, {"system": f"{cfg.source.label}-error-free", "n": len(utts), "source_bits": st["bits_per_utt"],
                  "container_bits": st["overhead_bits_per_utt"], **score_row(refs, clean, sim, keep_errors=True)}


def _clean_reference(base, utts, sim: bool) -> dict:
    """The unsplit Whisper on the clean audio."""
    from semedge.semcom.split import build_split
    from semedge.semcom.system import unsplit_outputs
    from semedge.semcom.training.evaluate import score_row

    hyps = unsplit_outputs(build_split(base), [u.audio for u in utts])
    return {"system": "whisper-clean-audio", "n": len(utts), **score_row([u.text for u in utts], hyps, sim, keep_errors=True)}


def _previous(path, n: int, family: str, backend: str, ap) -> dict | None:
    """An earlier run's JSON to reuse conventional rows from, checked against this run."""
    if path is None:
        return None
    import json

    from semedge.semcom.metrics import normalizer_name

    prev = json.loads(path.read_text())
    norm = {r.get("normalizer") for r in prev.get("rows", [])}
    was = (prev.get("n_utterances"), prev.get("family", "espeak"), norm, prev.get("baseline_backend", "torch"))
    if was != (n, family, {normalizer_name()}, backend):
        ap.error(f"--reuse-baseline {path}: it ran n={was[0]}, family {was[1]}, normaliser {sorted(map(str, norm))}, "
                 f"receiver {was[3]}; this run is n={n}, family {family}, normaliser {normalizer_name()}, receiver {backend}")
    return prev


def _reused(prev: dict | None, cfg, chans, snrs):
    """(rows, error-free reference) of `cfg` from an earlier run, or None when it lacks any of them."""
    if prev is None:
        return None
    rows = [r for r in prev["rows"] if r["system"] == f"conventional-{cfg.name}"]
    ref = [r for r in prev.get("references", []) if r["system"] == f"{cfg.source.label}-error-free"]
    have = {(r["channel"], r["snr_db"]) for r in rows}
    if not ref or any((ch, s) not in have for ch in chans for s in snrs):
        return None
    return [r for r in rows if r["channel"] in chans and r["snr_db"] in snrs], ref[0]


if __name__ == "__main__":
    sys.exit(main())
