"""Which nodes of a package's graph each EP of a profile takes, and which fall back.

One method per EP, the best this host has:
- "session": the EP is in this onnxruntime build (CPU here): ORT's own assignment
  (`session.record_ep_graph_assignment_info`), on the graph ORT optimises at load, as a device runs it.
- "mobile_usability_checker" (NNAPI, CoreML): ORT's checker
  (onnxruntime.tools.mobile_helpers.usability_checker, behind check_onnx_model_mobile_usability)
  over the file's graph with shapes inferred: the op tables ORT ships, fixed shapes, rank limits.
- "op_table": the stated op-support rules of runtime/partition.py, named in `source`.
Fallback nodes run on the next EP in the profile's order, finally the CPU EP.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

from semedge.runtime.partition import ACCELERATOR_OP_SOURCES, why_not

_CHECKER_SOURCE = "onnxruntime.tools.mobile_helpers.usability_checker ({table})"


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


def _by_checker(model, ep) -> dict:
    """ORT's mobile usability checker for NNAPI or CoreML (the table the CoreML options choose)."""
    from onnxruntime.tools.mobile_helpers import usability_checker as uc

    if ep.name == "NNAPI":
        table, info = "nnapi_supported_ops.md", uc.check_nnapi_partitions(model, True)
    else:
        fmt = "neuralnetwork" if ep.options.get("ModelFormat") == "NeuralNetwork" else "mlprogram"
        table = f"coreml_supported_{fmt}_ops.md"
        info = uc.check_coreml_partitions(model, True, table)
    inside = {id(n) for group in info.supported_groups for n in group}
    taken = [(n.name, n.op_type) for n in model.graph.node if id(n) in inside]
    fallback = [(n.name, n.op_type) for n in model.graph.node if id(n) not in inside]
    unsupported = {s.split(":", 1)[1] for s in info.unsupported_ops}
    why = {op: f"not in ORT's {ep.name} op table" if op in unsupported else "dynamic input shape or rank above the EP's limit"
           for _, op in fallback}
    return _record("mobile_usability_checker", _CHECKER_SOURCE.format(table=table), taken, fallback, why,
                   partitions=int(info.num_partitions), suitability=info.suitability().name)


def _by_table(model, ep) -> dict:
    """runtime/partition.py's stated rules for an EP this host does not have."""
    dims = [d for v in model.graph.input for d in v.type.tensor_type.shape.dim]
    dynamic = any(not (d.HasField("dim_value") and d.dim_value > 0) for d in dims)
    taken, fallback, why = [], [], {}
    for n in model.graph.node:
        reason = why_not(ep, SimpleNamespace(domain=n.domain, op_type=n.op_type), dynamic)
        (taken if reason is None else fallback).append((n.name, n.op_type))
        if reason is not None:
            why.setdefault(n.op_type, reason)
    return _record("op_table", ACCELERATOR_OP_SOURCES[ep.name], taken, fallback, why)


def node_assignment(path: str | Path, profile) -> dict[str, dict]:
    """Per EP of `profile` (profile spelling), which of the graph's nodes it takes and which fall back."""
    import onnx
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    model = onnx.load(str(path))
    shaped = None
    out = {}
    for ep in profile.execution_providers:
        if ep.ort_name in have:
            out[ep.name] = _by_session(Path(path), ep)
        elif ep.name in ("NNAPI", "CoreML"):
            shaped = shaped or _shaped(model)
            out[ep.name] = _by_checker(shaped, ep)
        else:
            out[ep.name] = _by_table(model, ep)
    return out
