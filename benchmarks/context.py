"""Context at the receiver: WER and rare-term recall with no context vs the session memory's rules.

Sessions (semcom/context_data.py: consecutive sentences of one stdlib docstring or Debian
description, disjoint from the training corpus) spoken by the speech task's voices. Each
utterance: device half (whisper-base encoder + the shipped default codec, semcom.checkpoint)
-> runtime.link AWGN at clean / 10 / 5 / 0 dB -> server half (CTranslate2 int8, 1 thread),
decoding with Whisper's <|startofprev|> prompt from the session's memory (semcom/memory.py),
exactly as `semedge serve --memory RULE` does: corr scores against a first-pass decode (the
no-context decode of the same received message), every decode is added to the memory.

Figures: corpus WER and rare-term recall (terms seen at most once in the train split that
occurred earlier in the session; recall = hits / terms) with bootstrap 95% intervals, the paired
WER difference against no context, and decode time and memory bytes per message.
Writes benchmarks/results/context.json and prints a table.

  python benchmarks/context.py --quick        # 12 sessions x 4 sentences
  python benchmarks/context.py --sessions 20  # what docs/context.md reports (2 busy cores: ~8 min)
  python benchmarks/context.py --sessions 120 --snrs clean,10,5,0   # the issue's full run (>= 100 sessions)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"
RULES = ("fifo", "fresh", "value", "corr")


def _snrs(text: str) -> list:
    out = []
    for part in text.split(","):
        part = part.strip()
        out.append(None if part == "clean" else float(part))
    return out


def _setup(args):
    """(server half with ct2, codec, device encoder, silence) for whisper-base + the default codec."""
    import torch

    from semedge.semcom.checkpoint import device_encoder, load_for_inference
    from semedge.semcom.ct2_backend import engine_for
    from semedge.semcom.models import load_model
    from semedge.semcom.split import ServerHalf, silence_encoding

    torch.set_num_threads(args.threads)
    base = load_model(args.model)
    rx, ck = load_for_inference(base, args.jsc)
    server = ServerHalf(rx, ck.codec.decoder, silence_encoding(rx)).eval()
    server.ct2 = engine_for(rx, "int8", threads=args.threads)
    return server, ck, device_encoder(ck) or base


def _messages(ck, encoder, utts) -> list:
    """Each utterance's channel symbols [n, k] (the device half: encoder features -> JSC encoder)."""
    import torch

    from semedge.semcom.training.feature_cache import cached_speech_features

    feats = cached_speech_features(encoder, utts, progress=True)
    with torch.no_grad():
        return [ck.codec.encoder(feats[u.id].float()[None])[0].numpy() for u in utts]


def _decode(server, x, prompt: str, max_new: int) -> tuple[str, float]:
    import torch

    t0 = time.perf_counter()
    with torch.inference_mode():
        text = server.transcribe([torch.from_numpy(x)], max_new, prompts=[prompt] if prompt else None)[0]
    return text, time.perf_counter() - t0


def _run_rule(server, rule: str, items: int, sessions, rx, plain: list[str], max_new: list[int], seen: dict) -> dict:
    """One memory rule over every session: hypotheses, decode seconds and memory bytes per message.
    seen: (message, prompt) -> (text, seconds) across rules (greedy decoding: the same prompt gives the same text)."""
    from semedge.semcom.memory import Memory, MemoryConfig

    hyps, secs, nbytes, i = [], [], [], 0
    for s in sessions:
        mem = Memory(MemoryConfig(rule=rule, max_items=items))
        for _ in s.sentences:
            t0 = time.perf_counter()
            prompt = mem.prompt(plain[i] if mem.needs_query else None)  # corr: the first pass is the plain decode
            extra = time.perf_counter() - t0
            if prompt and (i, prompt) not in seen:
                seen[(i, prompt)] = _decode(server, rx[i], prompt, max_new[i])
            text, dt = seen[(i, prompt)] if prompt else (plain[i], 0.0)
            mem.add(text)
            hyps.append(text)
            secs.append(dt + extra)
            nbytes.append(mem.nbytes)
            i += 1
    return {"hyps": hyps, "secs": secs, "bytes": nbytes}


def _score(refs, hyps, terms, secs, nbytes, base_pairs=None) -> dict:
    import numpy as np

    from semedge.semcom import stats
    from semedge.semcom.metrics import normalizer_fn, word_errors_per_utt

    pairs = word_errors_per_utt(refs, hyps)
    f = normalizer_fn()
    hits = [(sum(1 for t in ts if t in f(h).split()), len(ts)) for h, ts in zip(hyps, terms)]
    hit_rows = [h for h in hits if h[1] > 0]
    recall = stats.wer_ci(hit_rows) if hit_rows else None  # sum(hits) / sum(terms): the same ratio bootstrap
    out = {"wer": stats.wer_ci(pairs), "rare_recall": recall, "rare_terms": sum(h[1] for h in hits),
           "decode_ms_per_msg": round(1000 * float(np.mean(secs)), 1),
           "memory_bytes_per_msg": round(float(np.mean(nbytes)), 1) if nbytes else 0.0,
           "word_errors": [[int(e), int(w)] for e, w in pairs], "hyps": list(hyps)}
    if base_pairs is not None:
        out["wer_minus_none"] = stats.paired_wer_diff(base_pairs, pairs)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="12 sessions")
    ap.add_argument("--sessions", type=int, default=None, help="sessions (default 120, --quick 12)")
    ap.add_argument("--per-session", type=int, default=4)
    ap.add_argument("--snrs", default="clean,10,5,0", help="AWGN SNRs in dB, 'clean' for no channel noise")
    ap.add_argument("--rules", default=",".join(RULES), help="memory rules to compare (semcom/memory.py)")
    ap.add_argument("--memory-items", type=int, default=2, help="items each memory keeps (small, so the rules differ)")
    ap.add_argument("--family", default="mix", help="voice family (tasks.speech: espeak, piper, flite, mix)")
    ap.add_argument("--model", default="whisper-base")
    ap.add_argument("--jsc", default="default")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "context.json")
    args = ap.parse_args(argv)
    n = args.sessions if args.sessions is not None else (12 if args.quick else 120)

    from semedge.core.errors import UserError
    from semedge.runtime.evaluate import receive
    from semedge.semcom.context_data import rare_terms, session_utterances, sessions
    from semedge.semcom.memory import parse_rule
    from semedge.semcom.stats import fmt_ci

    try:
        rules = [r.strip() for r in args.rules.split(",") if r.strip()]
        for r in rules:
            parse_rule(r)
        snrs = _snrs(args.snrs)
        chosen = sessions(n, args.per_session)
    except (UserError, ValueError) as e:
        ap.error(f"{e}")
    t0 = time.perf_counter()
    utts = session_utterances(chosen, args.family)
    refs = [u.text for u in utts]
    terms = [rare_terms(t, list(s.sentences[:j])) for s in chosen for j, t in enumerate(s.sentences)]
    max_new = [min(96, 8 + 2 * len(r.split())) for r in refs]
    server, ck, encoder = _setup(args)
    msgs = _messages(ck, encoder, utts)
    rows = {}
    for snr in snrs:
        key = "clean" if snr is None else f"{snr:g}dB"
        rx = msgs if snr is None else receive(msgs, "awgn", snr, seed=0)
        plain, secs = zip(*(_decode(server, x, "", m) for x, m in zip(rx, max_new)))
        rows[key] = {"none": _score(refs, plain, terms, secs, [])}
        base, seen = rows[key]["none"]["word_errors"], {}
        for rule in rules:
            r = _run_rule(server, rule, args.memory_items, chosen, rx, list(plain), max_new, seen)
            rows[key][rule] = _score(refs, r["hyps"], terms, r["secs"], r["bytes"], base)
        for name, row in rows[key].items():
            d = row.get("wer_minus_none")
            print(f"{key:>6} {name:>6}  WER {fmt_ci(row['wer'])}  recall {fmt_ci(row['rare_recall'])}  "
                  f"dWER {d['delta']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d else
                  f"{key:>6} {name:>6}  WER {fmt_ci(row['wer'])}  recall {fmt_ci(row['rare_recall'])}", flush=True)
    out = {"refs": refs, "sessions": len(chosen), "per_session": args.per_session, "utterances": len(utts),
           "rare_terms": sum(len(t) for t in terms), "memory_items": args.memory_items, "family": args.family,
           "model": args.model, "jsc": args.jsc, "k": ck.k, "backend": "ct2-int8", "threads": args.threads,
           "channel": "awgn", "host": platform.node(), "wall_s": round(time.perf_counter() - t0, 1), "rows": rows,
           "session_ids": [s.id for s in chosen]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out} ({len(chosen)} sessions, {len(utts)} utterances, {out['rare_terms']} rare terms, "
          f"{out['wall_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
