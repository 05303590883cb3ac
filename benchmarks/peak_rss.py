"""Peak resident memory of a command and all its children (issue 20: `make demo` <= 4 GB).

    python benchmarks/peak_rss.py [--interval 0.2] [--name demo] -- make demo
    python benchmarks/peak_rss.py -- .venv/bin/semedge plan --devices android-mid
    python benchmarks/peak_rss.py --planner [--quick] [--workdir DIR] [--name NAME]

Samples the RSS of the process tree (psutil) every --interval seconds and reports the peak
of the sum (what the machine must hold at once) and the peak of the largest single process,
with the time of each; also the kernel's own per-process high-water mark for the top
process (ru_maxrss of the waited child, which `/usr/bin/time -v` prints) as a cross-check.
Prints one table line and appends a JSON record to benchmarks/results/peak_rss.json.
Short spikes between samples are missed by the tree sum; ru_maxrss does not miss them.

--planner runs the planner (compress/planner.py, whisper-base, every shipped profile) in this
process instead and records this process's RSS after each candidate of each stage (build,
cheap, full: the planner's on_candidate hook), the median growth per candidate, and the peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "peak_rss.json"


def tree_rss(proc) -> tuple[int, int, int]:
    """(sum of RSS over proc and its descendants, largest single RSS, process count), bytes."""
    import psutil

    total, top, n = 0, 0, 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            rss = p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total, top, n = total + rss, max(top, rss), n + 1
    return total, top, n


def measure(cmd: list[str], interval: float) -> dict:
    """Run `cmd` to its end, sampling its process tree; the peaks and when they happened."""
    import psutil

    t0 = time.monotonic()
    child = subprocess.Popen(cmd)
    proc = psutil.Process(child.pid)
    peak = {"tree_bytes": 0, "tree_at_s": 0.0, "single_bytes": 0, "processes": 0, "samples": 0}
    while child.poll() is None:
        total, top, n = tree_rss(proc)
        now = time.monotonic() - t0
        if total > peak["tree_bytes"]:
            peak.update(tree_bytes=total, tree_at_s=round(now, 1), processes=n)
        peak["single_bytes"] = max(peak["single_bytes"], top)
        peak["samples"] += 1
        time.sleep(interval)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # ru_maxrss: KiB on Linux
    peak.update(returncode=child.returncode, seconds=round(time.monotonic() - t0, 1),
                ru_maxrss_bytes=int(usage.ru_maxrss) * (1 if sys.platform == "darwin" else 1024))
    return peak


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def median(xs: list) -> float | None:
    xs = sorted(xs)
    return None if not xs else (xs[len(xs) // 2] + xs[(len(xs) - 1) // 2]) / 2


def growth(steps: list[dict]) -> dict:
    """Per stage: RSS after its first and last candidate and the median step between candidates (MB)."""
    out = {}
    for stage in dict.fromkeys(s["stage"] for s in steps):
        mb = [s["rss_mb"] for s in steps if s["stage"] == stage]
        out[stage] = {"candidates": len(mb), "first_mb": mb[0], "last_mb": mb[-1],
                      "median_step_mb": round(median([b - a for a, b in zip(mb, mb[1:])]) or 0.0, 1)}
    return out


def measure_planner(model: str, quick: bool, workdir: str, trim: bool = True) -> dict:
    """Run the planner here; RSS after each candidate of each stage, and the peak (ru_maxrss).
    trim=False: the planner's malloc_trim after each candidate (runtime.evaluate.trim_memory) is off."""
    import gc

    from semedge.compress.planner import NoPlanFits, plan_devices
    from semedge.runtime import evaluate
    from semedge.runtime.profiles import load_profiles

    if not trim:
        evaluate.trim_memory = gc.collect

    t0 = time.monotonic()
    steps: list[dict] = []

    def on_candidate(stage: str, cid: str) -> None:
        steps.append({"stage": stage, "cid": cid, "rss_mb": round(rss_bytes() / 1e6, 1),
                      "at_s": round(time.monotonic() - t0, 1)})
        print(f"  rss {stage:5} {cid:22} {steps[-1]['rss_mb']:8.1f} MB", file=sys.stderr, flush=True)

    rc = 0
    try:
        plan_devices(model, list(load_profiles(None).values()), quick=quick, workdir=workdir, on_candidate=on_candidate)
    except NoPlanFits as e:
        rc = e.exit_code
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    mb = [s["rss_mb"] for s in steps]
    return {"returncode": rc, "seconds": round(time.monotonic() - t0, 1), "ru_maxrss_bytes": int(peak),
            "by_stage": growth(steps), "median_step_mb": round(median([b - a for a, b in zip(mb, mb[1:])]) or 0.0, 1),
            "final_rss_mb": mb[-1] if mb else None, "steps": steps}


def print_planner(name: str, res: dict) -> None:
    print(f"{name}: peak (ru_maxrss) {res['ru_maxrss_bytes'] / 1e9:.2f} GB, final RSS {res['final_rss_mb']} MB, "
          f"median step {res['median_step_mb']} MB, {res['seconds']} s, exit {res['returncode']}")
    print(f"  {'stage':6} {'cands':>5} {'first MB':>9} {'last MB':>9} {'median step MB':>15}")
    for stage, g in res["by_stage"].items():
        print(f"  {stage:6} {g['candidates']:5d} {g['first_mb']:9.1f} {g['last_mb']:9.1f} {g['median_step_mb']:15.1f}")


def append_result(rec: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    RESULTS.write_text(json.dumps([*old, rec], indent=2) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    ap.add_argument("--name", default=None, help="label of this run in the JSON (default: the command)")
    ap.add_argument("--planner", action="store_true", help="run the planner here, RSS after each candidate")
    ap.add_argument("--quick", action="store_true", help="--planner: its quick settings")
    ap.add_argument("--model", default="whisper-base", help="--planner: the model")
    ap.add_argument("--workdir", default="build/peak-rss-planner", help="--planner: its workdir (cold: a fresh one)")
    ap.add_argument("--no-trim", action="store_true", help="--planner: without its malloc_trim per candidate")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command to measure")
    args = ap.parse_args(argv)
    when = {"host": platform.node(), "cpus": os.cpu_count(), "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if args.planner:
        name = args.name or f"planner {args.model}{' --quick' if args.quick else ''}"
        res = measure_planner(args.model, args.quick, args.workdir, trim=not args.no_trim)
        print_planner(name, res)
        append_result({"name": name, "planner": True, "quick": args.quick, "model": args.model,
                       "workdir": args.workdir, "malloc_trim": not args.no_trim, **when, **res})
        return res["returncode"]
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("give the command after --, e.g. -- make demo")
    res = measure(cmd, args.interval)
    gib = 1024 ** 3
    print(f"{args.name or ' '.join(cmd)}: peak tree RSS {res['tree_bytes'] / gib:.2f} GiB at {res['tree_at_s']} s "
          f"({res['processes']} processes), largest process {res['single_bytes'] / gib:.2f} GiB, "
          f"ru_maxrss {res['ru_maxrss_bytes'] / gib:.2f} GiB, {res['seconds']} s, exit {res['returncode']}")
    append_result({"name": args.name or " ".join(cmd), "cmd": cmd, **when, **res})
    return res["returncode"]


if __name__ == "__main__":
    sys.exit(main())
