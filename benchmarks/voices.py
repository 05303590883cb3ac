"""Generalisation across voice families: unsplit whisper-base vs JSC codecs, per family.

For each voice family's test set (tasks.speech: espeak-ng, Piper, flite) and each codec:
WER at clean / AWGN 10, 5, 0 dB / Rayleigh 5 dB with a bootstrap 95% interval, and the
paired difference to unsplit whisper-base (same utterances, the identity codec: content
frames + silence fill, no channel) with its interval. A codec's manifest says which
families it trained on, so each row is marked `held_out` when its family was not among them.
Writes benchmarks/results/voices.json and prints a table.

  python benchmarks/voices.py --jsc default --jsc runs/lofo-piper --n 200
  python benchmarks/voices.py --quick          # 20 utterances per family, the shipped default
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
FAMILIES = ("espeak", "piper", "flite")
CONDITIONS = (("none", math.inf), ("awgn", 10.0), ("awgn", 5.0), ("awgn", 0.0), ("rayleigh", 5.0))


def trained_families(ck) -> list[str]:
    """Families a codec trained on, from its manifest (old codecs: espeak only)."""
    v = (ck.manifest.get("train_config") or {}).get("voices", "espeak")
    if v == "mix" or v.startswith("mix-"):
        return [f for f in FAMILIES if f not in v[4:].split("-")]
    return v.split("+")


def identity_codec(loaded):
    from semedge.semcom.jsc import JSCCodec, JSCConfig

    return JSCCodec(JSCConfig(d_model=loaded.d_model, k=loaded.d_model, identity=True)).eval()


def wer_cell(refs, hyps, base_hyps=None) -> dict:
    """WER with its 95% interval; with base_hyps, the paired difference to them."""
    from semedge.semcom import stats
    from semedge.semcom.metrics import word_errors_per_utt

    errs = word_errors_per_utt(refs, hyps)
    cell = {"wer": stats.wer_ci(errs)}
    if base_hyps is not None:
        cell["delta_vs_unsplit"] = stats.paired_wer_diff(word_errors_per_utt(refs, base_hyps), errs)
    return cell


def parse_conditions(text: str) -> tuple:
    """'clean,awgn:10,rayleigh:5' -> (("none", inf), ("awgn", 10.0), ("rayleigh", 5.0))."""
    out = []
    for c in text.split(","):
        ch, _, snr = c.strip().partition(":")
        out.append(("none", math.inf) if ch in ("clean", "none") else (ch, float(snr)))
    return tuple(out)


def family_rows(fam: str, n: int, codecs: dict, base, backend: str, seed: int, k: int | None = None,
                conditions=CONDITIONS) -> list[dict]:
    from semedge.semcom.checkpoint import device_encoder
    from semedge.semcom.training.data import speech_examples
    from semedge.semcom.training.evaluate import transmit_examples

    plain = speech_examples(base, "test", n, family=fam)
    refs = [e.text for e in plain]
    t0 = time.perf_counter()
    unsplit, _ = transmit_examples(base, identity_codec(base), plain, "none", math.inf, seed=seed, backend=backend)
    rows = [{"family": fam, "system": "unsplit", "channel": "none", "snr_db": math.inf, "n": len(refs),
             **wer_cell(refs, unsplit), "seconds": round(time.perf_counter() - t0, 1)}]
    for name, (rx, ck) in codecs.items():
        enc = device_encoder(ck)
        ex = plain if enc is None else speech_examples(base, "test", n, family=fam, encoder=enc)
        held = fam not in trained_families(ck)
        kk = k if k is not None and k < ck.codec.cfg.k else None  # nested codecs send their first k symbols
        for ch, snr in conditions:
            hyps, sent = transmit_examples(rx, ck.codec, ex, ch, snr, k_keep=kk, seed=seed, backend=backend)
            rows.append({"family": fam, "system": name, "held_out": held, "channel": ch, "snr_db": snr, "n": len(refs),
                         "channel_uses": sum((s + 1) // 2 for s in sent) / len(sent), **wer_cell(refs, hyps, unsplit),
                         "examples": [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:3]]})
            print(f"  {fam:7s} {name:18s} {ch:8s} {snr:5g} dB  WER {rows[-1]['wer']['value']:.3f}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    from semedge.semcom.stats import fmt_ci

    lines = ["| family | system | held out | channel | SNR | WER [95% CI] | vs unsplit [95% CI] |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r.get("delta_vs_unsplit")
        snr = "clean" if not math.isfinite(r["snr_db"]) else f"{r['snr_db']:g} dB"
        lines.append(f"| {r['family']} | {r['system']} | {'yes' if r.get('held_out') else '' if 'held_out' in r else '-'} | "
                     f"{r['channel']} | {snr} | {fmt_ci(r['wer'])} | {fmt_ci(d) if d else '-'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20 utterances per family")
    ap.add_argument("--n", type=int, default=200, help="test utterances per family")
    ap.add_argument("--jsc", action="append", help="codec folder or 'default' (repeatable); name=PATH names the row")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--backend", default="ct2", choices=("ct2", "ct2-float32", "torch"), help="server decoder")
    ap.add_argument("--k", type=int, default=None, help="send the first K symbols per token of codecs wider than K (nested)")
    ap.add_argument("--conditions", default="clean,awgn:10,awgn:5,awgn:0,rayleigh:5", help="channel:SNR list")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "voices.json"))
    a = ap.parse_args(argv)
    from semedge.semcom.checkpoint import load_for_inference
    from semedge.semcom.models import load_model
    from semedge.semcom.training.artifacts import write_json

    n = 20 if a.quick else a.n
    base = load_model("whisper-base")
    codecs = {}
    for spec in a.jsc or ["default"]:
        name, _, path = spec.rpartition("=")
        codecs[name or Path(path).name] = load_for_inference(base, path)
    rows = []
    for fam in a.families.split(","):
        rows += family_rows(fam, n, codecs, base, a.backend, a.seed, a.k, parse_conditions(a.conditions))
    out = {"n_per_family": n, "backend": a.backend, "k_sent": a.k, "normalizer": "whisper-english", "codecs": {
        k: {"path": str(ck.path), "trained_on": trained_families(ck)} for k, (_, ck) in codecs.items()},
        "rows": rows, "command": "python benchmarks/voices.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}}
    write_json(out, a.out)
    print(table(rows))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
