"""Context at the receiver: WER and rare-term recall with no context vs session memory, retrieval (RAG), both.

Sessions (semcom/context_data.py: consecutive sentences of one stdlib docstring or Debian
description, disjoint from the training corpus) spoken by the speech task's voices. Each
utterance: device half (whisper-base encoder + the shipped default codec at its full k,
semcom.checkpoint) -> runtime.link AWGN at clean / 10 / 5 / 0 dB -> server half (CTranslate2
int8, 1 thread), decoding with Whisper's <|startofprev|> prompt built by the server's own
runtime.decode_api.context_prompt, as `semedge serve --memory RULE --kb DIR` does: KB passages
(searched with the first-pass decode, i.e. the no-context decode of the same received message)
then the session memory; corr scores against the first pass; every answer goes into the memory.

Rows (--configs): none; a memory rule (fifo, fresh, value, corr, sums); rag; rule+rag; and
"+guard": the receiver keeps the prompted decode only when semcom.memory.keep_prompted accepts
it against the first pass (no reference), else the first pass. The KB (semcom/kb.py, built in a
temporary folder) holds every document less every spoken sentence (context_data.kb_documents).

Figures: corpus WER and rare-term recall with bootstrap 95% intervals (utterances resampled):
`rare_recall` over terms seen at most once in the train split that occurred earlier in the
session, `kb_recall` over those that occur earlier or anywhere in the KB; the paired WER
difference against no context; decode time per message (first pass included where the row
needs one) and memory bytes per message. Writes benchmarks/results/context.json, prints a table.

  python benchmarks/context.py --quick        # 12 sessions x 4 sentences
  python benchmarks/context.py --first 100 --sessions 10 --keep-prompts   # a slice apart from the first 100
  python benchmarks/context.py --sessions 100 --snrs clean,10,5,0         # the issue's full run (>= 100 sessions)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = ("fifo", "fresh", "value", "corr", "rag", "fifo+rag", "fifo+guard", "rag+guard", "fifo+rag+guard")


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


@dataclass(frozen=True)
class Config:
    """One row: a memory rule (or none), retrieval from the KB, and the receiver-side guard.
    Named like "fifo", "rag", "fifo+rag", "fifo+rag+guard" (any memory rule, sums included)."""
    name: str
    rule: str | None
    rag: bool
    guard: bool

    @classmethod
    def parse(cls, name: str) -> "Config":
        parts = [p.strip() for p in name.split("+")]
        rule = "+".join(p for p in parts if p not in ("rag", "guard")) or None
        return cls(name, rule, "rag" in parts, "guard" in parts)


def _host(kb, passages: int):
    """What runtime.decode_api.context_prompt reads of a server: its KB and kb_passages."""
    return SimpleNamespace(kb=kb, cfg=SimpleNamespace(kb_passages=passages))


def _run(server, cfg: Config, items: int, sessions, rx, plain, psecs, max_new, seen, host) -> dict:
    """One config over every session, as the server decodes (runtime.decode_api._decode_with_context):
    a first pass (the plain decode) when the KB, corr or the guard needs it, the prompt from
    context_prompt, every answer stored in the memory. seen: (message, prompt) -> (text, seconds)
    shared across configs (greedy decoding: the same prompt gives the same text)."""
    from semedge.runtime.decode_api import context_prompt
    from semedge.semcom.memory import Memory, MemoryConfig, keep_prompted

    out = {"hyps": [], "secs": [], "bytes": [], "prompts": [], "guarded": 0}
    h, i = _host(host.kb if cfg.rag else None, host.cfg.kb_passages), 0
    for s in sessions:
        mem = Memory(MemoryConfig(rule=cfg.rule, max_items=items)) if cfg.rule else None
        for _ in s.sentences:
            first = cfg.rag or cfg.guard or (mem is not None and mem.needs_query)
            t0 = time.perf_counter()
            prompt = context_prompt(h, mem, plain[i] if first else None)
            extra = time.perf_counter() - t0
            if prompt and (i, prompt) not in seen:
                seen[(i, prompt)] = _decode(server, rx[i], prompt, max_new[i])
            text, dt = seen[(i, prompt)] if prompt else (plain[i], 0.0)
            if prompt and cfg.guard and not keep_prompted(plain[i], text, prompt):
                text, out["guarded"] = plain[i], out["guarded"] + 1
            if mem is not None:
                mem.add(text)
            out["hyps"].append(text)
            out["secs"].append(dt + extra + (psecs[i] if first or not prompt else 0.0))
            out["bytes"].append(mem.nbytes if mem is not None else 0)
            out["prompts"].append(prompt)
            i += 1
    return out


def _build_kb(folder: Path, chosen) -> tuple:
    """The KB (semcom/kb.py) of every document less the spoken sentences; (kb, its words, stats)."""
    from semedge.semcom.context_data import kb_documents, words_of
    from semedge.semcom.kb import KnowledgeBase

    docs = kb_documents(chosen)
    kb = KnowledgeBase(folder, create=True)
    t0 = time.perf_counter()
    n = sum(kb.add(name, text) for name, text in docs.items())
    stats = {"documents": len(docs), "passages": n, "build_s": round(time.perf_counter() - t0, 1),
             "sqlite_bytes": (folder / "kb.sqlite").stat().st_size}
    return kb, words_of(docs.values()), stats


def _recall(hyps, terms, f):
    from semedge.semcom import stats

    rows = [(sum(1 for t in ts if t in f(h).split()), len(ts)) for h, ts in zip(hyps, terms)]
    rows = [r for r in rows if r[1] > 0]
    return stats.wer_ci(rows) if rows else None  # sum(hits) / sum(terms): the same ratio bootstrap


def _score(refs, hyps, terms, kb_terms, secs, nbytes, base_pairs=None) -> dict:
    import numpy as np

    from semedge.semcom import stats
    from semedge.semcom.metrics import normalizer_fn, word_errors_per_utt

    pairs = word_errors_per_utt(refs, hyps)
    f = normalizer_fn()
    out = {"wer": stats.wer_ci(pairs), "rare_recall": _recall(hyps, terms, f), "rare_terms": sum(map(len, terms)),
           "kb_recall": _recall(hyps, kb_terms, f), "kb_terms": sum(map(len, kb_terms)),
           "decode_ms_per_msg": round(1000 * float(np.mean(secs)), 1),
           "memory_bytes_per_msg": round(float(np.mean(nbytes)), 1) if nbytes else 0.0,
           "word_errors": [[int(e), int(w)] for e, w in pairs], "hyps": list(hyps)}
    if base_pairs is not None:
        out["wer_minus_none"] = stats.paired_wer_diff(base_pairs, pairs)
    return out


def _print_row(key: str, name: str, row: dict) -> None:
    from semedge.semcom.stats import fmt_ci

    d = row.get("wer_minus_none")
    line = (f"{key:>6} {name:>15}  WER {fmt_ci(row['wer'])}  recall {fmt_ci(row['rare_recall'])}  "
            f"kb-recall {fmt_ci(row['kb_recall'])}  {row['decode_ms_per_msg']:.0f} ms")
    print(line + (f"  dWER {d['delta']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d else ""), flush=True)


def _args(argv):
    from semedge.runtime.server import ServerConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="12 sessions")
    ap.add_argument("--sessions", type=int, default=None, help="sessions (default 120, --quick 12)")
    ap.add_argument("--first", type=int, default=0, help="skip this many sessions first (a slice apart from the test run's)")
    ap.add_argument("--per-session", type=int, default=4)
    ap.add_argument("--snrs", default="clean,10,5,0", help="AWGN SNRs in dB, 'clean' for no channel noise")
    ap.add_argument("--configs", "--rules", default=",".join(CONFIGS),
                    help="rows besides none: a memory rule (semcom/memory.py), rag, and/or guard joined by +")
    ap.add_argument("--memory-items", type=int, default=2, help="items each memory keeps (small, so the rules differ)")
    ap.add_argument("--kb-passages", type=int, default=ServerConfig.kb_passages, help="passages per prompt (as serve --kb)")
    ap.add_argument("--family", default="mix", help="voice family (tasks.speech: espeak, piper, flite, mix)")
    ap.add_argument("--model", default="whisper-base")
    ap.add_argument("--jsc", default="default")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep-prompts", action="store_true", help="write every prompt into the JSON")
    ap.add_argument("--out", type=Path, default=RESULTS / "context.json")
    return ap, ap.parse_args(argv)


def main(argv=None) -> int:
    ap, args = _args(argv)
    n = args.sessions if args.sessions is not None else (12 if args.quick else 120)

    from semedge.core.errors import UserError
    from semedge.runtime.evaluate import receive
    from semedge.semcom.context_data import rare_terms, session_utterances, sessions
    from semedge.semcom.memory import parse_rule

    try:
        configs = [Config.parse(c.strip()) for c in args.configs.split(",") if c.strip()]
        for c in configs:
            if c.rule:
                parse_rule(c.rule)
        snrs = _snrs(args.snrs)
        chosen = sessions(None, args.per_session)[args.first:args.first + n]
        if len(chosen) < n:
            raise UserError(f"{n} sessions from #{args.first} asked for, {len(chosen)} there", "ask for fewer")
    except (UserError, ValueError) as e:
        ap.error(f"{e}")
    t0 = time.perf_counter()
    utts = session_utterances(chosen, args.family)
    refs = [u.text for u in utts]
    earlier = [list(s.sentences[:j]) for s in chosen for j in range(len(s.sentences))]
    terms = [rare_terms(t, e) for t, e in zip(refs, earlier)]
    max_new = [min(96, 8 + 2 * len(r.split())) for r in refs]
    server, ck, encoder = _setup(args)
    msgs = _messages(ck, encoder, utts)
    tmp = tempfile.TemporaryDirectory(prefix="semedge-context-kb-")
    kb, kb_words, kb_stats = _build_kb(Path(tmp.name), chosen) if any(c.rag for c in configs) else (None, frozenset(), {})
    kb_terms = [rare_terms(t, e, known=kb_words) for t, e in zip(refs, earlier)]
    host = _host(kb, args.kb_passages)
    rows = {}
    for snr in snrs:
        key = "clean" if snr is None else f"{snr:g}dB"
        rx = msgs if snr is None else receive(msgs, "awgn", snr, seed=0)
        plain, psecs = zip(*(_decode(server, x, "", m) for x, m in zip(rx, max_new)))
        rows[key] = {"none": _score(refs, plain, terms, kb_terms, psecs, [])}
        _print_row(key, "none", rows[key]["none"])
        base, seen = rows[key]["none"]["word_errors"], {}
        for c in configs:
            r = _run(server, c, args.memory_items, chosen, rx, list(plain), psecs, max_new, seen, host)
            row = _score(refs, r["hyps"], terms, kb_terms, r["secs"], r["bytes"], base)
            row.update(guarded=r["guarded"], prompt_chars_per_msg=round(sum(map(len, r["prompts"])) / len(refs), 1))
            if args.keep_prompts:
                row["prompts"] = r["prompts"]
            rows[key][c.name] = row
            _print_row(key, c.name, row)
    out = {"refs": refs, "sessions": len(chosen), "first": args.first, "per_session": args.per_session,
           "utterances": len(utts), "rare_terms": sum(map(len, terms)), "kb_terms": sum(map(len, kb_terms)),
           "memory_items": args.memory_items, "kb_passages": args.kb_passages, "kb": kb_stats, "family": args.family,
           "model": args.model, "jsc": args.jsc, "k": ck.k, "backend": "ct2-int8", "threads": args.threads,
           "channel": "awgn", "host": platform.node(), "wall_s": round(time.perf_counter() - t0, 1), "rows": rows,
           "session_ids": [s.id for s in chosen]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out} ({len(chosen)} sessions, {len(utts)} utterances, {out['rare_terms']} rare terms "
          f"in the session, {out['kb_terms']} in the KB or session, {out['wall_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
