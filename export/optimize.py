"""Graph optimisation of an exported device half (offline, portable).

Two passes, both writing plain ONNX + ONNX Runtime contrib ops (`com.microsoft`),
which every ORT build with contrib ops runs on any execution provider:

1. ONNX Runtime's transformer optimizer (`onnxruntime.transformers.optimizer`,
   model_type "bart", opt_level 0 so no hardware-specific rewrite is saved):
   Erf-GELU -> Gelu/BiasGelu, LayerNorm + residual -> SkipLayerNormalization.
2. Our attention fusion: the scaled-dot-product pattern that the TorchScript
   exporter emits for current transformers (which ORT's Bart fusion does not
   recognise) -> `com.microsoft.MultiHeadAttention` (q, k, v [B,S,D], padding
   mask as key_padding_mask).

Session-time ORT_ENABLE_ALL rewrites (layout, NCHWc) are left to the device's
own ORT session; they are never saved into a package.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from semedge.core.files import atomic_path

FUSED_OPS = {
    "gelu": ("Gelu", "FastGelu", "BiasGelu", "QuickGelu"),
    "layernorm": ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"),
    "attention": ("Attention", "MultiHeadAttention"),
}
MS_DOMAIN = "com.microsoft"


@dataclass
class OptimizeReport:
    path: Path
    ops_before: dict = field(default_factory=dict)
    ops_after: dict = field(default_factory=dict)
    attention_fused: int = 0

    def fused_counts(self) -> dict:
        return fused_op_counts(self.ops_after)


def op_counts(model_or_path) -> dict[str, int]:
    """Node count per op type (main graph)."""
    m = model_or_path if isinstance(model_or_path, onnx.ModelProto) else onnx.load(str(model_or_path), load_external_data=False)
    return dict(collections.Counter(n.op_type for n in m.graph.node))


def fused_op_counts(ops: dict) -> dict[str, int]:
    """{gelu, layernorm, attention}: how many fused nodes of each family a graph holds."""
    return {fam: sum(ops.get(o, 0) for o in names) for fam, names in FUSED_OPS.items()}


def optimize_graph(
    in_path: str | Path,
    out_path: str | Path,
    *,
    num_heads: int,
    hidden_size: int,
    fuse_attention: bool = True,
) -> OptimizeReport:
    """Fuse GELU, LayerNorm and attention in `in_path`; write `out_path` (single file, atomically)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    in_path, out_path = Path(in_path), Path(out_path)
    before = op_counts(in_path)
    opts = FusionOptions("bart")
    opts.enable_gelu_approximation = False  # exact GELU: keeps fp32 parity
    # ORT's optimizer logs every failed pattern match at WARNING/DEBUG; keep the console quiet.
    quiet = [logging.getLogger(n) for n in ("onnxruntime.transformers", "fusion_base", "onnx_model", "fusion_utils", "onnx_model_bert", "onnx_model_bart")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        opt = optimize_model(str(in_path), model_type="bart", num_heads=num_heads, hidden_size=hidden_size,
                             optimization_options=opts, opt_level=0, use_gpu=False)
    finally:
        for lg, lv in zip(quiet, levels):
            lg.setLevel(lv)
    model = opt.model
    n_att = fuse_sdpa_attention(model, num_heads) if fuse_attention else 0
    type_contrib_outputs(model)
    save_model(model, out_path)
    return OptimizeReport(out_path, before, op_counts(model), n_att)


def type_contrib_outputs(model: onnx.ModelProto) -> None:
    """ONNX shape inference skips com.microsoft ops: declare their (float) outputs so tools
    downstream (onnxruntime.quantization) still know each tensor's type."""
    if any(n.domain == MS_DOMAIN for n in model.graph.node) and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    known = {v.name for v in model.graph.value_info} | {o.name for o in model.graph.output}
    for n in model.graph.node:
        if n.domain != MS_DOMAIN:
            continue
        for o in n.output:
            if o and o not in known:
                model.graph.value_info.append(helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None))
                known.add(o)


def save_model(model: onnx.ModelProto, out_path: str | Path) -> None:
    """Write a single-file ONNX model atomically (weights inside; < 2 GB)."""
    with atomic_path(out_path) as tmp:
        onnx.save_model(model, str(tmp), save_as_external_data=False)


# ----------------------------------------------------------------------------- attention fusion


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.g = model.graph
        self.refresh()

    def refresh(self):
        self.prod = {o: n for n in self.g.node for o in n.output}
        self.cons = collections.defaultdict(list)
        for n in self.g.node:
            for i in n.input:
                self.cons[i].append(n)
        self.inits = {t.name: t for t in self.g.initializer}

    def parent(self, node, idx=0):
        return self.prod.get(node.input[idx]) if idx < len(node.input) else None

    def scalar(self, name) -> float | None:
        """Value of a scalar constant (initializer or Constant node), else None."""
        if name in self.inits:
            a = numpy_helper.to_array(self.inits[name])
        else:
            n = self.prod.get(name)
            if n is None or n.op_type != "Constant":
                return None
            a = None
            for at in n.attribute:
                if at.name == "value":
                    a = numpy_helper.to_array(at.t)
                elif at.name == "value_float":
                    a = np.array(at.f)
            if a is None:
                return None
        return float(a.reshape(-1)[0]) if a.size == 1 else None

    def skip_scales(self, name: str) -> tuple[str, float]:
        """Walk up through Mul-by-scalar nodes; return (tensor name, product of scalars)."""
        scale = 1.0
        while True:
            n = self.prod.get(name)
            if n is None or n.op_type != "Mul":
                return name, scale
            s0, s1 = self.scalar(n.input[0]), self.scalar(n.input[1])
            if s1 is not None:
                scale, name = scale * s1, n.input[0]
            elif s0 is not None:
                scale, name = scale * s0, n.input[1]
            else:
                return name, scale

    def perm(self, node):
        for a in node.attribute:
            if a.name == "perm":
                return list(a.ints)
        return None

    def heads_input(self, name: str, perms: list[list[int]]) -> tuple[str, float] | None:
        """Match [Mul*] Transpose(perms...) Reshape [Mul*] <- x [B,S,D]; return (x, scale)."""
        name, scale = self.skip_scales(name)
        for p in perms:
            n = self.prod.get(name)
            if n is None or n.op_type != "Transpose" or self.perm(n) != p:
                return None
            name, s = self.skip_scales(n.input[0])
            scale *= s
        n = self.prod.get(name)
        if n is None or n.op_type != "Reshape":
            return None
        x, s = self.skip_scales(n.input[0])
        return x, scale * s


def _mask_source(gr: _Graph, name: str, mask_inputs: set[str]) -> str | None:
    """The graph input an additive padding mask is computed from, or None when the added
    term is something else too (e.g. T5's relative position bias, read from a 2-D table)."""
    seen, stack, found = set(), [name], set()
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in mask_inputs:
            found.add(t)
            continue
        if t in gr.inits and len(gr.inits[t].dims) >= 2:
            return None
        n = gr.prod.get(t)
        if n is not None and n.op_type == "Shape":  # only the shape flows on, not the values
            continue
        if n is not None and n.op_type == "Constant" and any(a.name == "value" and len(a.t.dims) >= 2 for a in n.attribute):
            return None
        if n is not None:
            stack.extend(i for i in n.input if i)
    return found.pop() if len(found) == 1 else None


def fuse_sdpa_attention(model: onnx.ModelProto, num_heads: int) -> int:
    """Replace scaled-dot-product attention subgraphs by com.microsoft.MultiHeadAttention; count fused."""
    gr = _Graph(model)
    graph_inputs = {i.name for i in model.graph.input}
    mask_inputs = {n for n in graph_inputs if "mask" in n}
    new_nodes, drop, mask_casts = [], set(), {}
    for sm in [n for n in gr.g.node if n.op_type == "Softmax"]:
        mask = None
        src = gr.prod.get(sm.input[0])
        if src is not None and src.op_type == "Add":  # additive padding mask
            a, b = (gr.prod.get(i) for i in src.input)
            qk_name, mask_name = (src.input[0], src.input[1]) if a is not None and a.op_type in ("MatMul", "Mul") else (src.input[1], src.input[0])
            mask = _mask_source(gr, mask_name, mask_inputs)
            if mask is None:
                continue
        else:
            qk_name = sm.input[0]
        qk_name, s_qk = gr.skip_scales(qk_name)
        qk = gr.prod.get(qk_name)
        if qk is None or qk.op_type != "MatMul":
            continue
        q = gr.heads_input(qk.input[0], [[0, 2, 1, 3]])
        k = gr.heads_input(qk.input[1], [[0, 2, 3, 1]]) or gr.heads_input(qk.input[1], [[0, 1, 3, 2], [0, 2, 1, 3]])
        users = gr.cons[sm.output[0]]
        if q is None or k is None or len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[0] != sm.output[0]:
            continue
        av = users[0]
        v = gr.heads_input(av.input[1], [[0, 2, 1, 3]])
        tr = gr.cons[av.output[0]]
        if v is None or v[1] != 1.0 or len(tr) != 1 or tr[0].op_type != "Transpose" or gr.perm(tr[0]) != [0, 2, 1, 3]:
            continue
        rs = gr.cons[tr[0].output[0]]
        if len(rs) != 1 or rs[0].op_type != "Reshape":
            continue
        scale = s_qk * q[1] * k[1]
        inputs = [q[0], k[0], v[0]]
        if mask is not None:
            if mask not in mask_casts:
                cast = helper.make_node("Cast", [mask], [f"{mask}_int32_for_mha"], to=onnx.TensorProto.INT32, name=f"{mask}_cast_int32")
                new_nodes.append(cast)
                mask_casts[mask] = cast.output[0]
            inputs += ["", mask_casts[mask]]  # bias (none), key_padding_mask [B, L]
        new_nodes.append(helper.make_node(
            "MultiHeadAttention", inputs, [rs[0].output[0]], domain=MS_DOMAIN,
            name=f"{sm.name or 'softmax'}_mha", num_heads=int(num_heads), scale=float(scale),
        ))
        drop.add(id(rs[0]))
    if not new_nodes:
        return 0
    kept = [n for n in gr.g.node if id(n) not in drop]
    del gr.g.node[:]
    gr.g.node.extend(kept + new_nodes)
    _remove_dead(model)
    _topo_sort(model)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return sum(1 for n in new_nodes if n.op_type == "MultiHeadAttention")


def _remove_dead(model: onnx.ModelProto) -> None:
    g = model.graph
    outputs = {o.name for o in g.output}
    while True:
        used = {i for n in g.node for i in n.input} | outputs
        alive = [n for n in g.node if any(o in used for o in n.output)]
        if len(alive) == len(g.node):
            break
        del g.node[:]
        g.node.extend(alive)
    used = {i for n in g.node for i in n.input}
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
    vis = [v for v in g.value_info if v.name in used or v.name in outputs]
    del g.value_info[:]
    g.value_info.extend(vis)


def _topo_sort(model: onnx.ModelProto) -> None:
    g = model.graph
    ready = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    pending, order = list(g.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                order.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise RuntimeError(f"graph has a cycle or a dangling input near node {rest[0].name!r}")
        pending = rest
    del g.node[:]
    g.node.extend(order)
