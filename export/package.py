"""Device packages: a folder (and a .zip of it) holding everything one device needs.

Layout: semedge.core.layout (file names, format); docs/export.md has the manifest,
field by field.

The loader/verifier lives in runtime/package.py (device side); this module only writes.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import zipfile
from pathlib import Path
from typing import Callable

from semedge.core.files import atomic_dir_and_file, sha256_bytes, sha256_file
from semedge.core.layout import (  # noqa: F401 (ADAPTERS, JSC_CONFIG: part of the writer's API)
    ADAPTERS, FORMAT, FRONTEND_FILE, JSC_CONFIG, JSC_WEIGHTS, MANIFEST, MEL_FILTERS_FILE, ONNX_FILE,
    TEXT_TOKENIZER_FILES, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE,
)
from semedge.core.version import __version__
from semedge.runtime.trust import load_private_key, write_signature


def graph_precision(path: str | Path) -> str:
    """fp32 | fp16 | int8 | int4, read from the graph's ops and weight types."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    ops = {n.op_type for n in m.graph.node}
    if "MatMulNBits" in ops:
        return "int4"
    if ops & {"MatMulInteger", "DynamicQuantizeLinear", "QLinearMatMul", "QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger"}:
        return "int8"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in m.graph.initializer):
        return "fp16"
    return "fp32"


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_frontend(split, root: Path) -> dict:
    """Write the task's front-end files (speech: mel filters + frontend.json; text: the
    tokenizer); return the manifest's `frontend` section."""
    return split.task.write_frontend(split.loaded, root)


def _write_jsc(split, root: Path, jsc_ckpt: str | Path | None = None) -> dict:
    """server/jsc.safetensors (decoder state, keys without prefix) + server/jsc.json, and the
    checkpoint's decoder LoRA adapters (server/adapters.safetensors) when it has them."""
    import dataclasses

    from safetensors.torch import save_file

    from semedge.semcom.checkpoint import ADAPTER_FILE, read_manifest

    codec = split.codec
    (root / "server").mkdir()
    state = {k: v.detach().contiguous().cpu() for k, v in codec.decoder.state_dict().items()}
    save_file(state, str(root / JSC_WEIGHTS))
    meta = {"format": "semedge-jsc-decoder/1", "config": dataclasses.asdict(codec.cfg)}
    if jsc_ckpt is not None and (Path(jsc_ckpt) / ADAPTER_FILE).is_file():
        man = read_manifest(Path(jsc_ckpt))
        shutil.copyfile(Path(jsc_ckpt) / ADAPTER_FILE, root / ADAPTERS)
        meta["lora"] = man.get("lora")
        meta["qlora"] = bool(man.get("qlora"))
    _write_json(root / JSC_CONFIG, meta)
    return dataclasses.asdict(codec.cfg)


def _zip_dir(src: Path, zip_path: Path, arc_root: str) -> None:
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as z:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                z.write(p, f"{arc_root}/{p.relative_to(src).as_posix()}")


def _name_of(x) -> str | None:
    if x is None:
        return None
    return x if isinstance(x, str) else getattr(x, "name", str(x))


def _plan_dict(plan) -> dict | None:
    if plan is None:
        return None
    if isinstance(plan, dict):
        return plan
    return plan.to_dict()


def build_package(
    split,
    out_dir: str | Path,
    *,
    onnx_path: str | Path | None = None,
    plan=None,
    profile=None,
    measured: dict | None = None,
    jsc_ckpt: str | Path | None = None,
    export_report=None,
    opset: int = 17,
    optimize: bool | str = "auto",
    progress: Callable[[str], None] | None = None,
    sign_key=None,
    extra_files: dict[str, Path] | None = None,
    extra: dict | None = None,
) -> Path:
    """Write the package folder `out_dir` and `<out_dir>.zip` atomically; return `out_dir`.

    onnx_path: an already exported (e.g. quantized) device graph to ship; None exports
    `split` here (fp32, optimised, parity-checked). export_report: the ExportReport of
    that graph, recorded in the manifest when given. sign_key: a signing.key path (or an
    Ed25519 private key): the package gets signature.json (runtime/trust.py). extra_files: more
    files to ship (package path -> source file). extra: more manifest sections (an "onnx" or "frontend"
    entry is merged into that section), e.g. compress/targets.py's target and node_assignment.
    """
    from semedge.core.errors import UserError

    say = progress or (lambda msg: None)
    out_dir = check_out_dir(out_dir, "dist/android-mid")
    if onnx_path is not None and not Path(onnx_path).is_file():
        raise UserError(f"ONNX file {onnx_path} does not exist", "export it first, or leave onnx_path out")
    private = _private_key(sign_key)  # a bad key fails before any work
    zip_final = out_dir.with_name(out_dir.name + ".zip")
    # Folder and zip are swapped in together: a kill leaves the old pair (or none) or the new one.
    with atomic_dir_and_file(out_dir, zip_final) as (tmp, zip_tmp):
        for rel, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / rel)
        _fill_package(tmp, out_dir.name, split, onnx_path, plan, profile, measured, jsc_ckpt,
                      export_report, opset, optimize, say, dict(extra or {}))
        if private is not None:
            say("signing the manifest")
            write_signature(tmp, private)
        say("zipping")
        _zip_dir(tmp, zip_tmp, out_dir.name)
    return out_dir


def check_out_dir(out_dir, example: str) -> Path:
    """The package folder `out_dir` as an absolute path; a UserError when it has no name or is a file."""
    from semedge.core.errors import UserError

    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.name in ("", ".", ".."):
        raise UserError(f"package folder {out_dir} has no name", f"give --out a folder name, e.g. {example}")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"package path {out_dir} exists and is not a folder", "choose another --out")
    return out_dir


def _private_key(sign_key):
    if sign_key is None or not isinstance(sign_key, (str, Path)):
        return sign_key
    return load_private_key(sign_key)


def sign_package(out_dir: str | Path, sign_key) -> dict:
    """Sign an existing package (hashes checked first: a changed package is refused, not signed);
    `<out_dir>.zip`, when there, is rewritten with the signature. Returns signature.json's record."""
    from semedge.runtime.package import Package

    private = _private_key(sign_key)
    pkg = Package.load(out_dir)  # refuses changed, missing or unlisted files
    zip_path = pkg.path.with_name(pkg.path.name + ".zip")
    if not zip_path.is_file():
        return write_signature(pkg.path, private)
    with atomic_dir_and_file(pkg.path, zip_path) as (tmp, zip_tmp):  # signed folder and zip swapped in together
        shutil.copytree(pkg.path, tmp, dirs_exist_ok=True)
        rec = write_signature(tmp, private)
        _zip_dir(tmp, zip_tmp, pkg.path.name)
    return rec


def _fill_package(tmp: Path, name: str, split, onnx_path, plan, profile, measured, jsc_ckpt,
                  export_report, opset, optimize, say, extra: dict) -> None:
    """Write the package's files into the folder `tmp`, the manifest last."""
    from semedge.export.onnx import describe_io, export_device_half

    if onnx_path is None:
        export_report = export_device_half(split, tmp / ONNX_FILE, opset=opset, optimize=optimize, progress=say)
    else:
        say(f"copying {onnx_path}")
        shutil.copyfile(onnx_path, tmp / ONNX_FILE)
    say("writing front end and JSC decoder")
    frontend = {**_write_frontend(split, tmp), **extra.pop("frontend", {})}  # e.g. compute: graph (compress/targets.py)
    jsc_cfg = _write_jsc(split, tmp, jsc_ckpt)
    say("hashing files")
    files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    content = sha256_bytes("".join(f"{k}:{v}\n" for k, v in sorted(files.items())))
    ins, outs = describe_io(tmp / ONNX_FILE)
    onnx_sec = {"file": ONNX_FILE, "opset": _opset_of(tmp / ONNX_FILE), "inputs": ins, "outputs": outs,
                "precision": export_report.precision if export_report is not None and onnx_path is None else graph_precision(tmp / ONNX_FILE)}
    if export_report is not None:
        onnx_sec["optimized"] = bool(export_report.optimized)
        onnx_sec["fused"] = dict(export_report.fused)
        if export_report.choice:
            onnx_sec["optimize_choice"] = dict(export_report.choice)
        onnx_sec["export_seconds"] = round(float(export_report.export_seconds), 3)
        if export_report.parity is not None:
            from dataclasses import asdict

            onnx_sec["parity"] = asdict(export_report.parity)
    onnx_sec.update(extra.pop("onnx", {}))
    loaded = split.loaded
    manifest = {
        "format": FORMAT,
        "package_id": f"{name}-{content[:8]}",
        "semedge_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"source": loaded.source, "weight_hash": loaded.weight_hash, "kind": loaded.kind, "d_model": int(loaded.d_model)},
        "device_encoder": None if getattr(split, "device_model", None) is None else {
            "source": split.device_model.source, "weight_hash": split.device_model.weight_hash,
            "d_model": int(split.device_model.d_model)},
        "jsc": {"k": int(jsc_cfg["k"]), "identity": bool(jsc_cfg["identity"]), "hidden": int(jsc_cfg["hidden"]),
                "power": str(jsc_cfg.get("power", "token")),
                "sha256": files[JSC_WEIGHTS], "checkpoint": str(jsc_ckpt) if jsc_ckpt is not None else None,
                **_rate_fields(jsc_ckpt, int(jsc_cfg["k"]))},
        "plan": _plan_dict(plan),
        "profile": _name_of(profile),
        "onnx": onnx_sec,
        "frontend": frontend,
        "files": files,
        "measured": dict(measured or {}),
        **extra,
    }
    _write_json(tmp / MANIFEST, manifest)


def _rate_fields(jsc_ckpt, k: int) -> dict:
    """A nested codec's (trained with --rate-min) `ladder` (rate_min, 2 rate_min, ..., k: the
    per-frame k_t a layout message may use) and its `rate_policy`; {} for other codecs."""
    if jsc_ckpt is None:
        return {}
    from semedge.semcom.checkpoint import read_manifest
    from semedge.semcom.importance import ladder

    man = read_manifest(Path(jsc_ckpt))
    lo = (man.get("rate_training") or {}).get("rate_min")
    out = {"ladder": list(ladder(k, int(lo)))} if lo and int(lo) < k else {}
    if out and man.get("rate_policy"):
        out["rate_policy"] = man["rate_policy"]
    return out


def _opset_of(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return int(next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0))


def package_bytes(out_dir: str | Path) -> int:
    """Total size of the package's files."""
    return sum(p.stat().st_size for p in Path(out_dir).rglob("*") if p.is_file())
