"""plan → ONNX: the one realise step the planner and `semedge build` share.

    realised = realise(plan, lambda: torch_split, RealiseFiles(onnx=..., base=...), calib)

The plan's torch steps (prune, distill) run on the split, the device half is exported
to fp32 ONNX (`base`), then the plan's ONNX steps run on that file (`onnx`). Both files
are cached: a plan whose final file exists is not built again, and plans that share
their torch steps share the export when the callers give them the same `base`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from semedge.compress.plan import Plan, apply_onnx_steps, write_atomic


@dataclass(frozen=True)
class RealiseFiles:
    """Where one plan's files are cached. With `meta`, a sidecar .json beside each file records
    whether the export was fused, and a file counts as cached only with its sidecar."""

    onnx: Path
    base: Path
    meta: bool = True


@dataclass(frozen=True)
class Realised:
    path: Path
    bytes: int
    optimized: bool | None  # the export is the fused graph (None: not recorded)
    built: bool  # False: the cached file was used


def export_fp32(split, out: Path, optimize: bool | str = True) -> bool:
    """Export the device half to `out`; returns whether the graph is the fused one.

    optimize=True: fused when the fused graph passes the parity check, else the plain export
    (the attention fusion assumes the config's head count; pruned layers differ).
    "auto": export_device_half's own choice (the faster graph of those that pass parity)."""
    from semedge.export.onnx import ExportParityError, export_device_half

    try:
        return bool(export_device_half(split, out, optimize=optimize).optimized)
    except ExportParityError:
        if optimize is not True:  # "auto" already fell back to the plain graph; False has nothing to fall back to
            raise
        export_device_half(split, out, optimize=False)
        return False


def _cached(path: Path, meta: bool) -> dict | None:
    """The sidecar of a cached file ({} without sidecars), or None when it is not cached."""
    if not path.is_file():
        return None
    if not meta:
        return {}
    side = path.with_suffix(".json")
    return json.loads(side.read_text()) if side.is_file() else None


def realise(plan: Plan, torch_split: Callable[[], object], files: RealiseFiles, calib=None,
            optimize: bool | str = True) -> Realised:
    """The plan's device graph at `files.onnx`: torch steps → export → ONNX steps, cached.

    torch_split: returns the split after the plan's torch steps (called only when the export
    is not cached). calib: numpy device-half inputs for calibrated ONNX steps (int8_static), or a
    function returning them (called only when the ONNX steps run)."""
    hit = _cached(files.onnx, files.meta)
    if hit is not None:
        return Realised(files.onnx, files.onnx.stat().st_size, hit.get("optimized", True) if files.meta else None, False)
    base = _cached(files.base, files.meta)
    if base is None:
        files.base.parent.mkdir(parents=True, exist_ok=True)
        opt = export_fp32(torch_split(), files.base, optimize)
        if files.meta:
            write_atomic(files.base.with_suffix(".json"), json.dumps({"optimized": opt}).encode())
    else:
        opt = base["optimized"] if files.meta else None
    apply_onnx_steps(files.base, files.onnx, plan, calib=calib() if callable(calib) else calib)
    if files.meta:
        write_atomic(files.onnx.with_suffix(".json"), json.dumps({"optimized": opt, "plan": plan.to_dict()}).encode())
    return Realised(files.onnx, files.onnx.stat().st_size, opt, True)
