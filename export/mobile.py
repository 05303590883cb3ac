"""Graph forms the mobile and NPU execution providers need: fixed shapes and ORT's `.ort` format.

- `fix_input_shapes`: every input dim fixed (onnxruntime.tools.onnx_model_utils, the code behind
  `python -m onnxruntime.tools.make_dynamic_shape_fixed`), then ORT's quantization pre-processing
  (symbolic shape inference + basic optimisation) folds the Shape/Gather/Concat arithmetic the
  exporter wrote, so every tensor has a fixed shape (NNAPI, CoreML and QNN take no dynamic shape).
- `to_ort_format`: ORT Mobile's flatbuffer model and its reduced operator config
  (onnxruntime.tools.convert_onnx_models_to_ort, as `python -m onnxruntime.tools.convert_onnx_models_to_ort`).
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

from semedge.core.errors import UserError
from semedge.core.files import replace_atomic, scratch_dir
from semedge.core.layout import ORT_FILE, ORT_OPS_CONFIG


@contextlib.contextmanager
def _quiet():
    """ORT's tools print progress to stdout and log warnings: keep both out of the CLI's streams."""
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


def dynamic_dims(path: str | Path) -> list[str]:
    """'input:axis' of every graph input or output dim that is not a fixed positive number."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    out = []
    for v in list(m.graph.input) + list(m.graph.output):
        for i, d in enumerate(v.type.tensor_type.shape.dim):
            if not (d.HasField("dim_value") and d.dim_value > 0):
                out.append(f"{v.name}:{i}")
    return out


def fix_input_shapes(src: str | Path, dst: str | Path, shapes: dict[str, list[int]]) -> Path:
    """`src` with each named input fixed to its shape and the shape arithmetic folded, written to `dst`."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_input_shape_fixed

    dst = Path(dst)
    m = onnx.load(str(src))
    for name, shape in shapes.items():
        make_input_shape_fixed(m.graph, name, list(shape))
    fix_output_shapes(m)
    with scratch_dir(dst.parent) as td:
        fixed, pre = td / "fixed.onnx", td / "pre.onnx"
        onnx.save(m, str(fixed))
        with _quiet():
            quant_pre_process(str(fixed), str(pre))
        left = dynamic_dims(pre)
        if left:
            raise UserError(f"fixing the input shapes {shapes} left dynamic dims {left}",
                            "export for a device whose first EP takes dynamic shapes (CPU, XNNPACK, CUDA, TensorRT)")
        replace_atomic(pre, dst)
    return dst


def to_ort_format(src: str | Path, out_dir: str | Path, style: str) -> dict:
    """Convert `src` to `out_dir`/device.ort + required_operators.config; return the manifest record.

    style: "Runtime" (saved runtime optimisations, what ORT recommends for NNAPI/CoreML/QNN, whose
    partitioning must see the unfused graph) or "Fixed" (optimised for the CPU EP at conversion).
    target_platform "arm": phones; QDQ stays int8 (session.qdqisint8allowed).
    """
    import onnxruntime as ort
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    out_dir = Path(out_dir)
    with scratch_dir(out_dir) as td:
        model = td / "device.onnx"
        model.write_bytes(Path(src).read_bytes())
        conv = td / "out"
        with _quiet():
            convert_onnx_models_to_ort(model, conv, [OptimizationStyle[style]], target_platform="arm")
        ort_files, configs = list(conv.glob("*.ort")), list(conv.glob("*.config"))
        if len(ort_files) != 1 or len(configs) != 1:
            raise RuntimeError(f"convert_onnx_models_to_ort wrote {sorted(p.name for p in conv.iterdir())}")
        replace_atomic(ort_files[0], out_dir / ORT_FILE)
        replace_atomic(configs[0], out_dir / ORT_OPS_CONFIG)
    return {"file": ORT_FILE, "operators_config": ORT_OPS_CONFIG, "optimization_style": style,
            "target_platform": "arm", "onnxruntime": ort.__version__,
            "session_config": {"session.enable_saved_runtime_optimizations": "1"} if style == "Runtime" else {}}
