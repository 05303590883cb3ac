"""The planner's candidate space: pruning x precision, and the students x precision, as plans (docs/planner.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from semedge.compress.plan import Plan
from semedge.compress.targets import FORMATS

# Precisions of the device half (quantize_onnx configs; None = fp32), and the package format each makes
# (compress/targets.py): a device is offered only those its first EP runs (runtime.partition.formats_for).
PRECISIONS: dict[str, dict | None] = {
    "fp32": None,
    "fp16": {"mode": "fp16"},
    "int8": {"mode": "int8_dynamic", "other_weights": "int8"},
    "int4-b128": {"mode": "int4", "block_size": 128, "other_weights": "int8"},
    "int4-b32": {"mode": "int4", "block_size": 32, "other_weights": "int8"},
    "int4-mixed": {"mode": "int4", "block_size": 64, "keep_fp32": ["critical"]},
    "qdq-a8w8": FORMATS["qdq_a8w8"],  # NNAPI, QNN: static QDQ, the mix `semedge export --device` builds
    "qdq-a16w8": FORMATS["qdq_a16w8"],  # QNN
}
FORMAT_OF = {"fp32": "fp32", "fp16": "fp16", "int8": "int8_dynamic", "int4-b128": "int4", "int4-b32": "int4",
             "int4-mixed": "int4", "qdq-a8w8": "qdq_a8w8", "qdq-a16w8": "qdq_a16w8"}
QUICK_PRECISIONS = ("fp32", "fp16", "int8", "int4-b32", "int4-mixed", "qdq-a8w8", "qdq-a16w8")


def _prunings(n_layers: int, quick: bool) -> dict[str, dict | None]:
    p: dict[str, dict | None] = {"dense": None, "h25f25": {"heads": 0.25, "ffn": 0.25},
                                 "h50f50": {"heads": 0.5, "ffn": 0.5}}
    if n_layers >= 4 and not quick:  # first and last layer stay, so 2 of >= 4 can go
        p["drop2"] = {"layers": round(2 / n_layers, 4)}
    return p


def precisions(quick: bool, formats=None) -> tuple[str, ...]:
    """The precisions in the space: those making a format in `formats` (None: every format)."""
    precs = QUICK_PRECISIONS if quick else tuple(PRECISIONS)
    return tuple(q for q in precs if formats is None or FORMAT_OF[q] in formats)


def candidate_space(loaded, quick: bool = False, students=None, formats=None) -> list[Plan]:
    """pruning {dense, heads+ffn 25%, 50%, drop 2 layers} x precision {fp32, fp16, int8, int4 b128/b32,
    int4 with fp32 critical parts, static QDQ A8W8 / A16W8}: 32 plans for a 6-layer encoder; quick: 21.
    Then each student (compress/students.py) x the same precisions, unpruned: the shipped students of
    `loaded` and the folders in `students`. formats: keep only precisions making one of these package
    formats (the planner gives those some device's first EP runs). Training a new student is not in the
    space (give `candidates=` with a distill step)."""
    from semedge.compress.students import check_students, shipped_students, student_plans

    precs = precisions(quick, formats)
    folders = list(dict.fromkeys(shipped_students(loaded) + check_students(students or [], loaded)))  # each once
    return _base_space(loaded, precs, quick) + student_plans(folders, {q: PRECISIONS[q] for q in precs})


def _base_space(loaded, precs: tuple, quick: bool) -> list[Plan]:
    """Pruning x precision on the model's own encoder."""
    n_layers = int(getattr(loaded.model.config, "encoder_layers", 0) or 0)
    out = []
    for pname, pcfg in _prunings(n_layers, quick).items():
        for qname in precs:
            steps = []
            if pcfg:
                steps.append({"op": "prune", "config": pcfg})
            if PRECISIONS[qname]:
                steps.append({"op": "quantize_onnx", "config": PRECISIONS[qname]})
            out.append(Plan.make(steps, f"{pname}.{qname}"))
    return out


@dataclass
class Cand:
    """A candidate plan and what the planner learns about it, stage by stage."""

    cid: str
    plan: Plan
    path: Path | None = None  # the graph evaluated: fused (CPU EPs) when built, else `plain`
    plain: Path | None = None  # the unfused graph accelerator EPs compile (built when a device's first EP is one)
    bytes: int = 0
    optimized: bool = True
    predicted: dict = field(default_factory=dict)  # device -> {"latency_ms", "memory_mb"}
    accuracy: dict = field(default_factory=dict)  # "channel@snr" -> {"wer", ..., "level"}
    host: dict | None = None

    @property
    def format(self) -> str:
        """The package format its plan makes (compress/targets.py FORMATS)."""
        from semedge.compress.targets import plan_format

        return plan_format(self.plan)


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
