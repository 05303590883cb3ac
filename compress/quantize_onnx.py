"""Quantization of the exported device half (ONNX in, ONNX out).

Modes
- "int8_dynamic": int8 weights (per output channel), activations quantized at run
  time (DynamicQuantizeMatMul / MatMulInteger): CPU.
- "int8_static":  QDQ graph (QuantizeLinear/DequantizeLinear pairs), activation ranges
  calibrated on real inputs: the format NPU execution providers (QNN, NNAPI) take.
  `activations="uint16"` keeps int8 weights but 16-bit activations (A16W8), for
  encoders whose activations have outliers too wide for 8 bits (Whisper's do).
- "fp16":         weights and compute in float16, float32 inputs/outputs (GPUs, Jetson).
- "int4":         weight-only 4-bit MatMulNBits (block-wise scales, `block_size`); with
  `other_weights="int8"` the remaining big weights (conv front end, position table)
  are stored as int8 + DequantizeLinear.
Mixed precision: `keep_fp32` is a list of regexes (or preset names, see PRESETS)
matched against each node's name and its input names; matching nodes stay fp32.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semedge.compress.plan import ConfigBase, check_choice, write_atomic
from semedge.semcom.errors import UserError

MODES = ("int8_dynamic", "int8_static", "fp16", "int4")
LAYER_RE = re.compile(r"layers\.(\d+)[./]")
# Presets for keep_fp32; "{last}" is the model's last encoder layer index.
PRESETS = {
    "jsc": [r"(^|[/.])jsc[/.]"],
    "frontend": [r"(^|[/.])conv[12][/.]", r"embed_positions"],
    "first_last": [r"layers\.0[./]", r"layers\.{last}[./]"],
}
PRESETS["critical"] = PRESETS["jsc"] + PRESETS["frontend"] + PRESETS["first_last"]
SHORT = {"int8_dynamic": "int8", "int8_static": "int8-qdq", "fp16": "fp16", "int4": "int4"}


@dataclass(frozen=True)
class OnnxQuantConfig(ConfigBase):
    mode: str = "int8_dynamic"
    per_channel: bool = True  # int8: one scale per output channel
    keep_fp32: tuple = ()  # regexes or preset names (jsc, frontend, first_last, critical)
    block_size: int = 128  # int4: weights per scale
    symmetric: bool = True  # int4: symmetric blocks (no zero points)
    accuracy_level: int = 4  # int4: MatMulNBits compute type (4 = int8 activations, fastest on CPU; 0 = fp32)
    other_weights: str = "fp32"  # int4, int8_dynamic: "int8" stores the remaining big weights (conv, positions) as int8 + DequantizeLinear
    quantize_conv: bool = False  # int8_dynamic: quantize the conv front end too (ConvInteger)
    op_types: tuple = ()  # int8_static: op types to quantize (empty = every op ORT can quantize)
    calib_size: int = 8  # int8_static: calibration inputs used
    calibrate: str = "minmax"  # int8_static: activation ranges from minmax, percentile (99.999) or entropy
    activations: str = "uint8"  # int8_static: activation type; "uint16" = A16W8 (int8 weights, 16-bit activations; QNN's HTP runs it)

    def __post_init__(self):
        check_choice("mode", self.mode, MODES)
        check_choice("other_weights", self.other_weights, ("fp32", "int8"))
        for name in ("keep_fp32", "op_types"):
            v = getattr(self, name)
            if isinstance(v, str) or not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
                raise UserError(f"{name}={v!r} must be a list of strings", f'e.g. "{name}": ["critical"]' if name == "keep_fp32" else 'e.g. ["MatMul", "Conv"]')
            object.__setattr__(self, name, tuple(v))
        for p in self.keep_fp32:
            if p in PRESETS:
                continue
            try:
                re.compile(p.replace("{last}", "0"))
            except re.error as e:
                raise UserError(f"keep_fp32 pattern {p!r} is not a valid regex ({e})", f"use a regex or a preset: {', '.join(PRESETS)}") from None
        if isinstance(self.block_size, bool) or self.block_size not in (16, 32, 64, 128, 256):
            raise UserError(f"block_size={self.block_size!r} is not supported", "use 16, 32, 64, 128 or 256")
        check_choice("accuracy_level", self.accuracy_level, (0, 1, 2, 3, 4))
        check_choice("calibrate", self.calibrate, ("minmax", "percentile", "entropy"))
        check_choice("activations", self.activations, ("uint8", "uint16"))
        if isinstance(self.calib_size, bool) or not isinstance(self.calib_size, int) or self.calib_size < 1:
            raise UserError(f"calib_size={self.calib_size!r} must be a positive integer", "e.g. 8")

    def describe(self) -> str:
        s = SHORT[self.mode]
        if self.mode == "int4":
            s += f"(b={self.block_size})"
        if self.other_weights == "int8" and self.mode in ("int4", "int8_dynamic"):
            s += "+w8"
        if self.mode == "int8_static" and self.activations == "uint16":
            s += "(a16)"
        if self.keep_fp32:
            s += "+fp32[" + ",".join(self.keep_fp32) + "]"
        return s


# ---------------------------------------------------------------- node selection


def expand_patterns(patterns, model) -> list[str]:
    """Presets expanded and {last} replaced by the model's last encoder layer index."""
    names = [n.name for n in model.graph.node] + [i for n in model.graph.node for i in n.input]
    layers = [int(m.group(1)) for s in names for m in [LAYER_RE.search(s)] if m]
    last = str(max(layers)) if layers else "0"
    out = []
    for p in patterns:
        for q in PRESETS.get(p, [p]):
            out.append(q.replace("{last}", last))
    return out


def select_nodes(model, patterns) -> list[str]:
    """Names of nodes whose name or any input name matches one of the regexes."""
    regs = [re.compile(p) for p in expand_patterns(patterns, model)]
    if not regs:
        return []
    hit = []
    for n in model.graph.node:
        if any(r.search(s) for r in regs for s in [n.name, *n.input]):
            hit.append(n.name)
    return hit


def _check_names(model) -> None:
    seen = set()
    for i, n in enumerate(model.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"
        if n.name in seen:
            n.name = f"{n.name}_{i}"
        seen.add(n.name)


# ---------------------------------------------------------------- modes


def _dynamic(model_path: Path, out: Path, cfg: OnnxQuantConfig, exclude: list[str]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ops = ["MatMul"] + (["Conv"] if cfg.quantize_conv else [])
    quantize_dynamic(model_path, out, op_types_to_quantize=ops, per_channel=cfg.per_channel, weight_type=QuantType.QInt8,
                     nodes_to_exclude=exclude, extra_options={"MatMulConstBOnly": True})


class _Reader:
    def __init__(self, name: str, calib):
        self.items = [{name: np.ascontiguousarray(c[None] if c.ndim == 2 else c, dtype=np.float32)} for c in calib]
        self.i = 0

    def get_next(self):
        if self.i >= len(self.items):
            return None
        self.i += 1
        return self.items[self.i - 1]

    def rewind(self):
        self.i = 0


def _static(model_path: Path, out: Path, cfg: OnnxQuantConfig, exclude: list[str], calib) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if calib is None or len(calib) == 0:
        raise UserError("int8_static needs calibration inputs", "pass calib (device-half inputs of a few real messages)")
    model = onnx.load(str(model_path), load_external_data=False)
    inputs = [i.name for i in model.graph.input]
    if len(inputs) != 1:
        raise UserError(f"int8_static calibration supports one-input graphs; this one has {inputs}", "use int8_dynamic for text encoders")
    calib = [np.asarray(c) for c in calib][: cfg.calib_size]
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    a16 = cfg.activations == "uint16"
    quantize_static(model_path, out, _Reader(inputs[0], calib), quant_format=QuantFormat.QDQ, per_channel=cfg.per_channel,
                    activation_type=QuantType.QUInt16 if a16 else QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=exclude,
                    op_types_to_quantize=list(cfg.op_types) or None,
                    calibrate_method={"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                                      "entropy": CalibrationMethod.Entropy}[cfg.calibrate],
                    # 16-bit Q/DQ before opset 21 lives in the com.microsoft domain
                    extra_options={"WeightSymmetric": True, "ActivationSymmetric": False,
                                   "UseQDQContribOps": a16 and opset < 21})


def _fp16(model, cfg: OnnxQuantConfig, exclude: list[str]):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True, node_block_list=exclude or None, disable_shape_infer=True)


def _int4(model, cfg: OnnxQuantConfig, exclude: list[str]):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(model, bits=4, block_size=cfg.block_size, is_symmetric=cfg.symmetric, accuracy_level=cfg.accuracy_level,
                             nodes_to_exclude=exclude, op_types_to_quantize=("MatMul",))
    q.process()
    m = q.model.model
    if cfg.other_weights == "int8":
        m = int8_weight_storage(m, exclude)
    return m


_PLAIN_READERS = ("Conv", "Slice", "Gather", "Add", "Mul", "MatMul")  # not quantized ops' scales/zero points


def int8_weight_storage(model, exclude: list[str], min_elements: int = 4096):
    """Store big float32 initializers (not read by excluded nodes) as int8 + DequantizeLinear.

    Scales per output channel (axis 0) for Conv weights, per tensor otherwise. The
    DequantizeLinear output keeps the original name, so consumers are untouched.
    """
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    excluded = set(exclude)
    readers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    keep, new_nodes = [], []
    for init in g.initializer:
        rs = readers.get(init.name, [])
        if (init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) < min_elements or not rs
                or any(r.name in excluded or r.op_type not in _PLAIN_READERS for r in rs)):
            keep.append(init)
            continue
        w = numpy_helper.to_array(init)
        conv = all(r.op_type == "Conv" and r.input[1] == init.name for r in rs)
        if conv:
            scale = np.abs(w).reshape(w.shape[0], -1).max(1) / 127.0
            bshape = (-1,) + (1,) * (w.ndim - 1)
        else:
            scale = np.array(np.abs(w).max() / 127.0)
            bshape = ()
        scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
        q = np.clip(np.round(w / scale.reshape(bshape)), -127, 127).astype(np.int8)
        qname, sname = init.name + "_q8", init.name + "_q8_scale"
        keep += [numpy_helper.from_array(q, qname), numpy_helper.from_array(scale, sname)]
        attrs = {"axis": 0} if conv else {}
        new_nodes.append(helper.make_node("DequantizeLinear", [qname, sname], [init.name], name=f"{init.name}_dq8", **attrs))
    del g.initializer[:]
    g.initializer.extend(keep)
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(new_nodes + nodes)
    return model


# ---------------------------------------------------------------- apply


def apply(onnx_in: str | Path, onnx_out: str | Path, config: OnnxQuantConfig | dict, calib=None) -> Path:
    """Quantize the ONNX file `onnx_in` into `onnx_out` (written atomically); returns onnx_out.

    calib: device-half inputs (array [N, 80, 3000] or a list of them), used by int8_static.
    """
    import onnx

    if isinstance(config, dict):
        config = OnnxQuantConfig.from_dict(config, "quantize_onnx config")
    onnx_in, onnx_out = Path(onnx_in), Path(onnx_out)
    if not onnx_in.is_file():
        raise UserError(f"ONNX file {onnx_in} does not exist", "export the device half first")
    model = onnx.load(str(onnx_in))
    _check_names(model)
    exclude = select_nodes(model, config.keep_fp32)
    with tempfile.TemporaryDirectory(dir=onnx_out.parent if onnx_out.parent.exists() else None) as td:
        src = Path(td) / "in.onnx"
        dst = Path(td) / "out.onnx"
        if config.mode in ("int8_dynamic", "int8_static"):
            onnx.save(model, str(src))
            if config.mode == "int8_dynamic":
                _dynamic(src, dst, config, exclude)
            else:
                _static(src, dst, config, exclude, calib)
            model = onnx.load(str(dst))
            if config.mode == "int8_dynamic" and config.other_weights == "int8":
                model = int8_weight_storage(model, exclude)
        elif config.mode == "fp16":
            model = _fp16(model, config, exclude)
        else:
            model = _int4(model, config, exclude)
        _strip_nondeterminism(model)
        data = model.SerializeToString()
    write_atomic(onnx_out, data)
    return onnx_out


def _strip_nondeterminism(model) -> None:
    """Clear fields that differ run to run, so equal inputs give equal bytes."""
    del model.metadata_props[:]
    model.doc_string = ""


def quantized_nodes(path_or_model) -> dict[str, int]:
    """Op-type counts of the quantized ops in a graph (to check what a mode produced)."""
    import onnx

    m = onnx.load(str(path_or_model)) if isinstance(path_or_model, (str, Path)) else path_or_model
    ops = ("MatMulNBits", "DynamicQuantizeMatMul", "MatMulInteger", "ConvInteger", "QuantizeLinear", "DequantizeLinear",
           "DynamicQuantizeLinear", "QLinearMatMul", "Cast")
    out: dict[str, int] = {}
    for n in m.graph.node:
        if n.op_type in ops:
            out[n.op_type] = out.get(n.op_type, 0) + 1
    return out
