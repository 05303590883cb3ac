"""Peak resident memory of a command and all its children (issue 20: `make demo` <= 4 GB).

    python benchmarks/peak_rss.py [--interval 0.2] [--name demo] -- make demo
    python benchmarks/peak_rss.py -- .venv/bin/semedge plan --devices android-mid

Samples the RSS of the process tree (psutil) every --interval seconds and reports the peak
of the sum (what the machine must hold at once) and the peak of the largest single process,
with the time of each; also the kernel's own per-process high-water mark for the top
process (ru_maxrss of the waited child, which `/usr/bin/time -v` prints) as a cross-check.
Prints one table line and appends a JSON record to benchmarks/results/peak_rss.json.
Short spikes between samples are missed by the tree sum; ru_maxrss does not miss them.
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    ap.add_argument("--name", default=None, help="label of this run in the JSON (default: the command)")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command to measure")
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("give the command after --, e.g. -- make demo")
    res = measure(cmd, args.interval)
    gib = 1024 ** 3
    print(f"{args.name or ' '.join(cmd)}: peak tree RSS {res['tree_bytes'] / gib:.2f} GiB at {res['tree_at_s']} s "
          f"({res['processes']} processes), largest process {res['single_bytes'] / gib:.2f} GiB, "
          f"ru_maxrss {res['ru_maxrss_bytes'] / gib:.2f} GiB, {res['seconds']} s, exit {res['returncode']}")
    rec = {"name": args.name or " ".join(cmd), "cmd": cmd, "host": platform.node(), "cpus": os.cpu_count(),
           "when": time.strftime("%Y-%m-%dT%H:%M:%S"), **res}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    RESULTS.write_text(json.dumps([*old, rec], indent=2) + "\n")
    return res["returncode"]


if __name__ == "__main__":
    sys.exit(main())
