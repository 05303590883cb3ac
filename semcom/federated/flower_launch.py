"""Flower 1.42's own `flower-superlink` / `flower-supernode`, started with one setting widened.

    python -m semedge.semcom.federated.flower_launch superlink|supernode [their flags...]

A SuperLink or SuperNode starts one process per task (the ServerApp; a ClientApp per message)
and gives it HEARTBEAT_DEFAULT_INTERVAL (30 s) to report, then 2x that between heartbeats;
a task that misses the first is re-queued and its token revoked. A fresh Python process that
imports Flower can take longer than 30 s on a loaded host (measured here: 94 s, niced, load
26), so the run stalls. We set that interval for task tokens only (the in-memory state's copy
of the constant) to TASK_HEARTBEAT_S; nodes keep Flower's 30 s, so a dead SuperNode is still
found after 2 x 30 s. Nothing else is changed: the rest is Flower's CLI as installed.
"""

from __future__ import annotations

import sys

TASK_HEARTBEAT_S = 180


def main() -> None:
    import flwr.supercore.corestate.in_memory_corestate as corestate

    corestate.HEARTBEAT_DEFAULT_INTERVAL = TASK_HEARTBEAT_S  # read at call time by claim/activate/heartbeat
    which = sys.argv.pop(1) if len(sys.argv) > 1 else ""
    if which == "superlink":
        from flwr.superlink.cli.flower_superlink import flower_superlink as cli
    elif which == "supernode":
        from flwr.supernode.cli.flower_supernode import flower_supernode as cli
    else:
        sys.exit("usage: python -m semedge.semcom.federated.flower_launch superlink|supernode [flags]")
    sys.argv[0] = f"flower-{which}"
    cli()


if __name__ == "__main__":
    main()
