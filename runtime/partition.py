"""Which execution provider takes which node of a costed graph, and what each target runs natively.

The op-support rules are stated below, per EP; nodes an EP cannot take fall back to the
next EP in the profile's order, finally the CPU. `costmodel.node_times` costs each node
on the unit of the EP that takes it and adds a transfer at every unit boundary.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from semedge.core.errors import UserError
from semedge.runtime.profiles import DeviceProfile

if TYPE_CHECKING:
    from semedge.runtime.costmodel import GraphCost, NodeCost

# Stated op-support rules per EP (what is not listed runs on the next EP, finally CPU):
# - TensorRT: standard-domain ops, minus the integer/dynamic-quant ops its ONNX parser lacks
#   (onnx-tensorrt operators.md: no MatMulInteger/ConvInteger/DynamicQuantizeLinear); no contrib ops.
# - CUDA: standard ops minus the same integer ops (not in the CUDA EP's kernel registry, per issue 15;
#   unverified here, no GPU), plus the contrib ops it has CUDA kernels for.
# - NNAPI, CoreML: the op tables onnxruntime ships (tools/mobile_helpers/*_supported_ops.md); fixed shapes.
# - QNN: standard-domain ops with fixed shapes (ORT's QNN op list is not shipped in the wheel: approximate),
#   plus com.microsoft Q/DQ (16-bit QDQ below opset 21; QNN EP docs, "QNN EP with 16-bit QDQ").
# - XNNPACK: the ops ORT's XNNPACK EP registers (fp32/QDQ conv, pooling, softmax, resize, gemm/matmul).
_NO_INTEGER = {"MatMulInteger", "ConvInteger", "DynamicQuantizeLinear"}
_CUDA_CONTRIB = {"Attention", "MultiHeadAttention", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization",
                 "BiasGelu", "FastGelu", "Gelu", "QuickGelu", "BiasAdd", "MatMulNBits", "FusedMatMul"}
_XNNPACK_OPS = {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "Softmax", "Resize", "Gemm", "MatMul",
                "QLinearConv", "QLinearAveragePool", "QLinearSoftmax"}
_QNN_CONTRIB = {"QuantizeLinear", "DequantizeLinear"}
_FIXED_SHAPES = ("NNAPI", "CoreML", "QNN")

# Data types: a node with a float64 input or output falls back on these EPs (op tables judge op types only):
# - NNAPI, CoreML: each op builder accepts float32 input by default, some add fp16/int types, none double
#   (onnxruntime/core/providers/{nnapi/nnapi_builtin,coreml}/builders/impl/base_op_builder.cc).
# - QNN: QNN has no 64-bit float type (onnxruntime/core/providers/qnn/builder/qnn_utils.cc, its type table).
# - XNNPACK: fp32, fp16 and 8-bit QDQ kernels only (ORT's XNNPACK EP op list; not checked kernel by kernel).
# - TensorRT: the parser casts DOUBLE down to FLOAT (onnx-tensorrt operators.md), so it does not run them as built.
# CUDA has double kernels for most standard ops (onnxruntime docs/OperatorKernels.md): not in this list.
DOUBLE = 11  # onnx.TensorProto.DOUBLE
NO_FLOAT64 = ("NNAPI", "CoreML", "QNN", "XNNPACK", "TensorRT")
ACCELERATOR_OP_SOURCES = {
    "TensorRT": "onnx-tensorrt operators.md (no integer matmul/conv, no contrib ops)",
    "CUDA": "ORT CUDA kernel registry as stated in issue 15 (not verified here)",
    "NNAPI": "onnxruntime/tools/mobile_helpers/nnapi_supported_ops.md",
    "CoreML": "onnxruntime/tools/mobile_helpers/coreml_supported_{mlprogram,neuralnetwork}_ops.md",
    "QNN": "approximation: standard-domain ops (+ com.microsoft Q/DQ) with fixed shapes",
    "XNNPACK": "ORT XNNPACK EP op list", "CPU": "every op",
}


def _mobile_table(name: str) -> set[str] | None:
    """'domain:Op' names from an op table onnxruntime ships; None when it is not installed."""
    try:
        import onnxruntime

        path = Path(onnxruntime.__file__).parent / "tools" / "mobile_helpers" / name
        lines = path.read_text().splitlines()
    except (ImportError, OSError):
        return None
    return {ln.split("|")[1] for ln in lines if ln.startswith("|") and ":" in ln.split("|")[1]}


def _op_key(n: NodeCost) -> str:
    return f"{n.domain or 'ai.onnx'}:{n.op_type}"


def why_not(ep, n: NodeCost, dynamic: bool) -> str | None:
    """None when `ep` (a profile EP entry) takes node `n`, else the reason it falls back."""
    name, std = ep.name, n.domain in ("", "ai.onnx")
    if name == "CPU":
        return None
    if name in NO_FLOAT64 and DOUBLE in n.dtypes:
        return f"float64 tensors ({name} runs no double)"
    if name in _FIXED_SHAPES and dynamic:
        return "dynamic shapes"
    if name == "XNNPACK":
        return None if std and n.op_type in _XNNPACK_OPS else "not in XNNPACK's op set"
    if name == "CUDA" and not std:
        return None if n.op_type in _CUDA_CONTRIB else f"contrib op {n.op_type} has no CUDA kernel"
    if name == "QNN" and n.domain == "com.microsoft" and n.op_type in _QNN_CONTRIB:
        return None
    if not std:
        return f"contrib op {_op_key(n)}"
    if name in ("TensorRT", "CUDA"):
        return f"{n.op_type} (integer op)" if n.op_type in _NO_INTEGER else None
    if name in ("NNAPI", "CoreML"):
        fmt = "mlprogram" if ep.options.get("ModelFormat", "MLProgram") == "MLProgram" else "neuralnetwork"
        table = _mobile_table("nnapi_supported_ops.md" if name == "NNAPI" else f"coreml_supported_{fmt}_ops.md")
        if table is not None and _op_key(n) not in table:
            return f"{n.op_type} not in ORT's {name} op table"
    return None


def partition(cost: GraphCost, profile: DeviceProfile) -> list[tuple[NodeCost, object]]:
    """(node, EP entry) for each non-free node: the first EP in the profile's order that takes it."""
    out = []
    for n in cost.nodes:
        if n.cls == "free":
            continue
        ep = next(e for e in profile.execution_providers if why_not(e, n, cost.dynamic) is None
                  or e.name == "CPU")
        out.append((n, ep))
    return out


def _modelled_unit(profile: DeviceProfile, ep) -> str:
    """The unit whose peaks cost an EP's nodes: its own, or cpu when the profile has no peaks for it."""
    return ep.unit if profile.unit_peaks(ep.unit) is not None else "cpu"


def partition_report(cost: GraphCost, profile: DeviceProfile) -> dict:
    """Which ops each EP takes, why the rest fall back, and the accelerator's share of nodes and FLOPs."""
    parts = partition(cost, profile)
    first = profile.first_ep
    by_ep: dict[str, dict] = {}
    for n, ep in parts:
        d = by_ep.setdefault(ep.name, {"unit": ep.unit, "nodes": 0, "gflops": 0.0, "ops": {}})
        d["nodes"] += 1
        d["gflops"] += n.flops / 1e9
        d["ops"][n.op_type] = d["ops"].get(n.op_type, 0) + 1
    fallback: dict[str, str] = {}
    for n, ep in parts:
        if ep is not first:
            fallback.setdefault(n.op_type, why_not(first, n, cost.dynamic) or "")
    total_nodes = max(1, len(parts))
    total_fl = sum(n.flops for n, _ in parts) or 1.0
    on_first = by_ep.get(first.name, {"nodes": 0, "gflops": 0.0})
    unmodelled = sorted({ep.unit for _, ep in parts if profile.unit_peaks(ep.unit) is None})
    for d in by_ep.values():
        d["gflops"] = round(d["gflops"], 4)
    return {
        "first_ep": first.name, "by_ep": by_ep, "fallback_ops": fallback,
        "first_ep_node_share": round(on_first["nodes"] / total_nodes, 4),
        "first_ep_flop_share": round(on_first["gflops"] * 1e9 / total_fl, 4),
        "boundaries": len(_boundaries(parts, profile)),
        "unmodelled_units": unmodelled,  # their nodes are costed on the CPU's peaks
        "sources": {e.name: ACCELERATOR_OP_SOURCES[e.name] for e in profile.execution_providers},
    }


# A tensor crossing between compute units: copied at the profile's bandwidth plus a fixed
# launch/sync cost (assumed, not measured: no accelerator here).
TRANSFER_US = 20.0


def _boundaries(parts, profile: DeviceProfile) -> list[float]:
    """Bytes of each tensor that crosses from one modelled compute unit to another."""
    unit_of_tensor = {o: _modelled_unit(profile, ep) for n, ep in parts for o in n.outputs}
    out = []
    for n, ep in parts:
        u = _modelled_unit(profile, ep)
        out += [b for t, b in n.inputs if t in unit_of_tensor and unit_of_tensor[t] != u]
    return out


# Per first EP: the package formats (precision/quantization) it runs itself, best first.
# fp16: a float16 graph (or fp32 with TensorRT's fp16 builder); qdq_a8w8 / qdq_a16w8: static
# QuantizeLinear/DequantizeLinear with fixed input shapes; int8_dynamic: DynamicQuantizeLinear +
# MatMulInteger; int4: MatMulNBits (com.microsoft).
_FORMATS = {
    "TensorRT": ["fp16", "fp32", "qdq_a8w8"],
    "CUDA": ["fp16", "fp32", "int4"],
    "CoreML": ["fp16", "fp32"],
    "QNN": ["qdq_a8w8", "qdq_a16w8"],
    "NNAPI": ["qdq_a8w8", "fp32"],
    "XNNPACK": ["fp32", "int8_dynamic", "int4"],
    "CPU": ["fp32", "int8_dynamic", "int4"],
}


def ep_formats(name: str, unit: str) -> list[str]:
    """Formats EP `name` runs natively on `unit`, best first."""
    if name == "QNN" and unit != "npu":  # QNN's GPU or CPU backend
        return ["fp16", "fp32"] if unit == "gpu" else ["fp32"]
    if name == "CoreML" and unit == "cpu":
        return ["fp32"]
    return list(_FORMATS[name])


def formats_for(profile: DeviceProfile) -> list[str]:
    """Formats the profile's first EP runs natively, best first (for the planner's candidate space).

    Anything else still runs, but its nodes fall back to the CPU EP (see `partition_report`).
    """
    return ep_formats(profile.first_ep.name, profile.first_ep.unit)


def package_format(manifest: dict) -> str | None:
    """A package's format: its target's, else read from its precision and plan; None when unknown."""
    fmt = (manifest.get("target") or {}).get("format")
    if fmt:
        return fmt
    precision = (manifest.get("onnx") or {}).get("precision")
    if precision != "int8":
        return precision if precision in ("fp32", "fp16", "int4") else None
    modes = [(s.get("config") or {}).get("mode") for s in (manifest.get("plan") or {}).get("steps") or []
             if s.get("op") == "quantize_onnx"]
    return {"int8_dynamic": "int8_dynamic", "int8_static": "qdq_a8w8"}.get(modes[-1] if modes else None)


def _dynamic_inputs(manifest: dict) -> bool:
    ins = (manifest.get("onnx") or {}).get("inputs") or []
    return any(not isinstance(d, int) for i in ins for d in i.get("shape") or [])


def check_ep_runs(ep: str, unit: str, manifest: dict, package: str) -> None:
    """UserError when accelerator EP `ep` (profile spelling) cannot run the package: a format it does
    not run, or dynamic input shapes for an EP that takes fixed shapes only. CPU-unit EPs run every
    package (what XNNPACK does not take, the CPU EP does)."""
    if unit == "cpu":
        return
    fmt = package_format(manifest)
    fix = (f"run it with --ep cpu, or export a package for {ep} (`semedge export --device D` with a profile "
           f"whose first EP is {ep}, docs/targets.md)")
    if fmt is not None and fmt not in ep_formats(ep, unit):
        raise UserError(f"--ep {ep.lower()}: {package} is a package of format {fmt}, which {ep} does not run "
                        f"({ep} runs {', '.join(ep_formats(ep, unit))})", fix)
    if ep in _FIXED_SHAPES and _dynamic_inputs(manifest):
        raise UserError(f"--ep {ep.lower()}: {package} has dynamic input shapes; {ep} takes fixed shapes only", fix)


def check_session_ep(wanted: list, extra: list[dict], strict: bool, manifest: dict, package: str) -> None:
    """check_ep_runs for the EP named by `--ep` (strict; `runtime.providers.ep_session_args`'s result)."""
    from semedge.runtime.providers import unit_of

    if strict:
        check_ep_runs(wanted[0], unit_of(wanted[0], extra[0]), manifest, package)


def needs_fixed_shapes(profile: DeviceProfile) -> bool:
    """True when the first EP takes only fixed-shape graphs (NNAPI, CoreML, QNN)."""
    return profile.first_ep.name in _FIXED_SHAPES
