"""Test helper: a small package folder from a split model (torch.onnx.export + manifest).

Stands in for export.package.build_package in the runtime tests; it writes the
same layout (docs/export.md): device.onnx, frontend.json, tokenizer.json (text),
server/jsc.safetensors + server/jsc.json, manifest.json with every file's sha256.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def make_package(split, out_dir, name: str = "tiny") -> Path:
    """export.package.build_package when it is there (out_dir's name names the package); else the stand-in."""
    try:
        from semedge.export.package import build_package
    except ImportError:
        return _stand_in(split, out_dir, name)
    return Path(build_package(split, out_dir))


def _stand_in(split, out_dir, name: str) -> Path:
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    (out / "server").mkdir(parents=True, exist_ok=True)
    loaded = split.loaded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if split.kind == "speech":
            args = (torch.zeros(1, 80, 3000),)
            names, axes = ["input_features"], {"input_features": {0: "batch"}, "symbols": {0: "batch"}}
            frontend = {"type": "whisper-log-mel", "sample_rate": 16000, "n_mels": 80, "frames": 3000}
        else:
            ids = torch.ones(1, 8, dtype=torch.long)
            args = (ids, torch.ones_like(ids))
            names = ["input_ids", "attention_mask"]
            axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
                    "symbols": {0: "batch", 1: "tokens"}}
            loaded.tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
            frontend = {"type": "tokenizer", "tokenizer": "tokenizer.json"}
        torch.onnx.export(split.device, args, str(out / "device.onnx"), input_names=names, output_names=["symbols"],
                          dynamic_axes=axes, opset_version=17, dynamo=False)
    (out / "frontend.json").write_text(json.dumps(frontend))
    cfg = split.codec.cfg
    save_file({k: v.contiguous() for k, v in split.codec.decoder.state_dict().items()}, str(out / "server" / "jsc.safetensors"))
    (out / "server" / "jsc.json").write_text(cfg.to_json())
    files = {p.relative_to(out).as_posix(): _sha(p) for p in sorted(out.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    manifest = {
        "format": "semedge-package/1",
        "package_id": f"{name}-{files['device.onnx'][:8]}",
        "semedge_version": "0.1.0",
        "created": "2025-01-01T00:00:00Z",
        "model": {"source": loaded.source, "weight_hash": loaded.weight_hash, "kind": loaded.kind, "d_model": loaded.d_model},
        "jsc": {"k": cfg.k, "identity": cfg.identity, "hidden": cfg.hidden, "sha256": files["server/jsc.safetensors"]},
        "plan": [], "profile": None,
        "onnx": {"file": "device.onnx", "opset": 17, "inputs": [{"name": n} for n in names],
                 "outputs": [{"name": "symbols"}], "precision": "fp32"},
        "frontend": frontend, "files": files, "measured": {},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out
