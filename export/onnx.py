"""ONNX export of the device half, with graph optimisation and a parity check.

`export_device_half(split, out_path)` writes one .onnx file with the inputs, dynamic axes
and output the task's export spec names (`split.task.export`, semcom/tasks/), e.g.
  speech: input_features [batch, 80, frames<=3000] float32 -> symbols [batch, frames/2, k]
  text:   input_ids, attention_mask [batch, tokens] int64 -> symbols [batch, tokens, k]
then fuses GELU / LayerNorm / attention (export/optimize.py) and checks the ONNX
Runtime output against PyTorch on calibration inputs (`check_parity`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from semedge.core.files import replace_atomic, scratch_dir

TWO_GB = 2 * 1024**3


@dataclass(frozen=True)
class Tolerance:
    """Parity limits: max |onnx - torch| / max |torch| and the minimum cosine similarity."""

    max_abs_rel: float
    cosine: float


# Per precision of the exported graph. fp32 is the export itself; the others are
# for compressed graphs (compress/ passes the precision it produced).
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_abs_rel=1e-3, cosine=0.9999),
    "fp16": Tolerance(max_abs_rel=1e-2, cosine=0.999),
    "int8": Tolerance(max_abs_rel=0.15, cosine=0.99),
    "int4": Tolerance(max_abs_rel=0.30, cosine=0.97),
}


class ExportParityError(RuntimeError):
    """The exported graph disagrees with PyTorch beyond the tolerance."""

    def __init__(self, parity: "ParityReport"):
        self.parity = parity
        t = parity.tolerance
        super().__init__(
            f"ONNX output differs from PyTorch ({parity.precision}): max abs diff {parity.max_abs:.3g} "
            f"= {parity.max_abs_rel:.3g} of the output scale {parity.scale:.3g} (limit {t['max_abs_rel']:g}), "
            f"min cosine {parity.cosine:.6f} (limit {t['cosine']:g}) over {parity.n_inputs} inputs"
        )


@dataclass
class ParityReport:
    precision: str
    max_abs: float
    scale: float  # max |torch output|
    max_abs_rel: float
    cosine: float  # minimum over messages of the cosine similarity of the flattened outputs
    n_inputs: int
    tolerance: dict
    ok: bool


@dataclass
class ExportReport:
    path: Path
    bytes: int
    opset: int
    inputs: list[dict]  # {"name", "shape" (ints and symbolic dim names), "dtype"}
    outputs: list[dict]
    parity: ParityReport | None
    export_seconds: float
    optimized: bool
    fused: dict = field(default_factory=dict)  # {"gelu", "layernorm", "attention"} node counts
    precision: str = "fp32"
    choice: dict = field(default_factory=dict)  # optimize="auto": median ms of each graph and the one kept

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


# ----------------------------------------------------------------------------- helpers


def describe_io(path: str | Path) -> tuple[list[dict], list[dict]]:
    """Graph inputs and outputs as [{"name", "shape", "dtype"}]; symbolic dims are their names."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}

    def one(v) -> dict:
        tt = v.type.tensor_type
        shape = [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None)
                 for d in tt.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
        return {"name": v.name, "shape": shape, "dtype": dtype}

    return [one(v) for v in m.graph.input if v.name not in inits], [one(v) for v in m.graph.output]


def calibration_inputs(split, n: int = 2) -> dict[str, np.ndarray]:
    """Deterministic inputs for the parity check, from the task: speech = log-mel of tones +
    noise of different lengths; text = sentences of different lengths, padded."""
    return split.task.calibration_inputs(split.loaded, n)


def _as_batches(calib) -> list[dict[str, np.ndarray]]:
    if isinstance(calib, dict):
        return [calib]
    return list(calib)


def _resolve_tol(tol, precision: str) -> Tolerance:
    if tol is None:
        tol = precision
    if isinstance(tol, Tolerance):
        return tol
    if isinstance(tol, str):
        if tol not in TOLERANCES:
            from semedge.core.errors import UserError

            raise UserError(f"unknown precision {tol!r} for the parity tolerance", f"use one of {', '.join(TOLERANCES)}")
        return TOLERANCES[tol]
    if isinstance(tol, dict):
        return Tolerance(**tol)
    raise TypeError(f"tol must be a Tolerance, a precision name or a dict, not {type(tol).__name__}")


def ort_session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------- parity


def check_parity(onnx_path, module, calib_inputs, *, precision: str = "fp32", tol=None, raise_on_fail: bool = True) -> ParityReport:
    """Run `onnx_path` (ORT, CPU) and `module` (PyTorch) on the same inputs; compare.

    `module` is the device half (or any nn.Module taking the graph inputs in order);
    `calib_inputs` is a dict name -> array, or a list of such dicts.
    """
    import torch

    t = _resolve_tol(tol, precision)
    sess = ort_session(onnx_path)
    names = [i.name for i in sess.get_inputs()]
    max_abs, scale, cos_min, n = 0.0, 0.0, 1.0, 0
    for feeds in _as_batches(calib_inputs):
        missing = [k for k in names if k not in feeds]
        if missing:
            raise ValueError(f"calibration inputs lack {missing}; the graph takes {names}")
        got = sess.run(None, {k: feeds[k] for k in names})[0].astype(np.float64)
        with torch.no_grad():
            ref = module(*[torch.from_numpy(np.asarray(feeds[k])) for k in names]).double().numpy()
        if got.shape != ref.shape:
            raise ExportParityError(ParityReport(precision, float("inf"), float(np.abs(ref).max()), float("inf"), -1.0, 1, asdict(t), False))
        max_abs = max(max_abs, float(np.abs(got - ref).max()))
        scale = max(scale, float(np.abs(ref).max()))
        for g, r in zip(got.reshape(got.shape[0], -1), ref.reshape(ref.shape[0], -1)):
            den = np.linalg.norm(g) * np.linalg.norm(r)
            c = float(g @ r / den) if den > 0 else float(np.array_equal(g, r))
            cos_min = min(cos_min, c)
            n += 1
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    ok = bool(np.isfinite(rel) and rel <= t.max_abs_rel and cos_min >= t.cosine)
    rep = ParityReport(precision, max_abs, scale, rel, cos_min, n, asdict(t), ok)
    if not ok and raise_on_fail:
        raise ExportParityError(rep)
    return rep


# ----------------------------------------------------------------------------- export


def _model_shape(split) -> tuple[int, int]:
    dev = split.device_model or split.loaded  # the encoder the device half runs
    cfg = dev.model.config
    heads = getattr(cfg, "encoder_attention_heads", None) or getattr(cfg, "num_heads", None) or cfg.num_attention_heads
    return int(heads), int(dev.d_model)


def _torch_export(module, spec, out: Path, opset: int, sample: dict[str, np.ndarray]) -> None:
    """torch.onnx.export of `module` with the task's ExportSpec `spec` (names, dynamic axes)."""
    import warnings

    import torch

    names = list(spec.inputs)
    args = tuple(torch.from_numpy(np.asarray(sample[k][:1])) for k in names)
    dyn = {name: dict(axes) for name, axes in spec.dynamic_axes.items()}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about shape checks in HF code
        # TorchScript exporter: its graphs match ORT's fusion patterns (the dynamo exporter's did not).
        torch.onnx.export(module, args, str(out), input_names=names, output_names=[spec.output], dynamic_axes=dyn,
                          opset_version=opset, dynamo=False, do_constant_folding=True, external_data=False)


def _set_output_shape(path: Path, k: int) -> None:
    """Name the output dims: [batch, tokens, k] (speech: tokens = frames / 2)."""
    import onnx

    from semedge.export.optimize import save_model

    m = onnx.load(str(path))
    dims = m.graph.output[0].type.tensor_type.shape.dim
    want = ["batch", "tokens", int(k)]
    for d, w in zip(dims, want):
        d.Clear()
        if isinstance(w, str):
            d.dim_param = w
        else:
            d.dim_value = w
    save_model(m, path)


def _median_ms(paths: dict[str, Path], feeds: dict, runs: int = 5) -> dict[str, float]:
    """Median ORT latency (ms) of each graph on `feeds`, runs interleaved so load drifts hit all alike."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sessions = {k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    for s in sessions.values():
        s.run(None, feeds)
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(runs):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feeds)
            times[k].append(time.perf_counter() - t)
    return {k: round(1000 * float(np.median(v)), 3) for k, v in times.items()}


def export_device_half(
    split,
    out_path: str | Path,
    opset: int = 17,
    optimize: bool | str = "auto",
    calib_inputs=None,
    tol=None,
    *,
    precision: str = "fp32",
    progress: Callable[[str], None] | None = None,
) -> ExportReport:
    """Export `split.device` to `out_path` (single .onnx file), optimise it, check parity.

    optimize: True fuses offline (export/optimize.py), False leaves the graph to ONNX
    Runtime's load-time fusions, "auto" builds both, times them on the calibration input
    and keeps the faster (measured: the offline attention fusion wins on Whisper's
    1500 frames, loses ~5% on a 128-token BART encoder). Raises ExportParityError when
    ORT's output is out of tolerance (the file is not written).
    """
    from semedge.core.errors import UserError

    say = progress or (lambda msg: None)
    out_path = Path(out_path)
    if not 13 <= int(opset) <= 21:
        raise UserError(f"opset {opset} is not supported", "use an opset between 13 and 21 (default 17)")
    if optimize not in (True, False, "auto"):
        raise UserError(f"optimize={optimize!r} is unknown", "use True, False or 'auto'")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    from semedge.semcom.training.adapters import merge_lora

    module = merge_lora(split.device).eval()
    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    if n_bytes >= TWO_GB:
        raise UserError(f"the device half holds {n_bytes / 1e9:.1f} GB of weights; single-file ONNX is limited to 2 GB",
                        "compress the device half first (semedge plan / --plan) or use a smaller model")
    calib = calib_inputs if calib_inputs is not None else calibration_inputs(split)
    first = _as_batches(calib)[0]
    heads, hidden = _model_shape(split)
    with scratch_dir(out_path.parent) as tmp:  # .scratch.PID.*.tmp: the next writer removes one a kill left
        raw = tmp / "raw.onnx"
        say(f"exporting the {split.task.name} device half to ONNX (opset {opset})")
        _torch_export(module, split.task.export, raw, int(opset), first)
        _set_output_shape(raw, split.k)
        final, fused, choice = raw, {}, {}
        if optimize:
            from semedge.export.optimize import optimize_graph

            say("fusing attention, GELU and LayerNorm")
            opt = tmp / "opt.onnx"
            rep = optimize_graph(raw, opt, num_heads=heads, hidden_size=hidden)
            final, fused = opt, rep.fused_counts()
        if optimize == "auto":
            try:
                check_parity(opt, module, calib, precision=precision, tol=tol)
            except ExportParityError:  # e.g. a pruned head count the fusion cannot see: keep the plain graph
                final, fused, choice = raw, {}, {"fused": "parity failed", "chosen": "unfused"}
            else:
                say("timing the fused and the unfused graph")
                ms = _median_ms({"fused": opt, "unfused": raw}, {k: np.asarray(v) for k, v in first.items()})
                kept = "fused" if ms["fused"] <= ms["unfused"] else "unfused"
                choice = {**{f"{k}_ms": v for k, v in ms.items()}, "chosen": kept}
                if kept == "unfused":
                    final, fused = raw, {}
        export_s = time.perf_counter() - t0
        say(f"checking parity against PyTorch ({precision})")
        parity = check_parity(final, module, calib, precision=precision, tol=tol)
        replace_atomic(final, out_path)
    ins, outs = describe_io(out_path)
    return ExportReport(out_path, out_path.stat().st_size, int(opset), ins, outs, parity, export_s, final != raw, fused,
                        precision, choice)
