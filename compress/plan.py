"""Compression plans: an ordered list of steps, plain JSON in and out.

A step is {"op": OP, "config": {...}} with OP one of
- "prune"           structured pruning of the encoder (compress/prune.py, torch)
- "distill"         a smaller student encoder trained against the teacher (compress/distill.py, torch)
- "student"         a shipped student codec: its smaller device encoder, codec and server adapters in
                    place of the model's own (compress/students.py, torch; the plan's first step)
- "quantize_onnx"   quantization of the exported device half (compress/quantize_onnx.py, ONNX)
- "quantize_server" quantization of the PyTorch server half (compress/quantize_torch.py)

Torch steps run first (in plan order), then the model is exported, then the ONNX
steps run on the exported file, in plan order (several may follow each other); server
steps change the server half only. `STEPS` is the registry from op to its kind and
config class; a new op is one StepKind line there.
Every step is deterministic, so applying a plan twice gives the same bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from semedge.core.files import write_atomic  # noqa: F401 (re-exported)
from semedge.core.errors import UserError


@dataclass(frozen=True)
class StepKind:
    """What a plan op is: when it runs ("torch" before export, "onnx" after it, "server") and
    its config class, named "module:Class" and imported on first use (the modules import this one)."""

    runs: str
    config: str

    def config_class(self):
        import importlib

        mod, _, cls = self.config.partition(":")
        return getattr(importlib.import_module(mod), cls)


# The registry: a step's "op" -> its kind.
STEPS: dict[str, StepKind] = {
    "prune": StepKind("torch", "semedge.compress.prune:PruneConfig"),
    "distill": StepKind("torch", "semedge.compress.distill:DistillConfig"),
    "student": StepKind("torch", "semedge.compress.students:StudentConfig"),
    "quantize_onnx": StepKind("onnx", "semedge.compress.quantize_onnx:OnnxQuantConfig"),
    "quantize_server": StepKind("server", "semedge.compress.quantize_torch:ServerQuantConfig"),
}
TORCH_OPS = tuple(op for op, k in STEPS.items() if k.runs == "torch")
ONNX_OPS = tuple(op for op, k in STEPS.items() if k.runs == "onnx")
SERVER_OPS = tuple(op for op, k in STEPS.items() if k.runs == "server")
OPS = tuple(STEPS)


# ---------------------------------------------------------------- config base


class ConfigBase:
    """Mixin for the technique configs (frozen dataclasses): JSON round trip with checked fields."""

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict | None, where: str = ""):
        d = {} if d is None else d
        if not isinstance(d, dict):
            raise UserError(f"{where or cls.__name__} must be a JSON object, got {type(d).__name__}",
                            f"write it as {{\"field\": value}}; fields: {sorted(f.name for f in dataclasses.fields(cls))}")
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise UserError(f"{where or cls.__name__} has unknown field(s) {unknown}", f"allowed fields: {sorted(allowed)}")
        try:
            return cls(**d)
        except UserError as e:
            if where:
                raise UserError(f"{where}: {e.problem}", e.fix) from None
            raise
        except TypeError as e:
            raise UserError(f"{where or cls.__name__}: {e}", f"allowed fields: {sorted(allowed)}") from None

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))


def _plain(v):
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def check_ratio(name: str, value, low: float = 0.0, high: float = 1.0, high_open: bool = True) -> float:
    """A fraction in [low, high) (or [low, high]); UserError naming the field otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{name}={value!r} is not a number", f"set {name} to a fraction in [{low}, {high})")
    ok = low <= value < high if high_open else low <= value <= high
    if not ok:
        rng = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        raise UserError(f"{name}={value} is out of range", f"set {name} to a fraction in {rng}")
    return float(value)


def check_choice(name: str, value, allowed) -> str:
    if value not in allowed:
        raise UserError(f"{name}={value!r} is not allowed", f"use one of {', '.join(map(str, allowed))}")
    return value


# ---------------------------------------------------------------- plans


@dataclass(frozen=True)
class Step:
    op: str
    config: Any  # the op's config dataclass

    @classmethod
    def make(cls, op: str, config: dict | Any | None = None, index: int | None = None) -> "Step":
        where = f"plan step {index}" if index is not None else "plan step"
        if op not in OPS:
            raise UserError(f"{where}: op {op!r} is unknown", f"use one of {', '.join(OPS)}")
        klass = STEPS[op].config_class()
        if isinstance(config, klass):
            return cls(op, config)
        return cls(op, klass.from_dict(config, where=f"{where} ({op}) config"))

    def to_dict(self) -> dict:
        return {"op": self.op, "config": self.config.to_dict()}


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...] = ()
    name: str = ""

    def __post_init__(self):
        object.__setattr__(self, "steps", tuple(self.steps))
        seen_onnx = False
        for i, s in enumerate(self.steps):
            if not isinstance(s, Step):
                raise UserError(f"plan step {i} is not a Step", "build steps with Step.make(op, config)")
            if s.op in ONNX_OPS:
                seen_onnx = True
            elif s.op in TORCH_OPS and seen_onnx:
                raise UserError(f"plan step {i} ({s.op}) comes after quantize_onnx",
                                "put prune/distill steps before the quantize_onnx step (torch steps run before export)")
        _check_student(self.steps)

    @classmethod
    def make(cls, steps: list, name: str = "") -> "Plan":
        """steps: Step objects or {"op": ..., "config": {...}} dicts."""
        if not isinstance(steps, (list, tuple)):
            raise UserError(f"plan steps must be a list, got {type(steps).__name__}", 'write "steps": [{"op": ..., "config": {...}}, ...]')
        out = []
        for i, s in enumerate(steps):
            if isinstance(s, Step):
                out.append(s)
                continue
            if not isinstance(s, dict) or "op" not in s:
                raise UserError(f"plan step {i} must be an object with an \"op\" field", f"ops: {', '.join(OPS)}")
            extra = sorted(set(s) - {"op", "config"})
            if extra:
                raise UserError(f"plan step {i} has unknown field(s) {extra}", 'a step has only "op" and "config"')
            out.append(Step.make(s["op"], s.get("config"), index=i))
        return cls(tuple(out), name)

    def to_dict(self) -> dict:
        return {"name": self.name, "steps": [s.to_dict() for s in self.steps]}

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True, indent=2) + "\n"
        if path is not None:
            write_atomic(path, text.encode())
        return text

    @classmethod
    def from_json(cls, path_or_str: str | Path) -> "Plan":
        s = str(path_or_str)
        if not s.lstrip().startswith("{"):
            p = Path(s)
            if not p.is_file():
                raise UserError(f"plan file {s} does not exist", "pass a plan JSON file or a JSON string")
            s = p.read_text()
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise UserError(f"plan is not valid JSON: {e}", "check the plan file's syntax") from None
        if not isinstance(d, dict):
            raise UserError("plan must be a JSON object", '{"name": ..., "steps": [...]}')
        extra = sorted(set(d) - {"name", "steps"})
        if extra:
            raise UserError(f"plan has unknown field(s) {extra}", 'a plan has only "name" and "steps"')
        return cls.make(d.get("steps", []), d.get("name", ""))

    def hash(self) -> str:
        """sha256 of the canonical JSON of the steps (the name does not count)."""
        canon = json.dumps([s.to_dict() for s in self.steps], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()

    def ops(self, kinds) -> list[Step]:
        return [s for s in self.steps if s.op in kinds]


def _check_student(steps) -> None:
    """A student step replaces the whole device half: it comes first, once, and no distill step follows."""
    ops = [s.op for s in steps]
    if "student" not in ops:
        return
    if ops.index("student") != 0 or ops.count("student") > 1:
        raise UserError(f"plan steps {ops}: a student step must be the plan's first and only student step",
                        "put the one student step first (prune/quantize steps may follow it)")
    if "distill" in ops:
        raise UserError("a plan has both a student and a distill step", "use one of them: the student is already distilled")


def describe(plan: Plan) -> str:
    """One line, e.g. 'prune(h=0.25,f=0.25) → int8'."""
    parts = [s.config.describe() for s in plan.steps]
    return " → ".join(parts) if parts else "fp32"


# ---------------------------------------------------------------- applying


def _prune(split, step: Step, calib, teacher, progress, workdir):
    from semedge.compress import prune

    # ranks on log-mel features only (a distillation set gives its "features")
    pcal = calib["features"][:8] if isinstance(calib, dict) and "features" in calib else calib
    return prune.apply(split, step.config, pcal)


def _distill(split, step: Step, calib, teacher, progress, workdir):
    from semedge.compress import distill

    return distill.apply(split, step.config, calib, progress=progress, workdir=workdir, teacher=teacher)


def _student(split, step: Step, calib, teacher, progress, workdir):
    from semedge.compress import students

    return students.apply(split, step.config)


_TORCH_APPLY = {"prune": _prune, "distill": _distill, "student": _student}  # torch op -> how it runs


def apply_torch_steps(split, plan: Plan, calib=None, progress: bool = False, workdir: str | Path | None = None):
    """Run the plan's prune/distill steps in order on a copy of `split`; returns the new split."""
    teacher = split  # distillation after pruning learns from the unpruned model (recovery)
    for step in plan.ops(TORCH_OPS):
        new = _TORCH_APPLY[step.op](split, step, calib, teacher, progress, workdir)
        if hasattr(split, "jsc_path") and not hasattr(new, "jsc_path"):  # a pruned student keeps its codec folder
            new.jsc_path = split.jsc_path
        split = new
    return split


def apply_onnx_steps(onnx_in: str | Path, onnx_out: str | Path, plan: Plan, calib=None) -> Path:
    """Run the plan's quantize_onnx steps in order on the exported device half (a plain copy if none)."""
    from semedge.compress import quantize_onnx
    from semedge.core.files import replace_atomic, scratch_dir

    steps = plan.ops(ONNX_OPS)
    if not steps:
        return Path(write_atomic(onnx_out, Path(onnx_in).read_bytes()))
    onnx_out = Path(onnx_out)
    with scratch_dir(onnx_out.parent) as td:  # every graph (and the quantizer's temporaries) in there
        src = Path(onnx_in)
        for i, step in enumerate(steps):
            src = quantize_onnx.apply(src, td / f"step{i}.onnx", step.config, calib)
        replace_atomic(src, onnx_out)
    return onnx_out


def apply_server_steps(split, plan: Plan):
    """Quantize the server half's decoder per the plan's quantize_server steps."""
    from semedge.compress import quantize_torch

    for step in plan.ops(SERVER_OPS):
        split = quantize_torch.apply(split, step.config)
    return split
