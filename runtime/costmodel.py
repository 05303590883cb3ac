"""Latency and memory cost model for an ONNX graph on a device profile.

Per node (after shape inference): FLOPs and bytes moved (inputs + outputs +
weights). Roofline time per node = max(flops / (peak[prec] * eff[class]),
bytes / (bandwidth * eff[memory])), plus unpacking of packed (int4) weights and a
per-node overhead; a fixed cost per run on top. The efficiency factors are fitted by least squares on measured
variants (`calibrate`). numpy + onnx only: this runs on a device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import tempfile

import numpy as np
import onnx
from onnx import TensorProto, helper, shape_inference

from semedge.core.frames import N_FRAMES
from semedge.runtime.profiles import DeviceProfile, Efficiency
from semedge.runtime.partition import (  # noqa: F401 (re-exported)
    ACCELERATOR_OP_SOURCES, TRANSFER_US, _boundaries, _modelled_unit, formats_for, needs_fixed_shapes, partition,
    partition_report, why_not)
from semedge.core.errors import UserError

# Classes with their own efficiency factor. Compute classes are bounded by a peak,
# "memory" by bandwidth.
COMPUTE_CLASSES = ("matmul_fp32", "matmul_fp16", "matmul_int8", "matmul_int4", "attention", "conv")
# Added to a node's roofline time, only once a calibration has fitted them (no default):
# "dequant", unpacking packed weights each run (MatMulNBits unpacks all K x N, whatever the
# rows; elements at the fp32 peak), and "weights", streaming a matmul's or conv's weights from
# memory each run (bytes at the bandwidth). Both matter most for short inputs.
ADDED_CLASSES = ("dequant", "weights")
CLASSES = COMPUTE_CLASSES + ("memory",) + ADDED_CLASSES
# Fitted with another class's factor: on a CPU, attention's activation x activation MatMuls and
# the convolutions run the same fp32 GEMM; fitted apart, they trade time with the other classes
# (the least-squares fit zeroed them on some runs and lost the quadratic attention term).
TIED = {"attention": "matmul_fp32", "conv": "matmul_fp32"}

# Defaults before any calibration (rough CPU figures).
DEFAULT_EFFICIENCY = {
    "matmul_fp32": 0.7, "matmul_fp16": 0.5, "matmul_int8": 0.5, "matmul_int4": 0.4,
    "attention": 0.4, "conv": 0.5, "memory": 0.5,
    "overhead_us_per_node": 5.0, "fixed_ms": 0.1,
    # Memory. runtime_mb: a process that has imported ONNX Runtime. The rest is the model's
    # memory (what a device's budget for the device half is compared with, measured as peak
    # RSS minus that baseline): session_mb + weights_factor*weights + arena_factor*activations.
    # Fitted 2026-11-23 on this host by least squares over 24 whisper-base variants (fp32,
    # fp16, int8, int4, pruned; 30 s window): 71% within ±10%, 88% within ±25%.
    "runtime_mb": 60.0, "session_mb": 118.2, "weights_factor": 1.22, "arena_factor": 1.46,
}

# FLOPs per output element for common non-matmul ops (rough).
_ELEM_FLOPS = {
    "Softmax": 5, "LayerNormalization": 8, "SkipLayerNormalization": 9, "Gelu": 8, "BiasGelu": 9,
    "FastGelu": 8, "Erf": 8, "Tanh": 6, "Sigmoid": 4, "Exp": 4, "Pow": 4, "Sqrt": 2,
    "ReduceMean": 1, "DynamicQuantizeLinear": 4, "QuantizeLinear": 2, "DequantizeLinear": 2,
}
# Nodes that move no data in ORT (views, shape arithmetic).
_VIEW_OPS = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Shape", "Constant", "Size"}

_DTYPE_BYTES = {
    TensorProto.FLOAT: 4, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2, TensorProto.DOUBLE: 8,
    TensorProto.INT8: 1, TensorProto.UINT8: 1, TensorProto.INT16: 2, TensorProto.UINT16: 2,
    TensorProto.INT32: 4, TensorProto.UINT32: 4, TensorProto.INT64: 8, TensorProto.UINT64: 8,
    TensorProto.BOOL: 1, TensorProto.INT4: 0.5, TensorProto.UINT4: 0.5,
}


@dataclass
class NodeCost:
    name: str
    op_type: str
    cls: str                # one of COMPUTE_CLASSES, or "memory", or "free" (folded/view)
    flops: float
    bytes: float
    weight_bytes: float
    domain: str = ""
    inputs: tuple[tuple[str, float], ...] = ()  # (tensor, bytes) of non-constant inputs
    outputs: tuple[str, ...] = ()
    dtypes: tuple[int, ...] = ()  # onnx element types of its inputs and outputs (EPs without float64)
    dequant: float = 0.0  # packed weight elements unpacked per run (MatMulNBits: K x N)
    qdq_bits: int = 0  # static QDQ: bits of the activation a DequantizeLinear feeds this matmul/conv (8 or 16)


@dataclass
class GraphCost:
    nodes: list[NodeCost]
    weight_bytes: float
    peak_activation_bytes: float
    unresolved: list[str] = field(default_factory=list)  # nodes whose shapes stayed unknown
    dynamic: bool = False  # the file's inputs have symbolic dims (NNAPI/CoreML/QNN need fixed ones)

    @property
    def flops(self) -> float:
        return float(sum(n.flops for n in self.nodes))

    @property
    def n_nodes(self) -> int:
        return sum(1 for n in self.nodes if n.cls != "free")

    def by_class(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for n in self.nodes:
            d = out.setdefault(n.cls, {"flops": 0.0, "bytes": 0.0, "nodes": 0})
            d["flops"] += n.flops
            d["bytes"] += n.bytes
            d["nodes"] += 1
        return out


# ---------------------------------------------------------------- shapes


def _load(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    p = Path(model)
    if not p.is_file():
        raise UserError(f"{p}: no such ONNX file", "give the path to a .onnx model")
    try:
        return onnx.load(str(p))
    except Exception as e:
        raise UserError(f"{p}: not a readable ONNX model ({e.__class__.__name__})", "re-export the model")


def concrete_input_shapes(model: onnx.ModelProto, length: int | None = None, batch: int = 1,
                          shapes: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """Input name -> concrete shape: fixed dims kept; a symbolic first dim -> batch; others -> length
    (speech `frames` without a length: 3000, the 30 s window, so budgets hold for any utterance)."""
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        if shapes and inp.name in shapes:
            out[inp.name] = list(shapes[inp.name])
            continue
        dims = []
        for i, d in enumerate(inp.type.tensor_type.shape.dim):
            if d.HasField("dim_value"):
                dims.append(d.dim_value)
            elif i == 0:
                dims.append(batch)
            elif d.dim_param == "frames" and length is None:
                dims.append(N_FRAMES)  # speech: the worst case, a full 30 s window
            else:
                if length is None:
                    raise UserError(f"input '{inp.name}' has a symbolic dim '{d.dim_param}'",
                                    "give an input length (--length N)")
                dims.append(length)
        out[inp.name] = dims
    return out


_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_UNARY_CONTRIB = {"Gelu", "FastGelu", "BiasGelu", "QuickGelu", "BiasAdd", "SkipLayerNormalization",
                  "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "MultiHeadAttention"}


def _standardize(m: onnx.ModelProto, shapes_of_inits: dict[str, list[int]]) -> None:
    """Swap com.microsoft ops for standard ops with the same output shape (shape inference only)."""
    extra = []
    for node in m.graph.node:
        if node.domain not in ("com.microsoft",):
            continue
        attrs = {at.name: helper.get_attribute_value(at) for at in node.attribute}
        op = node.op_type
        if op in _QDQ_OPS:  # ORT writes 16-bit Q/DQ in its own domain; the standard ops (opset 21) infer the same
            node.domain = ""
            continue
        if op in ("MatMulNBits", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "FusedMatMul"):
            a = node.input[0]
            if op == "MatMulNBits":
                b = f"__shape_{node.output[0]}"
                extra.append(helper.make_tensor_value_info(b, TensorProto.FLOAT, [int(attrs["K"]), int(attrs["N"])]))
            elif op == "FusedMatMul":
                b = node.input[1]
            else:
                b = f"__shape_{node.output[0]}"
                extra.append(helper.make_tensor_value_info(b, TensorProto.FLOAT, shapes_of_inits.get(
                    node.input[1], [1, 1])))
            new = helper.make_node("MatMul", [a, b], [node.output[0]], name=node.name)
        elif op in _UNARY_CONTRIB:
            new = helper.make_node("Identity", [node.input[0]], [node.output[0]], name=node.name)
        else:
            continue
        node.CopyFrom(new)
    m.graph.input.extend(extra)


def ort_folded(model, input_shapes: dict[str, list[int]]) -> onnx.ModelProto | None:
    """The graph ONNX Runtime runs before fusions: constants folded with the input dims fixed.

    None when onnxruntime cannot load the model (then the raw graph is analysed).
    """
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "in.onnx"
        if isinstance(model, onnx.ModelProto):
            onnx.save(model, str(src))
        else:
            src = Path(model)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(Path(d) / "folded.onnx")
        so.log_severity_level = 3
        m = onnx.load(str(src), load_external_data=False)
        for inp in m.graph.input:
            for d_i, dim in enumerate(inp.type.tensor_type.shape.dim):
                if dim.HasField("dim_param") and inp.name in input_shapes:
                    so.add_free_dimension_override_by_name(dim.dim_param, int(input_shapes[inp.name][d_i]))
        try:
            ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
            return onnx.load(str(Path(d) / "folded.onnx"))
        except Exception:
            return None


def _topological(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its nodes in an order where each follows its inputs' producers (the fp16 converter
    appends its input Casts last; shape inference and the liveness scan walk the node list)."""
    nodes = list(model.graph.node)
    made = {o for n in nodes for o in n.output}
    ready: set[str] = set()  # tensors produced so far
    order, left = [], nodes
    while left:
        rest = [n for n in left if any(i in made and i not in ready for i in n.input)]
        step = [n for n in left if not any(i in made and i not in ready for i in n.input)]
        if not step:  # a cycle, or a subgraph reference: leave the rest as written
            order += rest
            break
        order += step
        ready.update(o for n in step for o in n.output)
        left = rest
    if order == nodes:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(order)
    return out


def infer_shapes(model: onnx.ModelProto, input_shapes: dict[str, list[int]]
                 ) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Concrete shapes and element types of every tensor (name -> dims, name -> onnx dtype)."""
    # a copy without large weights (only their shapes matter): fast inference
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    g = m.graph
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    for init in model.graph.initializer:
        if np.prod(init.dims) > 64:
            g.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            g.initializer.append(init)
    for inp in m.graph.input:
        if inp.name in input_shapes:
            tt = inp.type.tensor_type
            del tt.shape.dim[:]
            for v in input_shapes[inp.name]:
                tt.shape.dim.add().dim_value = int(v)
    del m.graph.value_info[:]
    _standardize(m, {i.name: list(i.dims) for i in m.graph.initializer})
    try:
        m = shape_inference.infer_shapes(m, data_prop=True)
    except Exception:
        pass
    shapes: dict[str, list[int]] = {}
    types: dict[str, int] = {}
    for vi in list(m.graph.input) + list(m.graph.value_info) + list(m.graph.output):
        tt = vi.type.tensor_type
        if tt.elem_type:
            types[vi.name] = tt.elem_type
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            shapes[vi.name] = [d.dim_value for d in tt.shape.dim]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
        types[init.name] = init.data_type
    return shapes, types


# ---------------------------------------------------------------- per-node cost


def _numel(s) -> float:
    return float(np.prod(s)) if s is not None else 0.0


def _nbytes(name, shapes, types) -> float:
    s = shapes.get(name)
    return _numel(s) * _DTYPE_BYTES.get(types.get(name, TensorProto.FLOAT), 4) if s is not None else 0.0


def _matmul_class(dtype: int) -> str:
    return {TensorProto.FLOAT16: "matmul_fp16", TensorProto.BFLOAT16: "matmul_fp16"}.get(dtype, "matmul_fp32")


def _dequantized(model: onnx.ModelProto) -> dict[str, str]:
    """Static QDQ: each DequantizeLinear output, and views of it, -> the quantized tensor it reads."""
    out: dict[str, str] = {}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear":
            out[n.output[0]] = n.input[0]
        elif n.op_type in _VIEW_OPS and n.input and n.input[0] in out:
            out[n.output[0]] = out[n.input[0]]
    return out


def _node_cost(node, shapes, types, consts: set[str], dq: dict[str, str] | None = None) -> NodeCost:
    op = node.op_type
    ins = [i for i in node.input if i]
    outs = [o for o in node.output if o]
    out_shape = shapes.get(outs[0]) if outs else None
    dq = dq or {}
    stored = lambda t: _nbytes(dq.get(t, t), shapes, types)  # noqa: E731  QDQ inputs at their quantized width
    w_bytes = sum(stored(i) for i in ins if i in consts)
    io_bytes = sum(stored(i) for i in ins) + sum(_nbytes(o, shapes, types) for o in outs)
    if all(i in consts for i in ins) or op in _VIEW_OPS:
        return NodeCost(node.name, op, "free", 0.0, 0.0, 0.0, node.domain)
    attrs = {at.name: helper.get_attribute_value(at) for at in node.attribute}
    if op == "Gather" and ins[0] in consts:  # an embedding lookup reads its rows, not the table
        io_bytes = 2 * sum(_nbytes(o, shapes, types) for o in outs) + sum(_nbytes(i, shapes, types) for i in ins[1:])
    flops, cls, dequant = 0.0, "memory", 0.0
    a = shapes.get(ins[0]) if ins else None
    src = dq.get(ins[0]) if ins else None
    qdq_bits = int(8 * _DTYPE_BYTES.get(types.get(src, 0), 0)) if src else 0
    if op in ("MatMul", "FusedMatMul", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
              "MatMulNBits", "Gemm") and a is not None and out_shape is not None:
        k = int(attrs["K"]) if op == "MatMulNBits" else (a[-2] if op == "Gemm" and attrs.get("transA") else a[-1])
        flops = 2.0 * _numel(out_shape) * k
        weight_in = len(ins) > 1 and ins[1] in consts
        if op == "MatMulNBits":
            cls = "matmul_int8" if int(attrs.get("accuracy_level", 0)) == 4 else "matmul_int4"
            dequant = float(attrs["K"]) * float(attrs["N"])
        elif op in ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"):
            cls = "matmul_int8"
        elif not weight_in:
            cls = "attention"  # activation x activation (QK^T, AV)
        else:
            cls = _matmul_class(types.get(ins[0], TensorProto.FLOAT))
    elif op in ("Attention", "MultiHeadAttention") and a is not None:
        b, s, h = a[0], a[1], a[-1]
        flops = (2.0 * b * s * h * 3 * h if op == "Attention" else 0.0) + 4.0 * b * s * s * h
        cls = "attention"
    elif op in ("Conv", "ConvInteger") and out_shape is not None and len(ins) > 1 and ins[1] in shapes:
        w = shapes[ins[1]]
        flops = 2.0 * _numel(out_shape) * _numel(w[1:])
        cls = "conv"
    else:
        flops = _numel(out_shape) * _ELEM_FLOPS.get(op, 1)
    if cls in COMPUTE_CLASSES and qdq_bits == 8:  # 8-bit QDQ: QLinear* kernels on a CPU, int8 units on an NPU
        cls = "matmul_int8"
    edges = tuple((i, _nbytes(i, shapes, types)) for i in ins if i not in consts)
    dtypes = tuple(sorted({types[t] for t in ins + outs if t in types}))
    return NodeCost(node.name or op, op, cls, flops, io_bytes, w_bytes, node.domain, edges, tuple(outs), dtypes,
                    dequant, qdq_bits if cls in COMPUTE_CLASSES else 0)


def _const_names(model: onnx.ModelProto) -> set[str]:
    """Initializers plus outputs of nodes computable from them alone (ORT folds those)."""
    consts = {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        ins = [i for i in node.input if i]
        if node.op_type == "Constant" or (ins and all(i in consts for i in ins) and node.op_type not in (
                "MatMulNBits",)):
            consts.update(o for o in node.output if o)
    return consts


def _peak_activation(model, shapes, types, consts) -> float:
    """Largest sum of live intermediate tensors along the node order (liveness scan)."""
    last_use: dict[str, int] = {}
    for idx, node in enumerate(model.graph.node):
        for i in node.input:
            if i and i not in consts:
                last_use[i] = idx
    keep = {o.name for o in model.graph.output}
    live = {i.name: _nbytes(i.name, shapes, types) for i in model.graph.input if i.name not in consts}
    peak = sum(live.values())
    for idx, node in enumerate(model.graph.node):
        for o in node.output:
            if o and o not in consts and node.op_type not in _VIEW_OPS:
                live[o] = _nbytes(o, shapes, types)
        peak = max(peak, sum(live.values()))
        for i in node.input:
            if i in live and last_use.get(i) == idx and i not in keep:
                del live[i]
    return peak


def analyze(model, length: int | None = None, batch: int = 1,
            shapes: dict[str, list[int]] | None = None, fold: bool = True, as_written: bool = False) -> GraphCost:
    """Cost of every node of `model` (path or ModelProto) for one input length.

    With `fold` (and onnxruntime installed) the graph analysed is the one ORT's CPU EP runs
    after its basic optimisations (constant folding), not the file's raw nodes.
    as_written: the file's own nodes and types, as an accelerator EP compiles them (TensorRT keeps fp16
    where ORT's CPU EP casts to fp32; an NPU keeps QDQ), with the folded graph's shapes where the
    file's own shape inference leaves a tensor unknown.
    """
    m = _load(model)
    dynamic = any(not d.HasField("dim_value") for i in m.graph.input for d in i.type.tensor_type.shape.dim
                  if i.name not in {t.name for t in m.graph.initializer})
    inputs = concrete_input_shapes(m, length, batch, shapes)
    folded = ort_folded(model, inputs) if fold else None
    if folded is not None and not as_written:
        m = folded
    m = _topological(m)
    all_shapes, types = infer_shapes(m, inputs)
    if as_written and folded is not None:
        all_shapes = {**infer_shapes(folded, inputs)[0], **all_shapes}
    consts = _const_names(m)
    dq = _dequantized(m)
    nodes, unresolved = [], []
    for node in m.graph.node:
        nc = _node_cost(node, all_shapes, types, consts, dq)
        if nc.cls != "free" and any(o and o not in all_shapes for o in node.output[:1]):
            unresolved.append(node.name or node.op_type)
        nodes.append(nc)
    weight_bytes = sum(_nbytes(i.name, all_shapes, types) for i in m.graph.initializer)
    return GraphCost(nodes, weight_bytes, _peak_activation(m, all_shapes, types, consts), unresolved, dynamic)


# ---------------------------------------------------------------- prediction


def _eff(profile: DeviceProfile, unit: str = "cpu") -> dict[str, float]:
    """Efficiency factors of a compute unit: defaults, then what the profile fitted for that unit."""
    e = dict(DEFAULT_EFFICIENCY)
    acc = profile.accelerators.get(unit) if unit != "cpu" else None
    fitted = acc.efficiency if acc is not None else profile.efficiency
    e.update({k: v for k, v in fitted.model_dump().items() if isinstance(v, (int, float))})
    return e


def _peak(peaks, cls: str) -> float:
    """Peak in FLOP/s for a compute class, from a unit's peaks (GFLOP/s)."""
    g = {"matmul_fp16": peaks.fp16, "matmul_int8": peaks.int8}.get(cls, peaks.fp32)
    return g * 1e9


def unit_class(n: NodeCost, unit: str) -> str:
    """A node's compute class on a unit. 16-bit QDQ activations: fp32 on a CPU (ORT has no 16-bit integer
    matmul; it dequantizes) and the fp16 peak on an accelerator (assumed: profiles state no 16 x 8 peak)."""
    if n.qdq_bits == 16 and unit != "cpu":
        return "matmul_fp16"
    return n.cls


def node_times(cost: GraphCost, profile: DeviceProfile, eff: dict[str, float] | None = None,
               unit: str | None = None) -> list[tuple[str, float]]:
    """(bound class, seconds) per non-free node: the roofline max of compute and memory time, each
    node on the unit of the EP that takes it (`unit`: every node on that unit, e.g. for calibration).
    A node with packed weights adds a second entry, ("dequant", unpacking time)."""
    out = []
    for n, ep in partition(cost, profile):
        u = unit or _modelled_unit(profile, ep)
        runs_on = unit or ep.unit  # how the EP runs the node, on its unit's peaks (else the CPU's)
        if runs_on != "cpu" and n.op_type in _QDQ_OPS:
            continue  # an accelerator EP folds Q/DQ into the quantized op it feeds (assumed; no NPU here)
        peaks, bw_gbs = profile.unit_peaks(u) or profile.unit_peaks("cpu")
        e = eff if (eff is not None and (unit or u == "cpu")) else _eff(profile, u)
        t_mem = n.bytes / (bw_gbs * 1e9 * e["memory"])
        cls = unit_class(n, runs_on)
        if cls == "memory":
            out.append(("memory", t_mem))
            continue
        t_comp = n.flops / (_peak(peaks, cls) * e[cls])
        out.append((cls, t_comp) if t_comp >= t_mem else ("memory", t_mem))
        if n.dequant and "dequant" in e:
            out.append(("dequant", n.dequant / (_peak(peaks, "dequant") * e["dequant"])))
        if n.weight_bytes and "weights" in e and n.cls in COMPUTE_CLASSES:
            out.append(("weights", n.weight_bytes / (bw_gbs * 1e9 * e["weights"])))
    return out


def predict_latency_ms(cost: GraphCost, profile: DeviceProfile, unit: str | None = None) -> float:
    """Sum of node times on their units + per-node overhead + fixed cost + transfers between units."""
    e = _eff(profile, unit or "cpu")
    t = sum(s for _, s in node_times(cost, profile, e if unit else None, unit))
    if unit is None:
        t += sum(b / (profile.mem_bandwidth_gbs * 1e9) + TRANSFER_US * 1e-6
                 for b in _boundaries(partition(cost, profile), profile))
    return 1e3 * t + cost.n_nodes * e["overhead_us_per_node"] * 1e-3 + e["fixed_ms"]


def predict_model_memory_mb(cost: GraphCost, profile: DeviceProfile) -> float:
    """Predicted memory the model adds to a process that already runs ONNX Runtime (MB):
    what a device's memory budget for the device half is compared with."""
    e = _eff(profile)
    return e["session_mb"] + (e["weights_factor"] * cost.weight_bytes + e["arena_factor"] * cost.peak_activation_bytes) / 1e6


def predict_memory_mb(cost: GraphCost, profile: DeviceProfile) -> float:
    """Predicted peak RSS of a process that runs the model once (MB): runtime + model."""
    return _eff(profile)["runtime_mb"] + predict_model_memory_mb(cost, profile)


def predict(model, profile: DeviceProfile, length: int | None = None) -> dict:
    cost = analyze(model, length)
    by = {k: round(v["flops"] / 1e9, 4) for k, v in cost.by_class().items() if v["flops"]}
    return {
        "device": profile.name, "length": length,
        "predicted_ms": round(predict_latency_ms(cost, profile), 3),
        "predicted_peak_mb": round(predict_memory_mb(cost, profile), 1),
        "weights_mb": round(cost.weight_bytes / 1e6, 2),
        "activations_mb": round(cost.peak_activation_bytes / 1e6, 2),
        "gflops": round(cost.flops / 1e9, 4), "gflops_by_class": by,
        "nodes": cost.n_nodes, "predicted_model_mb": round(predict_model_memory_mb(cost, profile), 1),
        "fits_memory": predict_model_memory_mb(cost, profile) <= profile.memory_budget_mb,
        "unresolved_nodes": len(cost.unresolved),
        "ep": profile.first_ep.name, "partition": partition_report(cost, profile),
        "calibrated": profile.efficiency.calibrated_on is not None,
    }


# ---------------------------------------------------------------- calibration


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Non-negative least squares by dropping negative coefficients and refitting."""
    active = np.ones(a.shape[1], bool)
    x = np.zeros(a.shape[1])
    for _ in range(a.shape[1]):
        sol, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
        x[:] = 0
        x[active] = sol
        if (sol >= 0).all():
            return x
        idx = np.flatnonzero(active)[np.argmin(sol)]
        active[idx] = False
    return x


def calibrate(samples: list[tuple[GraphCost, float]], profile: DeviceProfile, iters: int = 4,
              label: str = "", min_full: int = 8, unit: str = "cpu") -> Efficiency:
    """Fit efficiency factors and the per-node overhead from (cost, measured_ms) pairs (fixed cost 0).

    Minimises the relative error. Classes with no time in the samples keep their
    current value. With fewer than `min_full` samples only one common scale is fitted. The roofline bound of each node is re-chosen with the fitted factors.
    """
    if not samples:
        raise UserError("no calibration samples", "measure at least a few model variants first")
    if unit != "cpu":
        raise UserError(f"fitting the {unit} entry is not implemented (no {unit} to test it on here)",
                        "calibrate the CPU entry from CPU timings; accelerator entries keep the defaults")
    e = _eff(profile, unit)
    meas = np.array([m for _, m in samples], float)
    if len(samples) < min_full:
        # too few samples for one factor per class: scale all compute/memory factors at once
        pred = np.array([predict_latency_ms(c, profile, unit) for c, _ in samples])
        ratio = float(np.exp(np.mean(np.log(pred / meas))))  # >1: device faster than predicted
        for c in CLASSES:
            if c in e:
                e[c] = float(e[c] * ratio)
        e["overhead_us_per_node"] /= ratio
        e["fixed_ms"] /= ratio
        iters = 0
    else:
        for c in ADDED_CLASSES:
            e.setdefault(c, 1.0)  # fitted below; a zero coefficient leaves it negligible
        # No fixed per-run term: on the calibration variants it trades with the memory factor (three
        # runs of benchmarks/predictor.py fitted fixed 0 / 0 / 2.3 ms with memory 3.1 / 7.4 / 15.6, and the
        # third over-predicted the short inputs). The per-node overhead carries per-run costs.
        e["fixed_ms"] = 0.0
    for _ in range(iters):
        cols = CLASSES + ("overhead",)
        a = np.zeros((len(samples), len(cols)))
        for r, (cost, _) in enumerate(samples):
            for cls, s in node_times(cost, profile, e, unit):
                # s * eff = nominal time at the peak; coefficient to fit is 1/eff
                a[r, cols.index(TIED.get(cls, cls))] += 1e3 * s * e[cls]
            a[r, cols.index("overhead")] = cost.n_nodes * 1e-3
        used = a.any(axis=0)
        w = 1.0 / meas
        x = np.zeros(len(cols))
        x[used] = _nnls(a[:, used] * w[:, None], meas * w)
        for j, c in enumerate(cols[: len(CLASSES)]):
            if used[j]:  # a zero coefficient means "no measurable time": a very high factor
                e[c] = float(1.0 / max(x[j], 1e-3))
        e.update({c: e[t] for c, t in TIED.items()})
        e["overhead_us_per_node"] = float(x[cols.index("overhead")])
    cur = profile.efficiency.model_dump()
    fitted = {c: round(e[c], 4) for c in CLASSES if c in e}
    fitted.update(overhead_us_per_node=round(e["overhead_us_per_node"], 3), fixed_ms=round(e["fixed_ms"], 4))
    keep = {k: cur[k] for k in ("runtime_mb", "arena_factor", "weights_factor") if cur.get(k) is not None}
    return Efficiency(**fitted, **keep, calibrated_on=label or f"{len(samples)} samples")


def calibrate_memory(samples: list[tuple[GraphCost, float]], eff: Efficiency) -> Efficiency:
    """Fit runtime_mb, weights_factor and arena_factor from (cost, measured peak RSS MB) pairs."""
    a = np.array([[1.0, c.weight_bytes / 1e6, c.peak_activation_bytes / 1e6] for c, _ in samples])
    b = np.array([m for _, m in samples], float)
    w = 1.0 / b
    x = _nnls(a * w[:, None], b * w)
    d = eff.model_dump()
    # the intercept is runtime + session: keep the session's share, at most the intercept
    session = min(eff.session_mb if eff.session_mb is not None else DEFAULT_EFFICIENCY["session_mb"], float(x[0]))
    d.update(runtime_mb=round(float(x[0]) - session, 2), session_mb=round(session, 2), weights_factor=round(float(x[1]), 4),
             arena_factor=round(float(x[2]), 4))
    return Efficiency(**d)
