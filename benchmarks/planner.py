"""The planner against the oracle (every feasible candidate evaluated in full), for every shipped profile.

    python benchmarks/planner.py [--quick] [--profiles device_profiles/] [--workdir build/planner-bench]

1. The planner (compress/planner.py) on the full candidate space (>= 24 plans), timed,
   with an empty accuracy cache (built ONNX files are reused from --workdir when present;
   the JSON says how many were built in this run).
2. The oracle: the same code with full evaluation of every candidate that fits a device
   (full_share=1), reusing the planner's measurements from the shared cache.
3. Per profile: the planner's pick and its WER vs the oracle's best feasible plan
   (mean WER at the device's evaluation SNRs, n_full validation utterances), and the
   paired bootstrap of pick minus best (same utterances and noise): the pick matches the
   oracle when it is the oracle's pick or not significantly worse than its best at 95%
   (the planner's tie rule, docs/planner.md).
Writes benchmarks/results/planner.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results"


def _dev_wer(res: dict, dev: str, cid: str | None) -> float | None:
    """Mean full WER of candidate `cid` at the device's evaluation SNRs (None when not evaluated in full)."""
    if cid is None:
        return None
    info = res["devices"][dev]
    acc = res["candidates"][cid]["accuracy_by_channel"]
    ws = []
    for s in info["eval_snrs"]:
        a = acc.get(f"{info['channel']}@{s:g}")
        if a is None or a["level"] != "full":
            return None
        ws.append(a["wer"])
    return sum(ws) / len(ws)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer utterances, low-end SNR only (a few minutes per pass)")
    ap.add_argument("--model", default="whisper-base")
    ap.add_argument("--profiles", default=None, help="profiles folder (default: the shipped ones)")
    ap.add_argument("--workdir", default="build/planner-bench")
    ap.add_argument("--n-cheap", type=int, default=None)
    ap.add_argument("--n-full", type=int, default=None)
    ap.add_argument("--no-realise", action="store_true")
    ap.add_argument("--keep-cache", action="store_true", help="keep measured accuracies (the planner's time is then not cold)")
    ap.add_argument("--out", default=str(RESULTS / "planner.json"))
    args = ap.parse_args(argv)

    from semedge.compress.plan import write_atomic
    from semedge.compress.planner import TIE_RULE, NoPlanFits, candidate_space, plan_devices
    from semedge.runtime.profiles import load_profiles
    from semedge.semcom.models import load_model

    quick = args.quick
    n_cheap = args.n_cheap or (3 if quick else 8)
    n_full = args.n_full or (8 if quick else 40)
    profiles = list(load_profiles(args.profiles).values())
    loaded = load_model(args.model)
    space = candidate_space(loaded, quick=False)
    work = Path(args.workdir)
    if not args.keep_cache:
        (work / "accuracy.json").unlink(missing_ok=True)  # the planner's accuracy work is timed from scratch

    def run(**kw):
        try:
            return plan_devices(loaded, profiles, quick=quick, n_cheap=n_cheap, n_full=n_full, candidates=space,
                                workdir=work, **kw)
        except NoPlanFits as e:
            return e.result

    t0 = time.time()
    planner = run(realise=not args.no_realise)
    t_plan = time.time() - t0
    t1 = time.time()
    oracle = run(realise=False, full_share=1.0, shortlist=len(space))
    t_oracle = time.time() - t1

    rows = []
    for dev, info in planner["devices"].items():
        o = oracle["devices"][dev]
        pick, best = info["chosen"], o["chosen"]
        w_pick, w_best = _dev_wer(oracle, dev, pick), _dev_wer(oracle, dev, best)
        gap = None if w_pick is None or w_best is None else round(100 * (w_pick - w_best), 2)
        vs = (o.get("vs_best_by_plan") or {}).get(pick) if pick else None
        r = info.get("realised") or {}
        rows.append({"device": dev, "class": info["device_class"], "budgets": info["budgets"],
                     "channel": info["channel"], "eval_snrs": info["eval_snrs"],
                     "planner": pick, "planner_plan": planner["candidates"][pick]["describe"] if pick else None,
                     "planner_wer": w_pick, "oracle": best, "oracle_wer": w_best, "gap_wer_points": gap,
                     "within_1_point": gap is not None and gap <= 1.0,
                     "oracle_wer_ci95": o.get("wer_ci95"), "vs_oracle_best": vs,
                     "matches_oracle": pick == best or (vs is not None and not vs["worse"]),
                     "closest": info.get("closest"), "failing_budget": info.get("failing_budget"),
                     "oracle_fits": o["fits"], "predicted": info.get("predicted"),
                     "realised": r or None})
    fits = [r for r in rows if r["planner"] is not None or r["oracle"] is not None]
    result = {
        "benchmark": "planner", "model": args.model, "quick": quick, "n_cheap": n_cheap, "n_full": n_full,
        "candidates": len(space), "candidate_ids": [p.name for p in space],
        "fully_evaluated": planner["timing"]["fully_evaluated"],
        "fully_evaluated_share": planner["timing"]["fully_evaluated_share"],
        "planner_seconds": round(t_plan, 1), "accuracy_cache_kept": args.keep_cache, "planner_timing": planner["timing"],
        "oracle_seconds": round(t_oracle, 1), "oracle_timing": oracle["timing"],
        "all_within_1_point": all(r["within_1_point"] for r in fits) if fits else None,
        "all_match_oracle": all(r["matches_oracle"] for r in fits) if fits else None,
        "tie_rule": TIE_RULE,
        "devices_without_plan": [r["device"] for r in rows if r["planner"] is None],
        "host_note": "shared 2-core host, 1 thread; realised latency is wall p50 (cpu p50 beside it)",
        "rows": rows,
        "plans": planner,
    }
    write_atomic(args.out, (json.dumps(result, indent=1) + "\n").encode())
    print_table(result)
    print(f"wrote {args.out}")
    return 0


def print_table(res: dict) -> None:
    print(f"candidates {res['candidates']}, fully evaluated {res['fully_evaluated']} "
          f"({100 * res['fully_evaluated_share']:.0f}%), planner {res['planner_seconds']:.0f} s "
          f"(realise {res['planner_timing'].get('realise_seconds', 0):.0f} s), oracle {res['oracle_seconds']:.0f} s")
    from semedge.semcom.stats import fmt_ci

    hdr = (f"{'device':18} {'MB':>6} {'ms':>6} {'planner':22} {'WER':>6} {'oracle':22} {'WER [95%]':>21} "
           f"{'gap, paired [95%]':>19} {'match':>5} {'RSS MB':>7}")
    print(hdr)
    for r in res["rows"]:
        f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        rz = r.get("realised") or {}
        pick = r["planner"] or f"NONE ({r['failing_budget']}; ~{r['closest']})"
        mb, ms = (("-" if v is None else f"{v:.0f}") for v in (r["budgets"]["memory_mb"], r["budgets"]["latency_ms"]))
        print(f"{r['device']:18} {mb:>6} {ms:>6} {pick:22} "
              f"{f(r['planner_wer']):>6} {str(r['oracle']):22} "
              f"{fmt_ci(r.get('oracle_wer_ci95')) if r.get('oracle_wer_ci95') else f(r['oracle_wer']):>21} "
              f"{fmt_ci(r.get('vs_oracle_best'), 1, 100) if r.get('vs_oracle_best') else str(r['gap_wer_points']):>19} "
              f"{'yes' if r.get('matches_oracle') else 'no':>5} "
              f"{rz.get('model_rss_mb', '-') if rz else '-':>7}")


if __name__ == "__main__":
    sys.exit(main())
