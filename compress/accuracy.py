"""The planner's accuracy stage: successive halving over the candidates (docs/planner.md).

Accuracy depends on (plan, channel, SNR, data), not on the device: it is measured through
the link (runtime/evaluate.py) once per condition any device needs, cached by content.
A cheap pass scores every candidate that fits some device; the best few per device are
shortlisted (at most `full_share` of the candidates in all) and evaluated in full.
"""

from __future__ import annotations

import math
import time
from typing import Callable

from semedge.compress.candidates import Cand
from semedge.compress.choose import cond_key, fits, format_rank, tie_diffs
from semedge.compress.workspace import LazySplit, Workspace


class Evaluator:
    """Accuracy of a candidate at some SNRs of a channel, on the first n calibration utterances."""

    def __init__(self, ws: Workspace, utts: list, cache, threads: int, segment_s: float | None = None):
        self.ws, self.utts, self.cache, self.threads, self.segment_s = ws, utts, cache, threads, segment_s
        self.base_parts = {"weights": ws.loaded.weight_hash, "codec": ws.chash}
        self.messages: dict[str, list] = {}  # device outputs per candidate, reused across conditions
        self.counts = {"cheap": 0, "full": 0}  # conditions evaluated per level

    def release(self, c: Cand) -> None:
        """Drop what was kept for `c` (its device outputs) and hand freed heap back (trim_memory)."""
        from semedge.runtime.evaluate import trim_memory

        self.messages.pop(c.cid, None)
        trim_memory()

    def __call__(self, c: Cand, channel: str, snrs: list[float], n: int, level: str) -> None:
        from semedge.runtime.evaluate import device_messages, evaluate_onnx, segmented

        utts = self.utts[:n]
        if level == "full":  # a condition the cheap pass already measured on >= n utterances counts as full
            for s in snrs:
                a = c.accuracy.get(cond_key(channel, s))
                if a is not None and a["n"] >= n:
                    a["level"] = "full"
        need = [s for s in snrs if cond_key(channel, s) not in c.accuracy or c.accuracy[cond_key(channel, s)]["n"] < n]
        if not need:
            return

        def msgs():  # device outputs, kept per candidate for the next condition
            have = self.messages.get(c.cid, [])
            if len(have) < n:  # stored per utterance: a segmented recording's pieces together
                pieces, groups = segmented(utts, self.segment_s) if self.segment_s else (utts, None)
                out = device_messages(c.path, self.ws.loaded, pieces, self.threads)
                have = self.messages[c.cid] = [out[g[0]:g[-1] + 1] for g in groups] if groups else [[m] for m in out]
            return [m for per in have[:n] for m in per]

        res = evaluate_onnx(c.path, LazySplit(self.ws, c.plan), utts, channel, need, threads=self.threads, cache=self.cache,
                            key_parts={**self.base_parts, "plan": c.plan.hash()}, messages=msgs, segment_s=self.segment_s)
        for s, r in res.items():
            c.accuracy[cond_key(channel, s)] = {**{k: r[k] for k in ("wer", "bleu", "similarity", "n")},
                                                "wer_ci95": r.get("wer_ci95"), "word_errors": r.get("word_errors"),
                                                "level": level, "cached": r.get("cached", False)}
        self.counts[level] += len(need)

    def each(self, jobs: list, n: int, level: str):
        """Each job (candidate, [(channel, snrs)]) in turn; yields (candidate, seconds) as each is done."""
        for c, conds in jobs:
            t = time.time()
            for ch, snrs in conds:
                self(c, ch, snrs, n, level)
            self.release(c)
            yield c, time.time() - t


def _line(c: Cand, level: str | None = None) -> str:
    return ", ".join(f"{k} WER {v['wer']:.3f}" for k, v in sorted(c.accuracy.items()) if level is None or v["level"] == level)


def cheap_jobs(cands: list[Cand], devs: dict) -> list:
    """(candidate, [(channel, snrs)]) for every candidate that fits some device: each such device's lowest SNR."""
    need: dict[str, set] = {}
    for d, info in devs.items():
        for c in cands:
            if fits(c, d, info["budgets"]):
                need.setdefault(c.cid, set()).add((info["channel"], info["eval_snrs"][0]))
    return [(c, [(ch, sorted({s for cc, s in need[c.cid] if cc == ch})) for ch in sorted({ch for ch, _ in need[c.cid]})])
            for c in cands if c.cid in need]


def cheap_pass(ev: Evaluator, cands: list[Cand], devs: dict, n_cheap: int, say: Callable[[str], None],
               on_candidate=None) -> None:
    """Every candidate that fits some device, at each such device's lowest SNR, on n_cheap utterances."""
    jobs = cheap_jobs(cands, devs)
    say(f"cheap accuracy: {len(jobs)} candidates x {n_cheap} utterances")
    for i, (c, secs) in enumerate(ev.each(jobs, n_cheap, "cheap"), 1):
        say(f"  [{i}/{len(jobs)}] {c.cid}: {_line(c)}  ({secs:.0f} s)")
        if on_candidate:
            on_candidate("cheap", c.cid)


def rank(cands: list[Cand], devs: dict) -> dict[str, list[Cand]]:
    """Per device, the fitting candidates by cheap WER at its lowest SNR. Cheap WER on a few utterances
    is noisy: plans tied with the best (TIE_RULE) come first, in the first EP's preferred format first
    (devs[d]["formats"], best first), less compressed first; then the rest by WER."""
    ranked = {}
    for d, info in devs.items():
        lo = cond_key(info["channel"], info["eval_snrs"][0])
        feas = [c for c in cands if fits(c, d, info["budgets"])]
        diffs = tie_diffs({c.cid: c.accuracy[lo]["word_errors"] for c in feas}, {c.cid: c.accuracy[lo]["wer"] for c in feas})
        ranked[d] = sorted(feas, key=lambda c: (0, format_rank(c, info), -c.bytes) if not diffs[c.cid]["worse"]
                           else (1, c.accuracy[lo]["wer"], c.predicted[d]["latency_ms"]))
    return ranked


def shortlists(ranked: dict[str, list[Cand]], n_cands: int, full_share: float, per_device: int) -> tuple[dict, set]:
    """Round-robin over devices down their rankings, at most full_share of the candidates in all:
    (device -> shortlisted ids, every shortlisted id)."""
    cap = max(1, int(math.floor(full_share * n_cands + 1e-9)))
    full: set[str] = set()
    short: dict[str, list[str]] = {d: [] for d in ranked}
    for r in range(max(1, per_device)):
        for d in ranked:
            if len(ranked[d]) > r:
                cid = ranked[d][r].cid
                if cid in full or len(full) < cap:
                    full.add(cid)
                    short[d].append(cid)
    return short, full


def full_jobs(cands: list[Cand], devs: dict, short: dict, full: set) -> list:
    """(candidate, [(channel, snrs)]) per shortlisted candidate: every SNR of the devices that shortlisted it."""
    by_id = {c.cid: c for c in cands}
    jobs = []
    for cid in sorted(full):
        conds: dict[str, set] = {}
        for d, info in devs.items():
            if cid in short[d]:
                conds.setdefault(info["channel"], set()).update(info["eval_snrs"])
        jobs.append((by_id[cid], [(ch, sorted(snrs)) for ch, snrs in sorted(conds.items())]))
    return jobs


def full_pass(ev: Evaluator, cands: list[Cand], devs: dict, short: dict, full: set, n_full: int,
              say: Callable[[str], None], on_candidate=None) -> None:
    """Each shortlisted candidate at every SNR of the devices that shortlisted it, on n_full utterances."""
    say(f"full accuracy: {len(full)} of {len(cands)} candidates x {n_full} utterances")
    for i, (c, secs) in enumerate(ev.each(full_jobs(cands, devs, short, full), n_full, "full"), 1):
        say(f"  [{i}/{len(full)}] {c.cid}: {_line(c, 'full')}  ({secs:.0f} s)")
        if on_candidate:
            on_candidate("full", c.cid)
