"""plan → ONNX: the one realise step the planner and `semedge build` share.

    realised = realise(plan, lambda: torch_split, RealiseFiles(onnx=..., base=...), calib)

The plan's torch steps (prune, distill) run on the split, the device half is exported
to fp32 ONNX (`base`), then the plan's ONNX steps run on that file (`onnx`). Both files
are cached: a plan whose final file exists is not built again, and plans that share
their torch steps share the export when the callers give them the same `base`. Each file
is sealed (core.files: `<name>.sha256` beside it) after its sidecar is written and verified
on every read: a damaged, truncated or unsealed one is built again with a warning.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from semedge.compress.plan import Plan, apply_onnx_steps, write_atomic
from semedge.core.files import check_cache, replace_atomic, scratch_dir, seal


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
    """The sidecar of a cached file ({} without sidecars), or None when it is not cached
    (missing, or not matching its sums: then removed with a warning)."""
    if not check_cache(path, "ONNX candidate"):
        return None
    if not meta:
        return {}
    try:
        return json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None


def _finish(path: Path, meta: dict | None) -> None:
    """Write the sidecar (when kept), then seal the file: a kill before the seal leaves it unsealed (rebuilt)."""
    if meta is not None:
        write_atomic(path.with_suffix(".json"), json.dumps(meta).encode())
    seal(path)


def export_base(torch_split: Callable[[], object], files: RealiseFiles, optimize: bool | str = True) -> bool | None:
    """The fp32 export at `files.base` (cached); whether it is fused (None without sidecars)."""
    base = _cached(files.base, files.meta)
    if base is not None:
        return base["optimized"] if files.meta else None
    with scratch_dir(files.base.parent) as td:  # the exporter's temporaries go in there too
        opt = export_fp32(torch_split(), td / files.base.name, optimize)
        replace_atomic(td / files.base.name, files.base)
    _finish(files.base, {"optimized": opt} if files.meta else None)
    return opt


def realise(plan: Plan, torch_split: Callable[[], object], files: RealiseFiles, calib=None,
            optimize: bool | str = True) -> Realised:
    """The plan's device graph at `files.onnx`: torch steps → export → ONNX steps, cached.

    torch_split: returns the split after the plan's torch steps (called only when the export
    is not cached). calib: numpy device-half inputs for calibrated ONNX steps (int8_static), or a
    function returning them (called only when the ONNX steps run)."""
    hit = _cached(files.onnx, files.meta)
    if hit is not None:
        return Realised(files.onnx, files.onnx.stat().st_size, hit.get("optimized", True) if files.meta else None, False)
    opt = export_base(torch_split, files, optimize)
    apply_onnx_steps(files.base, files.onnx, plan, calib=calib() if callable(calib) else calib)
    _finish(files.onnx, {"optimized": opt, "plan": plan.to_dict()} if files.meta else None)
    return Realised(files.onnx, files.onnx.stat().st_size, opt, True)
