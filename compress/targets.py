"""The package kind each target class runs, built from the exported device half.

    kind = package_kind(profile, fmt=None, plan=None, opset=17)   # bad input fails here, before any work
    pkg = build_target_package(split, profile, kind, out, calib=lambda: builtin_calibration(loaded))

The profile's first EP decides (runtime.partition.formats_for lists what it runs natively):
- TensorRT, CUDA, CoreML: fp16 (convert_float_to_float16, fp32 inputs/outputs);
- QNN, NNAPI: static QDQ (QNN A16W8, NNAPI A8W8), activation ranges calibrated on the
  built-in train split;
- CPU, XNNPACK: int8 dynamic (MatMulInteger), or int4 (MatMulNBits) with --format int4.
Integer formats keep the JSC encoder fp32: its output is the channel symbols (QDQ on tiny Whisper:
cosine to fp32 0.82 with it quantized, 0.9999 kept).
NNAPI, CoreML and QNN graphs get fixed input shapes (export.mobile.fix_input_shapes); accelerator
graphs are exported without ORT's contrib fusions (no com.microsoft op an accelerator cannot take);
phones and watches (ORT Mobile) also get the `.ort` model and its operator config. Every
package records per profile EP which nodes it takes (export.assignment.node_assignment).
Kind.frontend "graph" (`--frontend graph`) puts Whisper's log-mel front end in front of the finished
graph (export/frontend.py): the device feeds PCM; the manifest's frontend.compute says which input.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from semedge.core.errors import UserError
from semedge.runtime.partition import formats_for, needs_fixed_shapes

# format -> the quantize_onnx step config that makes it from the fp32 graph (None: fp32 as exported)
FORMATS: dict[str, dict | None] = {
    "fp32": None,
    "fp16": {"mode": "fp16"},
    # A8W8 where 8 bits hold: weight MatMuls/Gemms and convs; what Whisper's activation outliers
    # pass through stays fp32 (whisper-base, default codec, 6 held-out val utterances, cosine to
    # fp32: every op quantized 0.45, this mix 0.997; benchmarks/a8w8.py)
    "qdq_a8w8": {"mode": "int8_static", "activations": "uint8", "op_types": ["MatMul", "Gemm", "Conv"],
                 "keep_fp32": ["jsc", "frontend", r"layers\.0[./]", "attention_matmuls", "ffn_out"]},
    "qdq_a16w8": {"mode": "int8_static", "activations": "uint16", "keep_fp32": ["jsc"]},
    "int8_dynamic": {"mode": "int8_dynamic", "keep_fp32": ["jsc"]},
    "int4": {"mode": "int4", "keep_fp32": ["jsc"]},
}
# fp16 needs LayerNormalization as one op (opset 17): it accumulates in fp32 (stash_type); below 17 the
# exporter writes ReduceMean/Pow/Sqrt, which square the activations in fp16 (overflow above 256).
MIN_OPSET = {"fp16": 17}
# The default per first EP (it must be in formats_for). QNN: A16W8, as Whisper's activations do not
# fit 8 bits (whisper-base, 2 held-out speech utterances, cosine to fp32: A8W8 0.57, A16W8 0.9987).
DEFAULT_FORMAT = {"TensorRT": "fp16", "CUDA": "fp16", "CoreML": "fp16", "QNN": "qdq_a16w8", "NNAPI": "qdq_a8w8",
                  "XNNPACK": "int8_dynamic", "CPU": "int8_dynamic"}
# Parity limits (max |Δ| / output scale, cosine) against PyTorch, per format. fp16: whisper-base reads
# max|Δ| 2.3-3.0% of the scale at cosine 0.999999 (a few symbols), so the cosine bound is the tight one.
# QDQ: judged by the cosine (quantization error power ~ 2(1 - cos) of the symbols'); whisper-base A16W8
# reads max|Δ| 30-36% of the scale at cosine 0.998-0.999.
TOLERANCE = {"fp32": (1e-3, 0.9999), "fp16": (0.05, 0.9999), "qdq_a8w8": (0.5, 0.99), "qdq_a16w8": (0.5, 0.99),
             "int8_dynamic": (0.15, 0.99), "int4": (0.30, 0.97)}
CPU_EPS = ("CPU", "XNNPACK")
ORT_MOBILE = ("phone", "watch")  # device classes whose apps run ORT Mobile
CALIB_N = 8  # built-in train utterances for QDQ activation ranges


@dataclass(frozen=True)
class Kind:
    """What `semedge export --device` builds for a profile."""

    format: str  # a FORMATS key, or "plan": the --plan's ONNX steps decide
    first_ep: str
    fused: bool  # ORT's contrib fusions (CPU EPs only)
    fixed_shapes: bool
    ort_style: str | None  # convert_onnx_models_to_ort optimisation style; None: no .ort
    frontend: str = "numpy"  # "graph": the log-mel front end inside device.onnx, PCM input (export/frontend.py)

    @property
    def quant(self) -> dict | None:
        return FORMATS.get(self.format)


def plan_format(plan) -> str:
    """The package format (a FORMATS key) a plan's ONNX steps make: its last quantize_onnx step's mode."""
    steps = plan.ops(("quantize_onnx",))
    if not steps:
        return "fp32"
    c = steps[-1].config
    if c.mode == "int8_static":
        return "qdq_a16w8" if c.activations == "uint16" else "qdq_a8w8"
    return {"fp16": "fp16", "int8_dynamic": "int8_dynamic", "int4": "int4"}.get(c.mode, c.mode)


def _plan_sets_precision(plan) -> bool:
    return plan is not None and bool(plan.ops(("quantize_onnx",)))


def _chosen_format(profile, fmt: str | None) -> str:
    runs = formats_for(profile)
    ep = profile.first_ep.name
    if fmt is None:
        best = DEFAULT_FORMAT[ep]
        return best if best in runs else next((f for f in runs if f != "fp32"), "fp32")
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not a package format", f"use one of: {', '.join(FORMATS)}")
    if fmt not in runs:
        raise UserError(f"{ep}, the first EP of {profile.name}, does not run {fmt} packages",
                        f"use --format {' or '.join(runs)}, or a --device whose first EP runs {fmt}")
    return fmt


def package_kind(profile, fmt: str | None = None, plan=None, opset: int = 17, frontend: str = "numpy") -> Kind:
    """The package kind for `profile`; UserError for a format its first EP does not run, too low an opset
    or an unknown front end."""
    from semedge.export.frontend import check_choice

    check_choice(frontend, opset)
    if fmt is not None and _plan_sets_precision(plan):
        raise UserError("--format and the --plan's quantize_onnx steps both set the precision",
                        "give one of them (a plan with only prune/distill steps takes --format)")
    chosen = "plan" if _plan_sets_precision(plan) else _chosen_format(profile, fmt)
    need = MIN_OPSET.get(chosen, 13)
    if opset < need:
        raise UserError(f"--opset {opset} is too low for {chosen} packages (LayerNormalization, opset {need}, "
                        "keeps its statistics in fp32)", f"use --opset {need} or higher")
    ep = profile.first_ep.name
    cpu = ep in CPU_EPS
    style = None if profile.device_class not in ORT_MOBILE else ("Fixed" if cpu else "Runtime")
    fixed = needs_fixed_shapes(profile) or chosen.startswith("qdq")
    return Kind(chosen, ep, cpu, fixed, style, frontend)


def builtin_calibration(loaded, n: int = CALIB_N) -> list:
    """Log-mel features [80, 3000] of the built-in train split's first n utterances."""
    from semedge.runtime.evaluate import speech_features
    from semedge.semcom.tasks.speech import load_split

    return list(speech_features(loaded, load_split("train", n, progress=False)))


def fixed_shapes(split) -> dict[str, list[int]]:
    """The device half's inputs at their fixed size: one message, the full 30 s window (speech)."""
    fe = split.loaded.feature_extractor
    if split.loaded.kind != "speech" or fe is None:
        raise UserError(f"fixed-shape packages are built for speech models; {split.loaded.source} is a "
                        f"{split.loaded.kind} model", "export it for a CPU, XNNPACK, CUDA or TensorRT profile")
    return {split.task.export.inputs[0]: [1, int(fe.feature_size), int(fe.nb_max_frames)]}


@dataclass
class TargetGraph:
    path: Path
    export: object  # export.onnx.ExportReport of the fp32 export
    parity: object  # export.onnx.ParityReport of `path` against PyTorch
    calibration: dict | None  # QDQ: where the activation ranges came from
    frontend: dict | None = None  # --frontend graph: the log-mel parity (export.frontend.log_mel_parity)


def _parity_inputs(split) -> list[dict]:
    """The task's parity inputs, one message per feed (fixed-shape graphs take batch 1)."""
    feeds = split.task.calibration_inputs(split.loaded, 2)
    n = len(next(iter(feeds.values())))
    return [{k: v[i : i + 1] for k, v in feeds.items()} for i in range(n)]


def _quantize(src: Path, out: Path, kind: Kind, plan, calib, calib_source: str) -> dict | None:
    """Apply the plan's ONNX steps or the kind's step; returns the calibration record (QDQ)."""
    from semedge.compress import quantize_onnx
    from semedge.compress.plan import apply_onnx_steps

    steps = [s.config.mode for s in plan.ops(("quantize_onnx",))] if kind.format == "plan" else [kind.quant["mode"]]
    static = "int8_static" in steps
    data = calib() if static and callable(calib) else calib
    if kind.format == "plan":
        apply_onnx_steps(src, out, plan, calib=data)
    else:
        quantize_onnx.apply(src, out, kind.quant, calib=data)
    _sort_nodes(out)
    return {"inputs": len(data), "source": calib_source} if static else None


def _sort_nodes(path: Path) -> None:
    """Topological node order (fp16 conversion appends its input Casts last; ORT's checkers need the order)."""
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    from semedge.export.optimize import save_model

    m = OnnxModel(onnx.load(str(path)))
    m.topological_sort()
    save_model(m.model, path)


def _parity(path: Path, split, precision: str, fmt: str, inputs=None, frontend: bool = False):
    """Parity against PyTorch on `inputs` (default: the task's); frontend: PCM feeds, the reference
    is the device half on runtime.features.log_mel."""
    from semedge.export.frontend import reference
    from semedge.export.onnx import ExportParityError, Tolerance, check_parity
    from semedge.semcom.training.adapters import merge_lora

    tol = Tolerance(*TOLERANCE[fmt]) if fmt in TOLERANCE else None
    strict = precision in ("fp32", "fp16")  # quantization error is recorded (ok: false), accuracy is the WER's to judge
    module = merge_lora(split.device).eval()
    try:
        return check_parity(path, reference(module) if frontend else module, inputs or _parity_inputs(split),
                            precision=precision, tol=tol, raise_on_fail=strict)
    except ExportParityError as e:
        e.args = (f"{e} [{fmt} package: another --format its first EP runs may hold; docs/targets.md]",)
        raise


def build_target_graph(split, kind: Kind, workdir: Path, *, opset: int = 17, calib=None, calib_source: str = "given",
                       plan=None, progress: Callable[[str], None] | None = None) -> TargetGraph:
    """fp32 export -> fixed shapes (when the kind needs them) -> the kind's precision, parity checked
    against PyTorch with the format's limits: ExportParityError for fp32/fp16 out of them; integer
    formats record it (parity.ok false), as the planner judges them on WER through the link.

    calib: QDQ calibration inputs ([80, 3000] arrays), or a function returning them (called only for QDQ).
    kind.frontend "graph": the front end goes in front of the finished graph (fp32, outside the quantizer's
    reach), parity checked from PCM against PyTorch on runtime.features.log_mel."""
    say = progress or (lambda msg: None)
    if kind.frontend == "graph" and split.loaded.kind != "speech":
        raise UserError(f"--frontend graph is Whisper's log-mel front end; {split.loaded.source} is a {split.loaded.kind} model",
                        "leave out --frontend (or use --frontend numpy)")
    tg = _encoder_graph(split, kind, workdir, opset, calib, calib_source, plan, say)
    return _with_frontend(tg, split, kind, workdir, say, plan) if kind.frontend == "graph" else tg


def _encoder_graph(split, kind: Kind, workdir: Path, opset, calib, calib_source, plan, say) -> TargetGraph:
    """The device half on log-mel input, in the kind's shape and precision, parity checked."""
    from semedge.export.mobile import fix_input_shapes
    from semedge.export.onnx import export_device_half
    from semedge.export.package import graph_precision

    base = workdir / "fp32.onnx"
    rep = export_device_half(split, base, opset=opset, optimize="auto" if kind.fused else False, progress=say)
    src = base
    if kind.fixed_shapes:
        shapes = fixed_shapes(split)
        say(f"fixing input shapes {shapes}")
        src = fix_input_shapes(base, workdir / "fixed.onnx", shapes)
    if kind.quant is None and kind.format != "plan":
        return TargetGraph(src, rep, rep.parity if src == base else _parity(src, split, "fp32", "fp32"), None)
    out = workdir / "device.onnx"
    say(f"quantizing to {_format(kind, plan)}")
    cal = _quantize(src, out, kind, plan, calib, calib_source)
    say("checking parity against PyTorch")
    return TargetGraph(out, rep, _parity(out, split, graph_precision(out), _format(kind, plan)), cal)


def _with_frontend(tg: TargetGraph, split, kind: Kind, workdir: Path, say, plan=None) -> TargetGraph:
    """`tg` with the log-mel front end in front (export/frontend.py): PCM in; parity from PCM."""
    import dataclasses

    from semedge.export import frontend as fe
    from semedge.export.package import graph_precision

    say("putting the log-mel front end in the graph (PCM input)")
    front, filters = fe.params(split.loaded)
    path = fe.prepend(tg.path, workdir / "frontend.onnx", front, filters, fixed=kind.fixed_shapes)
    audios = fe.parity_audio(2, fixed=kind.fixed_shapes)
    opset = max(fe.MIN_OPSET, _opset(path))
    rec = fe.log_mel_parity(fe.standalone(front, filters, opset, kind.fixed_shapes), audios,
                            split.loaded.feature_extractor)
    say(f"log-mel: graph vs numpy max|Δ| {rec['max_abs']['numpy']:.2e}")
    feeds = [{fe.INPUT: a[None]} for a in audios]
    parity = _parity(path, split, graph_precision(path), _format(kind, plan), inputs=feeds, frontend=True)
    return dataclasses.replace(tg, path=path, parity=parity, frontend=rec)


def _opset(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return int(next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0))


def _format(kind: Kind, plan) -> str:
    """The package's format: the kind's, or for a plan kind the one its steps make."""
    return plan_format(plan) if kind.format == "plan" else kind.format


def _target_record(kind: Kind, tg: TargetGraph, ort_rec: dict | None, plan=None) -> dict:
    return {"format": _format(kind, plan), "first_ep": kind.first_ep, "fused": kind.fused, "fixed_shapes": kind.fixed_shapes,
            "calibration": tg.calibration, "ort_format": ort_rec, "frontend": kind.frontend}


def _frontend_record(split, kind: Kind, tg: TargetGraph) -> dict:
    """What the manifest's speech `frontend` section adds: where the log-mel is computed."""
    if split.loaded.kind != "speech":
        return {}
    from semedge.export.frontend import INPUT

    if kind.frontend != "graph":
        return {"compute": "numpy"}
    return {"compute": "graph", "input": INPUT, "dtype": "float32", "parity": tg.frontend}


def build_target_package(split, profile, kind: Kind, out: str | Path, *, opset: int = 17, calib=None,
                         calib_source: str = "given", plan=None, jsc_ckpt=None, sign_key=None,
                         progress: Callable[[str], None] | None = None) -> Path:
    """The package of `kind` for `profile` at `out` (+ out.zip): graph, .ort when ORT Mobile, node assignment."""
    from semedge.core.files import scratch_dir
    from semedge.core.layout import ORT_FILE, ORT_OPS_CONFIG
    from semedge.export.assignment import node_assignment
    from semedge.export.mobile import to_ort_format
    from semedge.export.package import build_package

    say = progress or (lambda msg: None)
    with scratch_dir(Path(out).expanduser().absolute().parent) as tmp:  # beside the package; a kill's is cleaned next run
        tg = build_target_graph(split, kind, tmp, opset=opset, calib=calib, calib_source=calib_source,
                                plan=plan, progress=say)
        say("recording which nodes each EP of the profile takes")
        assignment = node_assignment(tg.path, profile)
        ort_rec, files = None, {}
        if kind.ort_style:
            say(f"converting to ORT format ({kind.ort_style} optimisations)")
            ort_rec = to_ort_format(tg.path, tmp, kind.ort_style)
            files = {ORT_FILE: tmp / ORT_FILE, ORT_OPS_CONFIG: tmp / ORT_OPS_CONFIG}
        extra = {"target": _target_record(kind, tg, ort_rec, plan), "node_assignment": assignment,
                 "onnx": {"parity": asdict(tg.parity)}, "frontend": _frontend_record(split, kind, tg)}
        own = getattr(split, "jsc_path", None)  # a student plan's split carries its own codec (compress/students.py)
        return build_package(split, out, onnx_path=tg.path, plan=plan, profile=profile.name,
                             jsc_ckpt=own if own is not None else jsc_ckpt,
                             export_report=tg.export, opset=opset, progress=say, sign_key=sign_key,
                             extra_files=files, extra=extra)
