"""What crosses the link, per round and client: payload bytes by kind, and wall time per round.

Counted: the array data of every record the server sends or receives (numpy nbytes) and the
UTF-8 length of config strings (the run's JSON, transcripts). Not counted: Flower's framing
(protobuf, gRPC), which the simulation engine does not put on a wire at all.

Kinds: up: activations (channel symbols y), labels (token ids + lengths), params (the client's
trained parameters), eval (test symbols), metrics (example counts, per-utterance error counts); down: grads (dL/dy),
params (global parameters), transcripts (evaluation), control (the run config).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

UPLINK_KIND = {"symbols": "activations", "lengths": "labels", "labels": "labels", "label_lengths": "labels"}


def array_bytes(arrays: dict) -> int:
    return int(sum(np.asarray(v).nbytes for v in arrays.values()))


def text_bytes(values) -> int:
    """UTF-8 bytes of a config value (str, list of str) or 8 per number."""
    if isinstance(values, str):
        return len(values.encode())
    if isinstance(values, (list, tuple)):
        return sum(text_bytes(v) for v in values)
    return 8


class Ledger:
    """Bytes per (phase, round, client, direction, kind) and seconds per round."""

    def __init__(self):
        self.bytes: dict[tuple, int] = defaultdict(int)
        self.seconds: dict[tuple[str, int], float] = {}
        self.clients: dict[int, dict] = {}  # node id -> {partition, label}

    def add(self, phase: str, rnd: int, node: int, direction: str, kind: str, n: int) -> None:
        self.bytes[(phase, rnd, node, direction, kind)] += int(n)

    def uplink(self, phase: str, rnd: int, node: int, up: dict) -> None:
        for k, v in up.items():
            self.add(phase, rnd, node, "up", UPLINK_KIND.get(k, "eval"), np.asarray(v).nbytes)

    def per_round(self, phase: str = "train") -> list[dict]:
        """[{round, seconds, clients: {partition: {up: {kind: bytes}, down: {...}, total_up, total_down}}}]."""
        rounds = sorted({r for (p, r, *_rest) in self.bytes if p == phase})
        out = []
        for r in rounds:
            per: dict = {}
            for (p, rr, node, d, kind), n in sorted(self.bytes.items()):
                if p != phase or rr != r:
                    continue
                name = str(self.clients.get(node, {}).get("partition", node))
                c = per.setdefault(name, {"up": {}, "down": {}})
                c[d][kind] = c[d].get(kind, 0) + n
            for c in per.values():
                c["total_up"], c["total_down"] = sum(c["up"].values()), sum(c["down"].values())
            out.append({"round": r, "seconds": self.seconds.get((phase, r)), "clients": per})
        return out

    def to_dict(self) -> dict:
        phases = sorted({p for (p, *_rest) in self.bytes})
        return {"counted": "array payload bytes and config strings; Flower's framing excluded",
                "phases": {p: self.per_round(p) for p in phases}}
