"""Quantization of the exported device half (ONNX in, ONNX out), torchao style.

    quantize(model, Int4(block_size=32), keep_fp32_filter(model, ["critical"]))

One class per mode, each with its own `quantize`; `MODES` maps a mode's name (the
step config's "mode") to its class. A filter over (node, name) chooses what is touched:
`keep_fp32_filter` keeps the nodes a pattern matches in fp32 (mixed precision).

Modes
- "int8_dynamic" (Int8Dynamic): int8 weights (per output channel), activations quantized
  at run time (DynamicQuantizeMatMul / MatMulInteger): CPU.
- "int8_static" (Int8Static): QDQ graph (QuantizeLinear/DequantizeLinear pairs), activation
  ranges calibrated on real inputs: the format NPU execution providers (QNN, NNAPI) take.
  `activations="uint16"` keeps int8 weights but 16-bit activations (A16W8), for
  encoders whose activations have outliers too wide for 8 bits (Whisper's do).
- "fp16" (Fp16): weights and compute in float16, float32 inputs/outputs (GPUs, Jetson).
- "int4" (Int4): weight-only 4-bit MatMulNBits (block-wise scales, `block_size`); with
  `other_weights="int8"` the remaining big weights (conv front end, position table)
  are stored as int8 + DequantizeLinear.
A plan step's config (`OnnxQuantConfig`) is one flat JSON object, as written in plans on
disk: `mode` picks the class, which reads the fields it needs. `keep_fp32` is a list of
regexes (or preset names, see PRESETS) matched against each node's name and its input names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np

from semedge.compress.plan import ConfigBase, check_choice, write_atomic
from semedge.core.errors import UserError

LAYER_RE = re.compile(r"layers\.(\d+)[./]")
# Presets for keep_fp32; "{last}" is the model's last encoder layer index.
PRESETS = {
    "jsc": [r"(^|[/.])jsc[/.]"],
    "frontend": [r"(^|[/.])conv[12][/.]", r"embed_positions"],
    "first_last": [r"layers\.0[./]", r"layers\.{last}[./]"],
    # what 8-bit activations cannot hold in Whisper (outliers): attention's activation x activation
    # MatMuls (QK^T, AV) and the FFN output projections' inputs
    "attention_matmuls": [r"self_attn/MatMul"],
    "ffn_out": [r"(^|[/.])fc2[/.]"],
}
PRESETS["critical"] = PRESETS["jsc"] + PRESETS["frontend"] + PRESETS["first_last"]

NodeFilter = Callable[[object, str], bool]  # (onnx NodeProto, node name) -> True to quantize it


# ---------------------------------------------------------------- modes


class OnnxMode:
    """A quantization mode: a frozen dataclass of its own settings that quantizes a graph.

    `quantize(model, exclude, calib, tmp)` returns the quantized ModelProto; `exclude` names
    the nodes to leave fp32, `tmp` is a scratch folder for quantizers that work on files."""

    name: ClassVar[str]
    short: ClassVar[str]

    @classmethod
    def from_step(cls, cfg: "OnnxQuantConfig") -> "OnnxMode":
        """The mode's settings, read from the step config's fields of the same names."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})

    def tag(self) -> str:
        return self.short

    def quantize(self, model, exclude: list[str], calib, tmp: Path):
        raise NotImplementedError


def _run_on_files(model, tmp: Path, fn) -> object:
    """Save `model`, run the file-based quantizer `fn(src, dst)`, load the result."""
    import onnx

    src, dst = tmp / "in.onnx", tmp / "out.onnx"
    onnx.save(model, str(src))
    fn(src, dst)
    return onnx.load(str(dst))


@dataclass(frozen=True)
class Int8Dynamic(OnnxMode):
    name: ClassVar[str] = "int8_dynamic"
    short: ClassVar[str] = "int8"
    per_channel: bool = True
    quantize_conv: bool = False  # quantize the conv front end too (ConvInteger)
    other_weights: str = "fp32"  # "int8": the remaining big weights as int8 + DequantizeLinear

    def tag(self) -> str:
        return self.short + ("+w8" if self.other_weights == "int8" else "")

    def quantize(self, model, exclude, calib, tmp):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        ops = ["MatMul"] + (["Conv"] if self.quantize_conv else [])
        model = _run_on_files(model, tmp, lambda src, dst: quantize_dynamic(
            src, dst, op_types_to_quantize=ops, per_channel=self.per_channel, weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude, extra_options={"MatMulConstBOnly": True}))
        return int8_weight_storage(model, exclude) if self.other_weights == "int8" else model


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


def common_shape(calib: list) -> list:
    """Crop calibration inputs to their smallest size on every axis. ORT's histogram calibrators
    (percentile, entropy) stack all of a tensor's activations into one array, so windows of
    different lengths fail there ("inhomogeneous shape"); MinMax takes them as they are."""
    if len({c.shape for c in calib}) <= 1:
        return calib
    if len({c.ndim for c in calib}) > 1:
        raise UserError("calibration inputs have different ranks", "give inputs of one shape family, e.g. all [80, T]")
    lo = np.min([c.shape for c in calib], axis=0)
    return [c[tuple(slice(0, int(n)) for n in lo)] for c in calib]


@dataclass(frozen=True)
class Int8Static(OnnxMode):
    name: ClassVar[str] = "int8_static"
    short: ClassVar[str] = "int8-qdq"
    per_channel: bool = True
    op_types: tuple = ()  # op types to quantize (empty = every op ORT can quantize)
    calib_size: int = 8  # calibration inputs used
    calibrate: str = "minmax"  # activation ranges from minmax, percentile (99.999) or entropy
    activations: str = "uint8"  # "uint16" = A16W8 (int8 weights, 16-bit activations; QNN's HTP runs it)

    def tag(self) -> str:
        return self.short + ("(a16)" if self.activations == "uint16" else "")

    def quantize(self, model, exclude, calib, tmp):
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        if calib is None or len(calib) == 0:
            raise UserError("int8_static needs calibration inputs", "pass calib (device-half inputs of a few real messages)")
        inputs = [i.name for i in model.graph.input]
        if len(inputs) != 1:
            raise UserError(f"int8_static calibration supports one-input graphs; this one has {inputs}", "use int8_dynamic for text encoders")
        calib = [np.asarray(c) for c in calib][: self.calib_size]
        if self.calibrate != "minmax":
            calib = common_shape(calib)
        opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
        a16 = self.activations == "uint16"
        method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                  "entropy": CalibrationMethod.Entropy}[self.calibrate]
        return _run_on_files(model, tmp, lambda src, dst: quantize_static(
            src, dst, _Reader(inputs[0], calib), quant_format=QuantFormat.QDQ, per_channel=self.per_channel,
            activation_type=QuantType.QUInt16 if a16 else QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude, op_types_to_quantize=list(self.op_types) or None, calibrate_method=method,
            # 16-bit Q/DQ before opset 21 lives in the com.microsoft domain
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False, "UseQDQContribOps": a16 and opset < 21}))


@dataclass(frozen=True)
class Fp16(OnnxMode):
    name: ClassVar[str] = "fp16"
    short: ClassVar[str] = "fp16"

    def quantize(self, model, exclude, calib, tmp):
        from onnxruntime.transformers.float16 import convert_float_to_float16

        return convert_float_to_float16(model, keep_io_types=True, node_block_list=exclude or None, disable_shape_infer=True)


@dataclass(frozen=True)
class Int4(OnnxMode):
    name: ClassVar[str] = "int4"
    short: ClassVar[str] = "int4"
    block_size: int = 128  # weights per scale
    symmetric: bool = True  # symmetric blocks (no zero points)
    accuracy_level: int = 4  # MatMulNBits compute type (4 = int8 activations, fastest on CPU; 0 = fp32)
    other_weights: str = "fp32"  # "int8": the remaining big weights (conv, positions) as int8 + DequantizeLinear

    def tag(self) -> str:
        return f"{self.short}(b={self.block_size})" + ("+w8" if self.other_weights == "int8" else "")

    def quantize(self, model, exclude, calib, tmp):
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(model, bits=4, block_size=self.block_size, is_symmetric=self.symmetric,
                                 accuracy_level=self.accuracy_level, nodes_to_exclude=exclude, op_types_to_quantize=("MatMul",))
        q.process()
        m = q.model.model
        return int8_weight_storage(m, exclude) if self.other_weights == "int8" else m


# The registry: a step config's "mode" -> the class that applies it.
MODES: dict[str, type[OnnxMode]] = {
    "int8_dynamic": Int8Dynamic,
    "int8_static": Int8Static,
    "fp16": Fp16,
    "int4": Int4,
}


# ---------------------------------------------------------------- the step config (plan JSON)


@dataclass(frozen=True)
class OnnxQuantConfig(ConfigBase):
    """A quantize_onnx step as plans store it: one flat object, `mode` naming a class in MODES.

    The fields are those of every mode (the JSON and the plan hashes on disk keep them all);
    `mode_config()` gives the mode's own settings."""

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
        check_choice("mode", self.mode, tuple(MODES))
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

    def mode_config(self) -> OnnxMode:
        return MODES[self.mode].from_step(self)

    def describe(self) -> str:
        s = self.mode_config().tag()
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


def keep_fp32_filter(model, patterns) -> NodeFilter:
    """A filter over (node, name): False for the nodes `patterns` keep fp32 (name or an input matches)."""
    regs = [re.compile(p) for p in expand_patterns(patterns, model)]
    return lambda node, name: not any(r.search(s) for r in regs for s in [name, *node.input])


def _check_names(model) -> None:
    seen = set()
    for i, n in enumerate(model.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"
        if n.name in seen:
            n.name = f"{n.name}_{i}"
        seen.add(n.name)


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


def quantize(model, mode: OnnxMode, filter_fn: NodeFilter | None = None, calib=None, tmp_dir=None):
    """Quantize the ModelProto `model` with `mode`, touching only the nodes `filter_fn(node, name)` accepts."""
    _check_names(model)
    exclude = [] if filter_fn is None else [n.name for n in model.graph.node if not filter_fn(n, n.name)]
    with tempfile.TemporaryDirectory(dir=tmp_dir) as td, _ort_quantizer_quiet():
        model = mode.quantize(model, exclude, calib, Path(td))
    _strip_nondeterminism(model)
    return model


@contextlib.contextmanager
def _ort_quantizer_quiet():
    """ORT's quantizers log advice per call on the root logger ("consider pre-processing", per-weight axis
    notes): kept to errors while they run."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


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
    model = quantize(model, config.mode_config(), keep_fp32_filter(model, config.keep_fp32), calib,
                     tmp_dir=onnx_out.parent if onnx_out.parent.exists() else None)
    write_atomic(onnx_out, model.SerializeToString())
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
