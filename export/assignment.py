"""Which nodes of a package's graph each EP of a profile takes, and which fall back.

One method per EP, the best this host has:
- "session": the EP is in this onnxruntime build (CPU here): ORT's own assignment
  (`session.record_ep_graph_assignment_info`), on the graph ORT optimises at load, as a device runs it.
- "mobile_usability_checker" (NNAPI, CoreML): ORT's checker
  (onnxruntime.tools.mobile_helpers.usability_checker, behind check_onnx_model_mobile_usability)
  over the file's graph with shapes inferred: the op tables ORT ships, fixed shapes, rank limits.
- "op_table": the stated op-support rules of runtime/partition.py, named in `source`.
Both non-session methods also judge data types: a node with a float64 tensor falls back on the EPs
in partition.NO_FLOAT64 (the `--frontend graph` log-mel is float64). Partitions are counted with ORT's
grouping (usability_checker.check_partitioning): `partitions` the EP's, `cpu_partitions` the fallback's.
Fallback nodes run on the next EP in the profile's order, finally the CPU EP.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

from semedge.runtime.partition import ACCELERATOR_OP_SOURCES, DOUBLE, NO_FLOAT64, why_not

_CHECKER_SOURCE = "onnxruntime.tools.mobile_helpers.usability_checker ({table})"
_FLOAT64_NOTE = "; float64 nodes fall back (runtime/partition.py, NO_FLOAT64)"


def _record(method: str, source: str, taken: list, fallback: list, why: dict, **more) -> dict:
    """taken / fallback: (name, op_type) pairs; why: op_type -> reason it falls back."""
    return {"method": method, "source": source, "nodes": len(taken) + len(fallback),
            "taken": len(taken), "fallback": len(fallback),
            "taken_ops": dict(Counter(op for _, op in taken)), "fallback_ops": dict(Counter(op for _, op in fallback)),
            "why": why, "taken_nodes": [n for n, _ in taken], "fallback_nodes": [n for n, _ in fallback], **more}


def _by_session(path: Path, ep) -> dict:
    """ORT's assignment on this host, with the EP's options, then CPU."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    provs = [(ep.ort_name, ep.ort_options())] + ([] if ep.name == "CPU" else [("CPUExecutionProvider", {})])
    s = ort.InferenceSession(str(path), so, providers=provs)
    taken, fallback = [], []
    for sub in s.get_provider_graph_assignment_info():
        nodes = [(n.name, n.op_type) for n in sub.get_nodes()]
        (taken if sub.ep_name == ep.ort_name else fallback).extend(nodes)
    why = {op: "ORT assigned it to the CPU EP" for _, op in fallback}
    return _record("session", f"onnxruntime {ort.__version__} session on this host (graph after ORT's load-time optimisation)",
                   taken, fallback, why)


def _shaped(model):
    import onnx

    return onnx.shape_inference.infer_shapes(model, strict_mode=False)


def _elem_types(model) -> dict[str, int]:
    """Element type of every typed tensor of a shape-inferred graph, initializers included."""
    g = model.graph
    out = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.value_info, *g.output]
           if v.type.tensor_type.elem_type}
    out.update({t.name: t.data_type for t in g.initializer})
    return out


def _dtypes(node, types: dict[str, int]) -> tuple[int, ...]:
    return tuple(sorted({types[t] for t in [*node.input, *node.output] if t in types}))


class _Typed:
    """ORT's op-table checker, refusing also the nodes with float64 tensors (partition.NO_FLOAT64)."""

    def __init__(self, ops, types: dict[str, int]):
        self.ops, self.types = ops, types

    def is_op_supported(self, node) -> bool:
        return DOUBLE not in _dtypes(node, self.types) and self.ops.is_op_supported(node)

    def get_caveats(self):
        return self.ops.get_caveats()


class _Member:
    """For ORT's grouping: a node is 'supported' when it is in `ids` (ids of NodeProtos)."""

    def __init__(self, ids: set[int]):
        self.ids = ids

    def is_op_supported(self, node) -> bool:
        return id(node) in self.ids


def _groups(model, ids: set[int]) -> int:
    """How many partitions ORT's grouping makes of the nodes in `ids` (shapes not judged)."""
    from onnxruntime.tools.mobile_helpers import usability_checker as uc

    return int(uc.check_partitioning(model.graph, _Member(ids), False).num_partitions)


def _by_checker(model, ep, types: dict[str, int]) -> dict:
    """ORT's mobile usability checker for NNAPI or CoreML (the table the CoreML options choose), plus float64."""
    from onnxruntime.tools.mobile_helpers import usability_checker as uc

    if ep.name == "NNAPI":
        table, max_rank = "nnapi_supported_ops.md", 999
    else:
        fmt = "neuralnetwork" if ep.options.get("ModelFormat") == "NeuralNetwork" else "mlprogram"
        table, max_rank = f"coreml_supported_{fmt}_ops.md", 5  # ORT's check_coreml_partitions: rank <= 5
    ops = uc._SupportedOpsChecker(Path(uc.__file__).parent / table)  # what check_{nnapi,coreml}_partitions build
    info = uc.check_partitioning(model.graph, _Typed(ops, types), True, max_rank)
    inside = {id(n) for group in info.supported_groups for n in group}
    out = [n for n in model.graph.node if id(n) not in inside]
    unsupported = {s.split(":", 1)[1] for s in info.unsupported_ops}
    why = {}
    for n in out:
        why.setdefault(n.op_type, f"float64 tensors ({ep.name} runs no double)" if DOUBLE in _dtypes(n, types)
                       else f"not in ORT's {ep.name} op table" if n.op_type in unsupported
                       else "dynamic input shape or rank above the EP's limit")
    return _record("mobile_usability_checker", _CHECKER_SOURCE.format(table=table) + _FLOAT64_NOTE,
                   _pairs(model, inside), [(n.name, n.op_type) for n in out], why, partitions=int(info.num_partitions),
                   cpu_partitions=_groups(model, {id(n) for n in out}), suitability=info.suitability().name)


def _pairs(model, ids: set[int]) -> list[tuple[str, str]]:
    return [(n.name, n.op_type) for n in model.graph.node if id(n) in ids]


def _by_table(model, ep, types: dict[str, int]) -> dict:
    """runtime/partition.py's stated rules for an EP this host does not have."""
    dims = [d for v in model.graph.input for d in v.type.tensor_type.shape.dim]
    dynamic = any(not (d.HasField("dim_value") and d.dim_value > 0) for d in dims)
    inside, out, why = set(), set(), {}
    for n in model.graph.node:
        node = SimpleNamespace(domain=n.domain, op_type=n.op_type, dtypes=_dtypes(n, types))
        reason = why_not(ep, node, dynamic)
        (inside if reason is None else out).add(id(n))
        if reason is not None:
            why.setdefault(n.op_type, reason)
    note = _FLOAT64_NOTE if ep.name in NO_FLOAT64 else ""
    return _record("op_table", ACCELERATOR_OP_SOURCES[ep.name] + note, _pairs(model, inside), _pairs(model, out), why,
                   partitions=_groups(model, inside), cpu_partitions=_groups(model, out))


def node_assignment(path: str | Path, profile) -> dict[str, dict]:
    """Per EP of `profile` (profile spelling), which of the graph's nodes it takes and which fall back."""
    import onnx
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    shaped, types = None, None
    out = {}
    for ep in profile.execution_providers:
        if ep.ort_name in have:
            out[ep.name] = _by_session(Path(path), ep)
            continue
        if shaped is None:
            shaped = _shaped(onnx.load(str(path)))
            types = _elem_types(shaped)
        by = _by_checker if ep.name in ("NNAPI", "CoreML") else _by_table
        out[ep.name] = by(shaped, ep, types)
    return out
