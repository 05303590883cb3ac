"""Tiny ONNX encoders for fast tests, built with onnx.helper (no torch)."""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def tiny_encoder(path: Path, d: int = 64, ffn: int = 256, layers: int = 2, seq: int | None = None,
                 seed: int = 0) -> Path:
    """[1, T, d] -> [1, T, d]: per layer MatMul-Add-Relu-MatMul-Add residual + LayerNorm + a QK^T
    attention-like product. T is symbolic unless `seq` is given."""
    rng = np.random.default_rng(seed)
    t = seq if seq else "T"
    inits, nodes = [], []
    x = "x"
    for i in range(layers):
        w1 = numpy_helper.from_array((rng.standard_normal((d, ffn)) * 0.05).astype(np.float32), f"w1_{i}")
        b1 = numpy_helper.from_array(np.zeros(ffn, np.float32), f"b1_{i}")
        w2 = numpy_helper.from_array((rng.standard_normal((ffn, d)) * 0.05).astype(np.float32), f"w2_{i}")
        g = numpy_helper.from_array(np.ones(d, np.float32), f"g_{i}")
        be = numpy_helper.from_array(np.zeros(d, np.float32), f"be_{i}")
        inits += [w1, b1, w2, g, be]
        nodes += [
            helper.make_node("MatMul", [x, f"w1_{i}"], [f"h{i}"]),
            helper.make_node("Add", [f"h{i}", f"b1_{i}"], [f"hb{i}"]),
            helper.make_node("Relu", [f"hb{i}"], [f"r{i}"]),
            helper.make_node("MatMul", [f"r{i}", f"w2_{i}"], [f"o{i}"]),
            helper.make_node("Transpose", [x], [f"xt{i}"], perm=[0, 2, 1]),
            helper.make_node("MatMul", [x, f"xt{i}"], [f"s{i}"]),          # [1,T,T]
            helper.make_node("Softmax", [f"s{i}"], [f"p{i}"], axis=-1),
            helper.make_node("MatMul", [f"p{i}", x], [f"a{i}"]),           # [1,T,d]
            helper.make_node("Add", [f"o{i}", f"a{i}"], [f"oa{i}"]),
            helper.make_node("Add", [x, f"oa{i}"], [f"res{i}"]),
            helper.make_node("LayerNormalization", [f"res{i}", f"g_{i}", f"be_{i}"], [f"y{i}"], axis=-1),
        ]
        x = f"y{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, t, d])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, t, d])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path
