"""The planner's choice per device: budgets, the tie rule, the closest plan when none fits."""

from __future__ import annotations

from semedge.compress.candidates import Cand
from semedge.core.channel_spec import snr_key
from semedge.semcom.stats import fmt_ci, paired_wer_diff, wer_ci

# Ties: a plan whose WER is not significantly worse than the best plan's at 95% (paired
# bootstrap over the same utterances and channel noise) is tied with it, and among tied
# plans the one in the format its device's first EP prefers wins (runtime.partition.formats_for order:
# fp16 on TensorRT, QDQ on an NPU, fp32 on a CPU), then the less compressed (a priori no less accurate).
# Replaces fixed thresholds.
TIE_RULE = "not significantly worse than the best at 95% (paired bootstrap over the same utterances and noise)"


def cond_key(channel: str, snr: float) -> str:
    """The accuracy key of a condition, e.g. "awgn@5"."""
    return f"{channel}@{snr_key(snr)}"


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def fits(c: Cand, d: str, b: dict) -> bool:
    """Predicted within both budgets; False for a candidate the device's first EP does not run (no prediction)."""
    p = c.predicted.get(d)
    return p is not None and p["memory_mb"] <= b["memory_mb"] and p["latency_ms"] <= b["latency_ms"]


def format_rank(c: Cand, info: dict) -> int:
    """Where the candidate's format stands in the device's first-EP preference (info["formats"], best first)."""
    prefs = info.get("formats") or []
    return prefs.index(c.format) if c.format in prefs else len(prefs)


def runs_on(cands: list[Cand], d: str) -> list[Cand]:
    """The candidates device `d`'s first EP runs (the planner predicts only those: compress/workspace.py)."""
    return [c for c in cands if d in c.predicted]


def tie_diffs(errors: dict[str, list], wers: dict[str, float]) -> dict[str, dict]:
    """Per candidate: the paired bootstrap of its WER minus the best one's (semcom.stats.paired_wer_diff)
    on the utterances both have (a shorter list is a prefix: same utterances, same noise).
    `worse` False means tied with the best (TIE_RULE). errors: per-utterance [errors, words]."""
    if not wers:
        return {}
    best = min(wers, key=lambda cid: (wers[cid], cid))
    out = {}
    for cid, e in errors.items():
        m = min(len(e), len(errors[best]))
        out[cid] = paired_wer_diff(errors[best][:m], e[:m])
    return out


def closest(cands: list[Cand], dev: str, budgets: dict) -> tuple[Cand, str]:
    """The candidate nearest the budgets (smallest worst ratio predicted/budget) and the budget it fails."""
    def over(c):
        p = c.predicted[dev]
        return max(p["memory_mb"] / budgets["memory_mb"], p["latency_ms"] / budgets["latency_ms"])

    best = min(cands, key=lambda c: (over(c), c.bytes))
    p = best.predicted[dev]
    mem_ok = any(c.predicted[dev]["memory_mb"] <= budgets["memory_mb"] for c in cands)
    lat_ok = any(c.predicted[dev]["latency_ms"] <= budgets["latency_ms"] for c in cands)
    if not mem_ok:
        failing = "memory"
    elif not lat_ok:
        failing = "latency"
    else:  # each budget is met by some plan, not both by one: name the one the closest plan misses most
        failing = "memory" if p["memory_mb"] / budgets["memory_mb"] >= p["latency_ms"] / budgets["latency_ms"] else "latency"
    return best, failing


def pareto(points: dict[str, tuple[float, float, float]]) -> list[str]:
    """Ids not dominated in (bytes, latency, WER), all minimised."""
    out = []
    for a, pa in points.items():
        dominated = any(all(x <= y for x, y in zip(pb, pa)) and any(x < y for x, y in zip(pb, pa))
                        for b, pb in points.items() if b != a)
        if not dominated:
            out.append(a)
    return sorted(out, key=lambda c: points[c])


def summed_errors(c: Cand, keys: list[str]) -> list[list[int]]:
    """Per utterance: [errors, words] summed over the conditions `keys` (its WER is the mean over them)."""
    lists = [c.accuracy[k]["word_errors"] for k in keys]
    m = min(len(x) for x in lists)
    return [[sum(x[i][0] for x in lists), sum(x[i][1] for x in lists)] for i in range(m)]


def _tie_reason(w: float, w_chosen: float, diff: dict, snrs) -> str:
    verdict = ("significantly worse than the best at 95%" if diff["worse"]
               else "tied with the best (not significantly worse at 95%); the tied plan in the EP's preferred "
               "format, then the least compressed, is chosen")
    return (f"accuracy: WER {w:.3f} vs chosen {w_chosen:.3f} (full, mean over {snrs} dB); "
            f"minus the best: {fmt_ci(diff)}, {verdict}")


def full_wer(c: Cand, info: dict) -> float | None:
    """Mean WER over the device's SNRs when every one is evaluated in full, else None."""
    ks = [cond_key(info["channel"], s) for s in info["eval_snrs"]]
    if all(k in c.accuracy and c.accuracy[k]["level"] == "full" for k in ks):
        return mean(c.accuracy[k]["wer"] for k in ks)
    return None


def eligible(cands: list[Cand], d: str, info: dict, ranked: list[Cand], n_cheap: int) -> tuple[list[tuple], dict]:
    """(WER, latency, bytes, id) of the plans that meet every budget and were evaluated in full,
    and why each other plan was rejected."""
    b = info["budgets"]
    lo = cond_key(info["channel"], info["eval_snrs"][0])
    ok, rejected = [], {}
    for c in cands:
        p = c.predicted.get(d)
        if p is None:
            rejected[c.cid] = f"format {c.format}: {info.get('ep', 'its first EP')} runs {', '.join(info.get('formats', []))}"
            continue
        why = []
        if p["memory_mb"] > b["memory_mb"]:
            why.append(f"memory {p['memory_mb']:.0f} MB > budget {b['memory_mb']:g} MB")
        if p["latency_ms"] > b["latency_ms"]:
            why.append(f"latency {p['latency_ms']:.0f} ms > budget {b['latency_ms']:g} ms")
        if why:
            rejected[c.cid] = "; ".join(why) + " (predicted)"
            continue
        w = full_wer(c, info)
        if w is None:
            best_cheap = ranked[0].accuracy[lo]["wer"] if ranked else float("nan")
            rejected[c.cid] = (f"accuracy: cheap WER {c.accuracy[lo]['wer']:.3f} at {info['channel']} "
                               f"{snr_key(info['eval_snrs'][0])} dB (n={n_cheap}) vs best {best_cheap:.3f}: not shortlisted")
            continue
        if "wer" in b and w > b["wer"]:
            rejected[c.cid] = f"accuracy: WER {w:.3f} > budget {b['wer']:g}"
            continue
        ok.append((w, p["latency_ms"], c.bytes, c.cid))
    ok.sort()
    return ok, rejected


def pick(ok: list[tuple], by_id: dict[str, Cand], info: dict, rejected: dict) -> dict:
    """Among the eligible plans, those tied with the most accurate (TIE_RULE): the one in the format the
    device's first EP prefers (info["formats"], best first), then the least compressed (largest file)."""
    ks = [cond_key(info["channel"], s) for s in info["eval_snrs"]]
    errs = {o[3]: summed_errors(by_id[o[3]], ks) for o in ok}
    diffs = tie_diffs(errs, {o[3]: o[0] for o in ok})
    best = max((o for o in ok if not diffs[o[3]]["worse"]),
               key=lambda o: (-format_rank(by_id[o[3]], info), o[2], -o[0]))
    chosen = best[3]
    for w, _, _, cid in ok:
        if cid != chosen:
            rejected[cid] = _tie_reason(w, best[0], diffs[cid], info["eval_snrs"])
    return dict(fits=True, chosen=chosen, closest=None, failing_budget=None, wer=round(best[0], 5),
                wer_ci95=wer_ci(errs[chosen]), vs_best=diffs[chosen], tie_rule=TIE_RULE,
                vs_best_by_plan={o[3]: diffs[o[3]] for o in ok})


def nearest(cands: list[Cand], d: str, info: dict) -> dict:
    """No plan fits: the closest one and the budget that fails ("format": the first EP runs none of them)."""
    cands = runs_on(cands, d)
    if not cands:
        return dict(fits=False, chosen=None, closest=None, failing_budget="format")
    feasible = [c for c in cands if fits(c, d, info["budgets"])]
    if feasible:  # memory and latency are met, the accuracy budget is not
        near = min(feasible, key=lambda c: (full_wer(c, info) if full_wer(c, info) is not None else 9e9, c.bytes))
        failing = "accuracy"
    else:
        near, failing = closest(cands, d, info["budgets"])
    return dict(fits=False, chosen=None, closest=near.cid, failing_budget=failing)


def choose_device(d: str, info: dict, cands: list[Cand], ranked: list[Cand], short: list[str], n_cheap: int) -> dict:
    """The device entry's choice fields: chosen (or closest), why the others were rejected, the Pareto set."""
    by_id = {c.cid: c for c in cands}
    ok, rejected = eligible(cands, d, info, ranked, n_cheap)
    out = pick(ok, by_id, info, rejected) if ok else nearest(cands, d, info)
    lo = cond_key(info["channel"], info["eval_snrs"][0])
    pts = {c.cid: (c.bytes, c.predicted[d]["latency_ms"], c.accuracy[lo]["wer"])
           for c in cands if c.cid not in rejected or "accuracy" in rejected[c.cid] if lo in c.accuracy}
    out["pareto"] = pareto(pts)
    out["pareto_accuracy"] = f"WER at {info['channel']} {snr_key(info['eval_snrs'][0])} dB (n={n_cheap}, feasible plans)"
    out["shortlist"] = short
    out["rejected"] = rejected
    shown = out["chosen"] or out["closest"]
    out["predicted"] = dict(by_id[shown].predicted[d]) if shown else None
    out["realised"] = None
    return out
