"""A package on the device: a folder with `manifest.json` and the files it lists.

`Package.load(path)` checks the manifest's format and the sha256 of every file,
and refuses a package with a changed, missing or unlisted file. With `trust` (a
signing.pub path or key, or a list of them) it first checks that manifest.json is
signed by one of those keys (runtime/trust.py). numpy-free and torch-free: this runs
on the device.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from semedge.core.errors import UserError
from semedge.core.files import sha256_file
from semedge.core.layout import FORMAT, MANIFEST, SIGNATURE

KINDS = ("speech", "text", "image")  # the tasks a package may carry (semcom/tasks/registry.py)
_REEXPORT = "re-export the package (semedge export ...) and copy the whole folder"


def _safe_relpath(rel: str, root: Path) -> Path:
    """A listed file's path, refusing absolute paths and '..' (they would leave the package)."""
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or ".." in p.parts or "\\" in rel:
        raise UserError(f"package {root}: manifest lists an unsafe file path {rel!r}", _REEXPORT)
    return root.joinpath(*p.parts)


def _listed_on_disk(root: Path) -> set[str]:
    out = set()
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            rel = Path(dirpath, name).relative_to(root).as_posix()
            if rel not in (MANIFEST, SIGNATURE):
                out.add(rel)
    return out


@dataclass
class Package:
    path: Path
    manifest: dict = field(repr=False)

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path, verify: bool = True, trust=None) -> "Package":
        """Read `path/manifest.json`; with verify, check every file's sha256 (refuses on mismatch).
        trust: refuse (trust.UntrustedPackage) unless the manifest is signed by one of these keys."""
        root = Path(path).expanduser()
        if not root.is_dir():
            raise UserError(f"package {root} is not a folder", "give the package folder (the one holding manifest.json)")
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise UserError(f"package {root} has no {MANIFEST}", _REEXPORT)
        raw = mpath.read_bytes()  # read once: the bytes checked are the bytes parsed
        if trust is not None:
            from semedge.runtime.trust import check_signature

            check_signature(root, trust, manifest_bytes=raw)
        try:
            manifest = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"package {root}: {MANIFEST} is not valid JSON ({e})", _REEXPORT) from None
        cls._check_manifest(root, manifest)
        pkg = cls(root, manifest)
        if verify:
            pkg.verify()
        return pkg

    @staticmethod
    def _check_manifest(root: Path, m) -> None:
        if not isinstance(m, dict):
            raise UserError(f"package {root}: {MANIFEST} is not a JSON object", _REEXPORT)
        fmt = m.get("format")
        if fmt != FORMAT:
            raise UserError(f"package {root}: {MANIFEST} has format {fmt!r}, this runtime reads {FORMAT!r}", _REEXPORT)
        need = {"package_id": str, "model": dict, "jsc": dict, "onnx": dict, "files": dict}
        for key, typ in need.items():
            if not isinstance(m.get(key), typ):
                raise UserError(f"package {root}: {MANIFEST} field {key!r} is missing or not a {typ.__name__}", _REEXPORT)
        for key in ("kind", "d_model", "source"):
            if key not in m["model"]:
                raise UserError(f"package {root}: {MANIFEST} field 'model.{key}' is missing", _REEXPORT)
        if m["model"]["kind"] not in KINDS:
            raise UserError(f"package {root}: model.kind {m['model']['kind']!r} is not one of {', '.join(KINDS)}", _REEXPORT)
        if not isinstance(m["jsc"].get("k"), int) or m["jsc"]["k"] < 1:
            raise UserError(f"package {root}: {MANIFEST} field 'jsc.k' is missing or not a positive int", _REEXPORT)
        if m["jsc"].get("power", "token") not in ("token", "message"):
            raise UserError(f"package {root}: {MANIFEST} field 'jsc.power' is {m['jsc'].get('power')!r}, "
                            "not token or message", _REEXPORT)
        lad = m["jsc"].get("ladder")
        if lad is not None and not (isinstance(lad, list) and len(lad) >= 2 and all(isinstance(v, int) for v in lad)
                                    and lad == sorted(set(lad)) and lad[0] >= 1 and lad[-1] == m["jsc"]["k"]):
            raise UserError(f"package {root}: {MANIFEST} field 'jsc.ladder' {lad!r} is not increasing symbol "
                            f"counts ending at k={m['jsc']['k']}", _REEXPORT)
        if not isinstance(m["onnx"].get("file"), str):
            raise UserError(f"package {root}: {MANIFEST} field 'onnx.file' is missing", _REEXPORT)
        pid = m["package_id"]
        if not pid or any(c in pid for c in "/\\?&#% ") or len(pid) > 128:
            raise UserError(f"package {root}: package_id {pid!r} is not a plain name", _REEXPORT)
        for rel, digest in m["files"].items():
            if not isinstance(digest, str) or len(digest) != 64:
                raise UserError(f"package {root}: {MANIFEST} has no valid sha256 for {rel!r}", _REEXPORT)
        if m["onnx"]["file"] not in m["files"]:
            raise UserError(f"package {root}: {m['onnx']['file']} is not listed in {MANIFEST} 'files'", _REEXPORT)

    def verify(self) -> None:
        """Refuse (UserError naming the file) a changed, missing or unlisted file."""
        listed = self.manifest["files"]
        for rel, digest in sorted(listed.items()):
            p = _safe_relpath(rel, self.path)
            if not p.is_file():
                raise UserError(f"package {self.path}: file {rel} is missing", _REEXPORT)
            if sha256_file(p) != digest.lower():
                raise UserError(f"package {self.path}: file {rel} does not match its sha256 in {MANIFEST} (changed or corrupt)", _REEXPORT)
        extra = sorted(_listed_on_disk(self.path) - set(listed))
        if extra:
            raise UserError(f"package {self.path}: file {extra[0]} is not listed in {MANIFEST}"
                            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""), _REEXPORT)

    # ------------------------------------------------------------------ fields

    @property
    def package_id(self) -> str:
        return self.manifest["package_id"]

    @property
    def kind(self) -> str:
        return self.manifest["model"]["kind"]

    @property
    def model_source(self) -> str:
        return self.manifest["model"]["source"]

    @property
    def d_model(self) -> int:
        return int(self.manifest["model"]["d_model"])

    @property
    def k(self) -> int:
        return int(self.manifest["jsc"]["k"])

    @property
    def power(self) -> str:
        """The codec's power normalisation, "token" or "message" (older packages: token)."""
        return str(self.manifest["jsc"].get("power", "token"))

    @property
    def ladder(self) -> tuple[int, ...] | None:
        """A nested codec's per-frame symbol counts (rate_min, 2 rate_min, ..., k); None: not nested."""
        lad = self.manifest["jsc"].get("ladder")
        return tuple(lad) if lad else None

    @property
    def identity(self) -> bool:
        return bool(self.manifest["jsc"].get("identity", False))

    @property
    def onnx_path(self) -> Path:
        return _safe_relpath(self.manifest["onnx"]["file"], self.path)

    @property
    def frontend(self) -> dict:
        return self.manifest.get("frontend") or {}

    def file(self, rel: str) -> Path:
        """Path of a listed file (UserError when the manifest does not list it)."""
        if rel not in self.manifest["files"]:
            raise UserError(f"package {self.path} has no {rel}", _REEXPORT)
        return _safe_relpath(rel, self.path)

    def has(self, rel: str) -> bool:
        return rel in self.manifest["files"]
