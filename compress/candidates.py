"""The planner's candidate space: pruning x precision, as plans (docs/planner.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from semedge.compress.plan import Plan

# Precisions of the device half (quantize_onnx configs; None = fp32).
PRECISIONS: dict[str, dict | None] = {
    "fp32": None,
    "fp16": {"mode": "fp16"},
    "int8": {"mode": "int8_dynamic", "other_weights": "int8"},
    "int4-b128": {"mode": "int4", "block_size": 128, "other_weights": "int8"},
    "int4-b32": {"mode": "int4", "block_size": 32, "other_weights": "int8"},
    "int4-mixed": {"mode": "int4", "block_size": 64, "keep_fp32": ["critical"]},
}
QUICK_PRECISIONS = ("fp32", "fp16", "int8", "int4-b32", "int4-mixed")
# Static QDQ (fixed activation ranges from calibration): in the space only when some device's
# first execution provider runs it natively (QNN's HTP, NNAPI: runtime.partition.formats_for).
TARGET_PRECISIONS: dict[str, dict] = {
    "qdq_a8w8": {"mode": "int8_static", "activations": "uint8"},
    "qdq_a16w8": {"mode": "int8_static", "activations": "uint16"},
}


def _prunings(n_layers: int, quick: bool) -> dict[str, dict | None]:
    p: dict[str, dict | None] = {"dense": None, "h25f25": {"heads": 0.25, "ffn": 0.25},
                                 "h50f50": {"heads": 0.5, "ffn": 0.5}}
    if n_layers >= 4 and not quick:  # first and last layer stay, so 2 of >= 4 can go
        p["drop2"] = {"layers": round(2 / n_layers, 4)}
    return p


def target_precisions(profiles) -> dict[str, dict]:
    """The static-QDQ precisions some profile's first execution provider runs natively."""
    from semedge.runtime.partition import formats_for

    wanted = {f for p in profiles for f in formats_for(p)}
    return {name: cfg for name, cfg in TARGET_PRECISIONS.items() if name in wanted}


def candidate_space(loaded, quick: bool = False, profiles=()) -> list[Plan]:
    """pruning {dense, heads+ffn 25%, 50%, drop 2 layers} x precision {fp32, fp16, int8, int4 b128/b32,
    int4 with fp32 critical parts}: 24 plans for a 6-layer encoder; quick: 15. Plus static QDQ
    (A8W8, A16W8) when a profile's first EP runs it natively (`target_precisions`).
    Distillation is not in the space: it needs training (give `candidates=` with a distill step to include it)."""
    n_layers = int(getattr(loaded.model.config, "encoder_layers", 0) or 0)
    precs = {q: PRECISIONS[q] for q in (QUICK_PRECISIONS if quick else tuple(PRECISIONS))}
    precs.update(target_precisions(profiles))
    out = []
    for pname, pcfg in _prunings(n_layers, quick).items():
        for qname, qcfg in precs.items():
            steps = []
            if pcfg:
                steps.append({"op": "prune", "config": pcfg})
            if qcfg:
                steps.append({"op": "quantize_onnx", "config": qcfg})
            out.append(Plan.make(steps, f"{pname}.{qname}"))
    return out


@dataclass
class Cand:
    """A candidate plan and what the planner learns about it, stage by stage."""

    cid: str
    plan: Plan
    path: Path | None = None
    bytes: int = 0
    optimized: bool = True
    predicted: dict = field(default_factory=dict)  # device -> {"latency_ms", "memory_mb"}
    accuracy: dict = field(default_factory=dict)  # "channel@snr" -> {"wer", ..., "level"}
    host: dict | None = None


def make_candidates(plans: list[Plan]) -> list[Cand]:
    """One Cand per plan, named by the plan's name (or hash); a repeated name gets the hash appended."""
    cands: list[Cand] = []
    seen = set()
    for p in plans:
        cid = p.name or p.hash()[:12]
        if cid in seen:
            cid = f"{cid}-{p.hash()[:8]}"
        seen.add(cid)
        cands.append(Cand(cid, p))
    return cands
