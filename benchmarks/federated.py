"""Federated split fine-tuning on whisper-base: WER per client before / after / personalised, bytes and
time per round (docs/federated.md). Writes benchmarks/results/federated[_quick].json and prints a table.

    python benchmarks/federated.py --quick     # 3 clients x 3 rounds x 5 local steps x batch 2 (~15 min, 2 cores)
    python benchmarks/federated.py             # 4 clients x 5 rounds x 10 local steps x batch 4

Not measured here yet: the centralised `semedge train` run with the same total steps (the issue's
third arm); see docs/federated.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"
QUICK = dict(clients=3, rounds=3, local_steps=5, batch_size=2, n_train=16, n_test=20)
FULL = dict(clients=4, rounds=5, local_steps=10, batch_size=4, n_train=40, n_test=50)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the small run (3 x 3 x 5, batch 2)")
    p.add_argument("--model", default="whisper-base")
    p.add_argument("--non-iid", default="voices")
    p.add_argument("--actors", type=int, default=1, help="client processes (1: clients run in turn)")
    p.add_argument("--engine", default="simulation", choices=("simulation", "local"), help="local: one process, no Ray")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)

    from semedge.semcom.federated.config import FederateConfig
    from semedge.semcom.federated.flower_server import run_simulation
    from semedge.cli_federate import print_summary

    sizes = QUICK if a.quick else FULL
    cfg = FederateConfig(model=a.model, non_iid=a.non_iid, engine=a.engine, threads=1, **sizes).validate()
    out = a.out or RESULTS / ("federated_quick" if a.quick else "federated")
    if a.engine == "local":
        from semedge.semcom.federated.local_grid import run_local

        res = run_local(cfg, Path("runs") / out.name)
    else:
        res = run_simulation(cfg, Path("runs") / out.name, a.actors)
    out.parent.mkdir(parents=True, exist_ok=True)
    from semedge.core.files import write_atomic

    write_atomic(out.with_suffix(".json"), json.dumps(res, indent=1) + "\n")
    print_summary(res)
    print(f"wrote {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
