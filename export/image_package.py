"""Image packages: the image codec's device half as a package `semedge serve` hosts.

Same layout and manifest as export/package.py (core.layout), with model.kind "image":

    device.onnx                          ImageDeviceHalf: image [batch, 3, H, W] -> symbols [batch, H*W/16, k]
    server/jsc.safetensors, jsc.json     the JSC decoder (k -> d per token)
    server/image_decoder.safetensors     the CNN decoder (semcom.image_server.IMAGE_DECODER)
    manifest.json                        + "image": {"config", "stride", "decoder"}

The CNN decoder ships in the package (it is small: 0.3 MB for the shipped codec), so the
server needs nothing else; it loads one decoder per sha256 (model.weight_hash), shared by
every package built on it. The ONNX graph is parity-checked against PyTorch on
ONNX Runtime before anything is written.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import time
from pathlib import Path
from typing import Callable

from semedge.core.files import atomic_dir_and_file, sha256_bytes, sha256_file
from semedge.core.layout import FORMAT, JSC_CONFIG, JSC_WEIGHTS, MANIFEST, ONNX_FILE
from semedge.core.version import __version__
from semedge.export.package import _opset_of, _private_key, check_out_dir, _write_json, _zip_dir
from semedge.runtime.trust import write_signature


def parity_inputs(codec) -> list[dict]:
    """Validation patches (32 x 32) and one larger non-square image: the graph's dynamic axes both ways."""
    import numpy as np

    from semedge.semcom.tasks.image import IMAGE

    wide = np.random.default_rng(0).random((1, 3, 48, 64), dtype=np.float32)
    return [IMAGE.calibration_inputs(codec, 2), {"image": wide}]


def _write_server(codec, root: Path) -> None:
    """server/jsc.safetensors + jsc.json (the JSC decoder) and the CNN decoder's weights."""
    from safetensors.torch import save_file

    from semedge.semcom.image_server import IMAGE_DECODER

    (root / "server").mkdir()
    half = codec.server_half

    def state(module):
        return {k: v.detach().float().contiguous().cpu() for k, v in module.state_dict().items()}

    save_file(state(half.jsc), str(root / JSC_WEIGHTS))
    _write_json(root / JSC_CONFIG, {"format": "semedge-jsc-decoder/1", "config": dataclasses.asdict(codec.cfg.jsc())})
    save_file(state(half.decoder), str(root / IMAGE_DECODER))


def _export(codec, root: Path, opset: int) -> dict:
    """device.onnx, parity-checked (raises ExportParityError past fp32 tolerance); the manifest's onnx section."""
    from semedge.export.onnx import check_parity, describe_io
    from semedge.semcom.tasks.image import IMAGE

    t0 = time.perf_counter()
    path = IMAGE.export_onnx(codec, root / ONNX_FILE, opset=opset)
    seconds = time.perf_counter() - t0
    parity = check_parity(path, codec.device_half, parity_inputs(codec))
    ins, outs = describe_io(path)
    return {"file": ONNX_FILE, "opset": _opset_of(path), "inputs": ins, "outputs": outs, "precision": "fp32",
            "optimized": False, "export_seconds": round(seconds, 3), "parity": dataclasses.asdict(parity)}


def _copy_graph(onnx_path, root: Path) -> dict:
    """A given (e.g. quantized) device graph copied in; the manifest's onnx section (its precision read from the graph)."""
    import shutil

    from semedge.export.onnx import describe_io
    from semedge.export.package import graph_precision

    path = root / ONNX_FILE
    shutil.copyfile(onnx_path, path)
    ins, outs = describe_io(path)
    return {"file": ONNX_FILE, "opset": _opset_of(path), "inputs": ins, "outputs": outs,
            "precision": graph_precision(path), "optimized": False}


def _manifest(codec, name: str, files: dict, onnx_sec: dict, source: str, codec_dir) -> dict:
    from semedge.semcom.image_codec import STRIDE
    from semedge.semcom.image_server import IMAGE_DECODER
    from semedge.semcom.tasks.image import IMAGE

    cfg = codec.cfg
    content = sha256_bytes("".join(f"{k}:{v}\n" for k, v in sorted(files.items())))
    return {
        "format": FORMAT,
        "package_id": f"{name}-{content[:8]}",
        "semedge_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"source": source, "weight_hash": files[IMAGE_DECODER], "kind": IMAGE.name, "d_model": int(cfg.d)},
        "device_encoder": None,
        "jsc": {"k": int(cfg.k), "identity": False, "hidden": int(cfg.hidden), "power": cfg.jsc().power,
                "sha256": files[JSC_WEIGHTS], "checkpoint": str(codec_dir) if codec_dir is not None else None},
        "plan": None,
        "profile": None,
        "onnx": onnx_sec,
        "frontend": IMAGE.write_frontend(codec, None),
        "image": {"config": dataclasses.asdict(cfg), "stride": STRIDE, "decoder": IMAGE_DECODER,
                  "uses_per_pixel": cfg.uses_per_pixel()},
        "files": files,
        "measured": {},
    }


def build_image_package(out_dir: str | Path, codec_dir: str | Path | None = None, *, codec=None, opset: int = 17,
                        sign_key=None, progress: Callable[[str], None] | None = None, onnx_path=None,
                        plan: dict | None = None, profile: str | None = None, measured: dict | None = None) -> Path:
    """Write the package folder `out_dir` and `<out_dir>.zip` atomically for the image codec in
    `codec_dir` (`semedge train-image --out`; None: the shipped one), or an ImageCodec `codec`.
    onnx_path: a device graph already built from that codec (a plan of `semedge build --task image`)
    to ship instead of exporting; plan, profile and measured go into the manifest."""
    from semedge.semcom.image_codec import load_codec
    from semedge.semcom.tasks.image import DEFAULT_CODEC

    say = progress or (lambda msg: None)
    out_dir = check_out_dir(out_dir, "dist/image")
    private = _private_key(sign_key)  # a bad key fails before any work
    if codec is None:
        codec_dir = Path(codec_dir) if codec_dir is not None else DEFAULT_CODEC
        codec = load_codec(codec_dir)[0]
    source = f"image-codec:{codec_dir.name if codec_dir is not None else 'in-memory'}"
    with atomic_dir_and_file(out_dir, out_dir.with_name(out_dir.name + ".zip")) as (tmp, zip_tmp):
        if onnx_path is None:
            say("exporting the image device half to ONNX (parity-checked)")
            onnx_sec = _export(codec.eval(), tmp, opset)
        else:
            onnx_sec = _copy_graph(onnx_path, tmp)
        _write_server(codec, tmp)
        files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        man = _manifest(codec, out_dir.name, files, onnx_sec, source, codec_dir)
        man.update(plan=plan, profile=profile, measured=dict(measured or {}))
        _write_json(tmp / MANIFEST, man)
        if private is not None:
            write_signature(tmp, private)
        _zip_dir(tmp, zip_tmp, out_dir.name)
    return out_dir
