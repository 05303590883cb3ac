"""Importance-aware vs uniform rate at equal channel uses (semcom/importance.py).

Uniform: every frame sends the first `budget` symbols of a nested codec (what `--k auto` does,
with the budget as its k). Importance: a per-frame k_t on the codec's ladder (rate_min, 2
rate_min, ..., k), chosen at the device from the code itself, spending at most the same symbols
per message including the layout header (2 bits per frame for a 4-step ladder, BPSK under a
rate-1/4 code = 8 real symbols per frame). Per SNR: corpus WER with its bootstrap 95% interval,
the paired difference importance - uniform (same utterances; negative = importance better),
the channel uses each spent, and how many frames got each k'. Reference row: unsplit
whisper-base (identity codec, clean). Writes benchmarks/results/importance_rate.json.

  python benchmarks/importance_rate.py --jsc runs/msg512-mix --family piper --n 100 --budget 256
  python benchmarks/importance_rate.py --quick      # 10 utterances, to see it run
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


def trained_on(ck) -> str:
    """The codec's training voices, from its manifest (e.g. 'mix', 'mix-piper')."""
    return (ck.manifest.get("train_config") or {}).get("voices", "espeak")


def held_out(voices: str, family: str) -> bool:
    if voices == "mix" or voices.startswith("mix-"):
        return family in voices[4:].split("-")
    return family not in voices.split("+")


def policy_for(ck, budget: int, code_rate: float):
    from semedge.core.errors import UserError
    from semedge.semcom.importance import ImportanceRate, ladder

    lo = (ck.manifest.get("rate_training") or {}).get("rate_min")
    if lo is None or lo >= ck.k:
        raise UserError(f"codec {ck.path} is not nested (no --rate-min)", "pass a codec trained with --rate-min")
    return ImportanceRate(ladder(ck.k, lo), budget, code_rate)


def level_counts(codec, examples, rate, snr_db: float) -> dict:
    """Frames per k' over all messages (the layouts transmit_examples sends; recomputed, cheap)."""
    import numpy as np
    import torch

    counts = np.zeros(len(rate.levels), dtype=np.int64)
    with torch.no_grad():
        for e in examples:
            lay = rate.layout(codec.encoder(e.h.float().unsqueeze(0))[0].numpy(), snr_db)
            counts += np.array([(lay.k == v).sum() for v in rate.levels])
    return {str(v): int(c) for v, c in zip(rate.levels, counts)}


def condition_rows(rx, ck, examples, refs, base_errs, channel: str, snr: float, rate, a) -> list[dict]:
    """Uniform and importance at one SNR, each with its WER interval; importance paired against uniform."""
    from semedge.semcom import stats
    from semedge.semcom.metrics import word_errors_per_utt
    from semedge.semcom.training.evaluate import transmit_examples

    rows, errs = [], {}
    for policy in ("uniform", "importance"):
        t0 = time.perf_counter()
        kw = {"k_keep": rate.k_budget} if policy == "uniform" else {"rate": rate}
        hyps, sent = transmit_examples(rx, ck.codec, examples, channel, snr, seed=a.seed, backend=a.backend, **kw)
        errs[policy] = word_errors_per_utt(refs, hyps)
        frames = sum(e.h.shape[0] for e in examples)
        row = {"policy": policy, "channel": channel, "snr_db": snr, "n": len(refs), "budget_k": rate.k_budget,
               "wer": stats.wer_ci(errs[policy]), "vs_unsplit": stats.paired_wer_diff(base_errs, errs[policy]),
               "channel_uses": sum((s + 1) // 2 for s in sent), "budget_channel_uses": sum((rate.k_budget * e.h.shape[0] + 1) // 2 for e in examples),
               "symbols_per_frame": round(sum(sent) / frames, 2), "seconds": round(time.perf_counter() - t0, 1),
               "examples": [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:3]]}
        if policy == "importance":
            row["frames_per_k"] = level_counts(ck.codec, examples, rate, snr)
            row["vs_uniform"] = stats.paired_wer_diff(errs["uniform"], errs["importance"])
        rows.append(row)
        print(f"  {channel} {snr:5g} dB {policy:10s} WER {row['wer']['value']:.3f}  {row['symbols_per_frame']} sym/frame", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    from semedge.semcom.stats import fmt_ci

    lines = ["| codec | SNR | policy | WER [95% CI] | importance - uniform [95% CI] | channel uses (budget) | frames per k' |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        snr = "clean" if not math.isfinite(r["snr_db"]) else f"{r['snr_db']:g} dB"
        d = r.get("vs_uniform")
        lv = " / ".join(f"{k}:{v}" for k, v in r["frames_per_k"].items()) if "frames_per_k" in r else "-"
        lines.append(f"| {r.get('codec', '')} | {snr} | {r['policy']} | {fmt_ci(r['wer'])} | {fmt_ci(d) if d else '-'} | "
                     f"{r['channel_uses']} ({r['budget_channel_uses']}) | {lv} |")
    return "\n".join(lines)


def unsplit_errors(base, examples, refs, a):
    from semedge.semcom.jsc import JSCCodec, JSCConfig
    from semedge.semcom.metrics import word_errors_per_utt
    from semedge.semcom.training.evaluate import transmit_examples

    ident = JSCCodec(JSCConfig(d_model=base.d_model, k=base.d_model, identity=True)).eval()
    hyps, _ = transmit_examples(base, ident, examples, "none", math.inf, seed=a.seed, backend=a.backend)
    return word_errors_per_utt(refs, hyps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jsc", action="append", help="nested codec folder (repeatable); name=PATH names the row")
    ap.add_argument("--family", default="piper", help="voice family of the test set (espeak, piper, flite, mix)")
    ap.add_argument("--n", type=int, default=100, help="test utterances")
    ap.add_argument("--quick", action="store_true", help="10 utterances")
    ap.add_argument("--budget", type=int, default=256, help="symbols per frame the uniform policy sends (both policies' budget)")
    ap.add_argument("--snrs", default="10,5,0", help="AWGN SNRs in dB ('inf' for clean)")
    ap.add_argument("--channel", default="awgn")
    ap.add_argument("--code-rate", type=float, default=0.25, help="the layout header's code rate (BPSK)")
    ap.add_argument("--backend", default="ct2", choices=("ct2", "ct2-float32", "torch"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "importance_rate.json"))
    a = ap.parse_args(argv)
    from semedge.semcom.checkpoint import load_for_inference
    from semedge.semcom.models import load_model
    from semedge.semcom.training.artifacts import write_json
    from semedge.semcom.training.data import speech_examples

    n = 10 if a.quick else a.n
    base = load_model("whisper-base")
    examples = speech_examples(base, "test", n, family=a.family)
    refs = [e.text for e in examples]
    t0 = time.perf_counter()
    base_errs = unsplit_errors(base, examples, refs, a)
    print(f"  unsplit clean {time.perf_counter() - t0:.0f} s", flush=True)
    rows, codecs = [], {}
    for spec in a.jsc or ["runs/msg512-mix"]:
        name, _, path = spec.rpartition("=")
        name = name or Path(path).name
        rx, ck = load_for_inference(base, path)
        rate = policy_for(ck, a.budget, a.code_rate)
        codecs[name] = {"path": str(ck.path), "k": ck.k, "ladder": list(rate.levels), "trained_on": trained_on(ck),
                        "held_out": held_out(trained_on(ck), a.family)}
        for s in a.snrs.split(","):
            snr = float(s)
            ch = a.channel if math.isfinite(snr) else "none"
            rows += [{"codec": name, **r} for r in condition_rows(rx, ck, examples, refs, base_errs, ch, snr, rate, a)]
    from semedge.semcom import stats

    out = {"family": a.family, "n": n, "budget_k": a.budget, "code_rate": a.code_rate, "backend": a.backend,
           "header": "ceil(log2 levels) bits per frame, BPSK (one coded bit per real symbol), rate code_rate; counted, assumed error-free",
           "normalizer": "whisper-english", "unsplit_wer": stats.wer_ci(base_errs), "codecs": codecs, "rows": rows,
           "command": "python benchmarks/importance_rate.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}}
    write_json(out, a.out)
    print(f"unsplit whisper-base, clean: WER {stats.fmt_ci(out['unsplit_wer'])}")
    print(table(rows))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
