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
import sys
import tempfile
import time
from dataclasses import dataclass, replace
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


def _hits(hyps, terms, f) -> list[tuple[int, int]]:
    """(rare terms produced, rare terms) of each utterance that has any."""
    rows = [(sum(1 for t in ts if t in f(h).split()), len(ts)) for h, ts in zip(hyps, terms)]
    return [r for r in rows if r[1] > 0]


def _recall(hyps, terms, f):
    from semedge.semcom import stats

    rows = _hits(hyps, terms, f)
    return stats.wer_ci(rows) if rows else None  # sum(hits) / sum(terms): the same ratio bootstrap


def _paired_recall(base_hyps, hyps, terms) -> dict | None:
    """Recall(B) - recall(A) on the same utterances and terms, paired bootstrap 95% interval."""
    from semedge.semcom import stats
    from semedge.semcom.metrics import normalizer_fn

    f = normalizer_fn()
    a, b = _hits(base_hyps, terms, f), _hits(hyps, terms, f)
    return stats.paired_wer_diff(a, b) if a else None


def _summarize(path: Path, merge: list[Path]) -> dict:
    """Add paired recall differences (vs none; plug-in: after vs before) to a written result,
    recomputing the rare terms from its sessions; `merge`: results of the same sessions at other SNRs."""
    from semedge.semcom.context_data import kb_documents, rare_terms, sessions, words_of

    out = json.loads(path.read_text())
    for m in merge:
        other = json.loads(m.read_text())
        assert other["refs"] == out["refs"], f"{m} decodes other sessions"
        out["rows"].update(other["rows"])
        out.setdefault("merged", []).append({"file": m.name, "snrs": list(other["rows"]), "wall_s": other["wall_s"]})
    by_id = {s.id: s for s in sessions(None, out.get("per_session", 4))}
    chosen = [replace(by_id[i], sentences=by_id[i].sentences[:out.get("sentences") or None]) for i in out["session_ids"]]
    earlier = [list(s.sentences[:j]) for s in chosen for j in range(len(s.sentences))]
    words = words_of(kb_documents(chosen).values())
    terms = {"rare": [rare_terms(t, e) for t, e in zip(out["refs"], earlier)],
             "kb": [rare_terms(t, e, known=words) for t, e in zip(out["refs"], earlier)]}
    for rows in out["rows"].values():
        for name, row in rows.items():
            if name != "none":
                for kind, ts in terms.items():
                    row[f"{kind}_recall_minus_none"] = _paired_recall(rows["none"]["hyps"], row["hyps"], ts)
    return out


def _plugin_summary(out: dict) -> None:
    """after - before, paired: WER and recall over the added documents' rare terms."""
    from semedge.semcom import stats
    from semedge.semcom.context_data import kb_documents, rare_terms, sessions, words_of

    every = sessions(None, 4)
    ids = out.get("session_ids") or [s.id for s in every[out["first"]:out["first"] + out["sessions"]]]
    chosen = [next(s for s in every if s.id == i) for i in ids]
    docs = kb_documents(chosen)
    own = [docs.get(s.id.rsplit(":", 1)[0], "") for s in chosen for _ in s.sentences]
    terms = [rare_terms(t, [], known=words_of([o])) for t, o in zip(out["refs"], own)]
    for key, r in out["plugin"].items():
        if isinstance(r, dict) and "before" in r:
            r["after_minus_before"] = {
                "wer": stats.paired_wer_diff(r["before"]["word_errors"], r["after"]["word_errors"]),
                "recall": _paired_recall(r["before"]["hyps"], r["after"]["hyps"], terms)}


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


def _kb_add_cli(folder: Path, docs: dict[str, str], files: Path) -> float:
    """`semedge kb add` in its own process (as a user would, while the server runs); its seconds."""
    import subprocess
    import sys

    files.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in docs.items():
        paths.append(files / (name.replace(":", "_") + ".txt"))
        paths[-1].write_text(text, encoding="utf-8")
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "semedge.cli", "kb", "add", "--kb", str(folder), *map(str, paths)]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - t0


def _doc_hits(prompts, own) -> int:
    """Prompts holding a passage of the message's own document (own: its KB text per message)."""
    return sum(1 for p, o in zip(prompts, own) if p and o and any(x in o for x in p.split(". ") if len(x) > 20))


def _plugin(args, chosen, server, msgs, refs, max_new, snrs) -> dict:
    """Plug-in update: the KB starts without the sessions' documents; rag decodes, then `semedge kb add`
    adds them (less the spoken sentences) while this KB connection (the server's) stays open, and the
    same messages decode again. Recall over the rare words of each sentence found in its own document."""
    from semedge.runtime.evaluate import receive
    from semedge.semcom.context_data import kb_documents, rare_terms, words_of
    from semedge.semcom.kb import KnowledgeBase
    from semedge.semcom.stats import fmt_ci

    docs = kb_documents(chosen)
    own_ids = [s.id.rsplit(":", 1)[0] for s in chosen for _ in s.sentences]
    new = {d: docs[d] for d in dict.fromkeys(own_ids) if d in docs}
    own = [docs.get(d, "") for d in own_ids]
    terms = [rare_terms(t, [], known=words_of([o])) for t, o in zip(refs, own)]
    tmp = Path(tempfile.mkdtemp(prefix="semedge-plugin-kb-"))
    kb = KnowledgeBase(tmp / "kb", create=True)
    for name, text in docs.items():
        if name not in new:
            kb.add(name, text)
    host, cfg, out = _host(kb, args.kb_passages), Config.parse("rag"), {"new_documents": len(new)}
    passes = {}
    for phase in ("before", "after"):
        if phase == "after":
            out["kb_add_s"] = round(_kb_add_cli(tmp / "kb", new, tmp / "files"), 1)
        for snr in snrs:
            key = "clean" if snr is None else f"{snr:g}dB"
            rx = msgs if snr is None else receive(msgs, "awgn", snr, seed=0)
            if key not in passes:
                passes[key] = list(zip(*(_decode(server, x, "", m) for x, m in zip(rx, max_new))))
            plain, psecs = passes[key]
            r = _run(server, cfg, args.memory_items, chosen, rx, list(plain), psecs, max_new, {}, host)
            row = _score(refs, r["hyps"], terms, terms, r["secs"], [], None)
            row.update(own_doc_prompts=_doc_hits(r["prompts"], own), kb_documents=len(kb.list()))
            out.setdefault(key, {"none": _score(refs, plain, terms, terms, psecs, [], None)})[phase] = row
            print(f"plug-in {key:>6} {phase:>6}  WER {fmt_ci(row['wer'])}  recall {fmt_ci(row['rare_recall'])}  "
                  f"own-doc prompts {row['own_doc_prompts']}/{len(refs)}", flush=True)
    return out


def _write(args, out: dict) -> None:
    """The JSON, written whole to a temp name then renamed."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(args.out)


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
    ap.add_argument("--sentences", type=int, default=None,
                    help="decode only each session's first N sentences (the same sessions, fewer messages)")
    ap.add_argument("--snrs", default="clean,10,5,0", help="AWGN SNRs in dB, 'clean' for no channel noise")
    ap.add_argument("--configs", "--rules", default=",".join(CONFIGS),
                    help="rows besides none: a memory rule (semcom/memory.py), rag, and/or guard joined by +")
    ap.add_argument("--memory-items", type=int, default=2, help="items each memory keeps (small, so the rules differ)")
    ap.add_argument("--kb-passages", type=int, default=ServerConfig.kb_passages, help="passages per prompt (as serve --kb)")
    ap.add_argument("--family", default="mix", help="voice family (tasks.speech: espeak, piper, flite, mix)")
    ap.add_argument("--model", default="whisper-base")
    ap.add_argument("--jsc", default="default")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plugin", action="store_true",
                    help="the plug-in update run instead (rag before vs after `semedge kb add` of the sessions' documents)")
    ap.add_argument("--summarize", type=Path, default=None,
                    help="add paired recall differences to a written result (and --merge other SNRs' results), write --out")
    ap.add_argument("--merge", type=Path, nargs="*", default=[])
    ap.add_argument("--keep-prompts", action="store_true", help="write every prompt into the JSON")
    ap.add_argument("--out", type=Path, default=RESULTS / "context.json")
    return ap, ap.parse_args(argv)


def main(argv=None) -> int:
    ap, args = _args(argv)
    if args.summarize is not None:
        out = json.loads(args.summarize.read_text())
        if "plugin" in out:
            _plugin_summary(out)
        else:
            out = _summarize(args.summarize, args.merge)
        _write(args, out)
        return 0
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
        if args.sentences is not None:
            if not 2 <= args.sentences <= args.per_session:
                raise UserError(f"--sentences {args.sentences}", f"use 2 to --per-session ({args.per_session})")
            chosen = [replace(s, sentences=s.sentences[:args.sentences]) for s in chosen]
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
    if args.plugin:
        out = {"refs": refs, "sessions": len(chosen), "first": args.first, "utterances": len(utts), "k": ck.k,
               "session_ids": [s.id for s in chosen],
               "kb_passages": args.kb_passages, "plugin": _plugin(args, chosen, server, msgs, refs, max_new, snrs)}
        out["wall_s"] = round(time.perf_counter() - t0, 1)
        _write(args, out)
        print(f"wrote {args.out} ({out['wall_s']} s)")
        return 0
    tmp = tempfile.TemporaryDirectory(prefix="semedge-context-kb-")
    kb, kb_words, kb_stats = _build_kb(Path(tmp.name), chosen) if any(c.rag for c in configs) else (None, frozenset(), {})
    kb_terms = [rare_terms(t, e, known=kb_words) for t, e in zip(refs, earlier)]
    host = _host(kb, args.kb_passages)
    meta = {"refs": refs, "sessions": len(chosen), "first": args.first, "per_session": args.per_session,
            "sentences": args.sentences, "utterances": len(utts), "rare_terms": sum(map(len, terms)),
            "kb_terms": sum(map(len, kb_terms)), "memory_items": args.memory_items, "kb_passages": args.kb_passages,
            "kb": kb_stats, "family": args.family, "model": args.model, "jsc": args.jsc, "k": ck.k,
            "backend": "ct2-int8", "threads": args.threads, "channel": "awgn", "host": platform.node(),
            "command": "python benchmarks/context.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "session_ids": [s.id for s in chosen]}
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
        _write(args, {**meta, "wall_s": round(time.perf_counter() - t0, 1), "rows": rows})  # each SNR as it ends
    out = {**meta, "wall_s": round(time.perf_counter() - t0, 1), "rows": rows}
    _write(args, out)
    print(f"wrote {args.out} ({len(chosen)} sessions, {len(utts)} utterances, {out['rare_terms']} rare terms "
          f"in the session, {out['kb_terms']} in the KB or session, {out['wall_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
