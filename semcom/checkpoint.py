"""JSC codec checkpoints: a folder of safetensors files plus a JSON manifest.

    CKPT/manifest.json          format, model (source, weight_hash, d_model, kind), jsc config,
                                channels, SNR range, data, seed, git commit, LoRA spec, metrics,
                                rate policy, sha256 of every file
    CKPT/codec.safetensors      JSC encoder + decoder state
    CKPT/adapters.safetensors   LoRA weights (peft naming), when trained with LoRA
    CKPT/trainer.safetensors    optimizer state (resume only; not shipped)

Nothing here unpickles. Every file is written to a temporary name, then renamed;
the manifest goes last, so a folder with a manifest is complete.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from semedge.core.errors import UserError
from semedge.core.files import atomic_dir, atomic_path, write_atomic
from semedge.core.files import sha256_file as _sha256
from semedge.semcom.jsc import JSCCodec, JSCConfig

FORMAT = "semedge-jsc/1"
MANIFEST = "manifest.json"
CODEC_FILE = "codec.safetensors"
ADAPTER_FILE = "adapters.safetensors"
TRAINER_FILE = "trainer.safetensors"
ASSETS = Path(__file__).resolve().parent / "assets"
# Shipped default codecs, by built-in model name (folder under semcom/assets/).
DEFAULTS = {"whisper-base": "whisper-base-jsc"}


@dataclass
class Checkpoint:
    path: Path
    manifest: dict
    codec: JSCCodec
    adapters: dict | None = None  # LoRA state (peft names), or None

    @property
    def k(self) -> int:
        return self.codec.cfg.k

    @property
    def lora(self):
        from semedge.semcom.training.config import LoRASpec

        lo = self.manifest.get("lora")
        return LoRASpec.from_dict(lo) if lo else None

    @property
    def rate_policy(self):
        from semedge.semcom.rate import RatePolicy

        rp = self.manifest.get("rate_policy")
        return RatePolicy.from_dict(rp) if rp else None


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _save_tensors(tensors: dict, path: Path, dtype: torch.dtype | None = None) -> None:
    from safetensors.torch import save_file

    def conv(t):
        t = t.detach().cpu().contiguous()
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    with atomic_path(path) as tmp:
        save_file({k: conv(v) for k, v in tensors.items()}, str(tmp))


def _write_folder(path: Path, codec: JSCCodec, adapters: dict | None, tdtype, manifest: dict,
                  trainer_state: dict | None = None) -> Path:
    """Codec, adapters (and trainer state), then the manifest with every file's sha256, in a temp
    folder that replaces `path` whole (atomic_dir): killed at any point, `path` holds the previous
    complete checkpoint or nothing. Other files in `path` (a trainer state when none is given) are kept."""
    with atomic_dir(path) as tmp:
        _save_tensors(codec.state_dict(), tmp / CODEC_FILE, tdtype)
        files = [CODEC_FILE]
        if adapters:
            _save_tensors(adapters, tmp / ADAPTER_FILE, tdtype)
            files.append(ADAPTER_FILE)
        if trainer_state:
            _save_tensors(trainer_state, tmp / TRAINER_FILE)
        _carry_over(path, tmp)
        manifest = {**manifest, "jsc": dataclasses.asdict(codec.cfg), "files": {f: _sha256(tmp / f) for f in files}}
        body = json.dumps(manifest, indent=1, sort_keys=True, default=_json_default)
        write_atomic(tmp / MANIFEST, body + "\n")
    return path


def _carry_over(old: Path, new: Path) -> None:
    """Copy into `new` what `old` holds that `new` does not write (a checkpoint's own files excepted)."""
    for p in sorted(old.iterdir()) if old.is_dir() else ():
        if p.name in (CODEC_FILE, ADAPTER_FILE, MANIFEST) or (new / p.name).exists():
            continue
        shutil.copytree(p, new / p.name) if p.is_dir() else shutil.copy2(p, new / p.name)


def save_checkpoint(path, loaded, codec: JSCCodec, *, adapters: dict | None = None, trainer_state: dict | None = None,
                    info: dict | None = None, dtype: str = "float32") -> Path:
    """Write a checkpoint folder for `codec` (+ LoRA `adapters`) trained on `loaded`. Returns the folder."""
    if dtype not in ("float32", "float16"):
        raise UserError(f"checkpoint dtype {dtype!r} is unsupported", "use float32 or float16")
    manifest = {
        "format": FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"source": loaded.source, "weight_hash": loaded.weight_hash, "d_model": loaded.d_model,
                  "kind": loaded.kind},
        "dtype": dtype,
        "git_commit": git_commit(),
        **(info or {}),
    }
    return _write_folder(Path(path), codec, adapters, torch.float16 if dtype == "float16" else None, manifest, trainer_state)


def rewrite_checkpoint(ckpt: Checkpoint, out, codec: JSCCodec | None = None, **fields) -> Path:
    """Write `ckpt` to folder `out` (may be its own folder), with `codec` in place of its own and the
    manifest's top-level `fields` set; adapters are copied."""
    tdtype = torch.float16 if ckpt.manifest.get("dtype") == "float16" else None
    return _write_folder(Path(out), codec or ckpt.codec, ckpt.adapters, tdtype, {**ckpt.manifest, **fields})


def _json_default(o):
    if isinstance(o, (set, tuple)):
        return list(o)
    if hasattr(o, "item"):
        return o.item()
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_manifest(path) -> dict:
    path = Path(path)
    if path.is_file() and path.name == MANIFEST:
        path = path.parent
    m = path / MANIFEST
    if not path.exists():
        raise UserError(f"checkpoint {str(path)!r} does not exist", "give the folder `semedge train --out` wrote")
    if not m.exists():
        raise UserError(f"{str(path)!r} has no {MANIFEST}: not a checkpoint, or an interrupted write",
                        "give the folder `semedge train --out` wrote (retrain if it was interrupted)")
    try:
        man = json.loads(m.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{m} is not valid JSON: {e}", "restore the checkpoint or retrain") from e
    if man.get("format") != FORMAT:
        raise UserError(f"{str(path)!r} has format {man.get('format')!r}, expected {FORMAT!r}",
                        "retrain with this version of semedge")
    return man


def load_checkpoint(path, loaded=None, k: int | None = None, verify: bool = True) -> Checkpoint:
    """Read a checkpoint; with `loaded`, refuse one trained on other weights; with `k`, refuse another k."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file() and path.name == MANIFEST:
        path = path.parent
    man = read_manifest(path)
    if verify:
        for f, digest in man.get("files", {}).items():
            if not (path / f).exists():
                raise UserError(f"checkpoint file {f} is missing from {str(path)!r}", "restore the folder or retrain")
            if _sha256(path / f) != digest:
                raise UserError(f"checkpoint file {path / f} does not match its manifest hash (damaged or edited)",
                                "restore the folder or retrain")
    if loaded is not None:
        check_compatible(man, loaded, path)
    cfg = JSCConfig.from_dict(man["jsc"])
    if k is not None and cfg.k != k:
        raise UserError(f"checkpoint {str(path)!r} has k={cfg.k} symbols per token, but k={k} was asked for",
                        f"drop --k, pass --k {cfg.k}, or train a codec with --k {k}")
    codec = JSCCodec(cfg)
    state = {kk: v.float() for kk, v in load_file(str(path / CODEC_FILE)).items()}
    try:
        codec.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"codec weights in {str(path)!r} do not match its manifest: {str(e).splitlines()[0]}",
                        "restore the folder or retrain") from e
    codec.eval()
    adapters = None
    if ADAPTER_FILE in man.get("files", {}):
        adapters = {kk: v.float() for kk, v in load_file(str(path / ADAPTER_FILE)).items()}
    return Checkpoint(path, man, codec, adapters)


def check_compatible(man: dict, loaded, path) -> None:
    mm = man.get("model", {})
    if mm.get("d_model") != loaded.d_model:
        raise UserError(f"checkpoint {str(path)!r} was trained for d_model={mm.get('d_model')} ({mm.get('source')}), "
                        f"but {loaded.source} has d_model={loaded.d_model}",
                        f"use --model {mm.get('source')}, or train a codec for {loaded.source}")
    if mm.get("weight_hash") != loaded.weight_hash:
        raise UserError(f"checkpoint {str(path)!r} was trained on {mm.get('source')} (weights {str(mm.get('weight_hash'))[:12]}), "
                        f"not on {loaded.source} (weights {loaded.weight_hash[:12]})",
                        f"use --model {mm.get('source')}, or train a codec for {loaded.source} with semedge train")


def apply_checkpoint(loaded, ckpt: Checkpoint):
    """The LoadedModel the checkpoint's receiver runs: `loaded` itself, or a copy with its LoRA adapters
    (on an nf4 base when it was trained with --qlora)."""
    if not ckpt.adapters:
        return loaded
    return with_adapters(loaded, ckpt.lora, bool(ckpt.manifest.get("qlora")), ckpt.adapters)


def with_adapters(loaded, lora, qlora: bool, state: dict):
    """A copy of `loaded` whose model carries LoRA adapters `lora` with weights `state` (nf4 base if `qlora`)."""
    from semedge.semcom.training.adapters import load_adapter_state, prepare_model

    model = prepare_model(loaded, lora, qlora)
    load_adapter_state(model, state)
    model.eval()
    return dataclasses.replace(loaded, model=model)


def default_codec_path(loaded) -> Path | None:
    """The shipped codec folder for this model, or None."""
    for name, folder in DEFAULTS.items():
        p = ASSETS / folder
        if (p / MANIFEST).exists():
            try:
                man = json.loads((p / MANIFEST).read_text())
            except json.JSONDecodeError:
                continue
            if man.get("model", {}).get("weight_hash") == loaded.weight_hash:
                return p
    return None


def load_default_codec(loaded) -> Checkpoint | None:
    """The shipped default codec for `loaded` (matched by weight hash), or None if it has none."""
    p = default_codec_path(loaded)
    return None if p is None else load_checkpoint(p, loaded)


def device_encoder(ckpt: Checkpoint | None):
    """The LoadedModel whose encoder the checkpoint's device runs, when it is not the server model's; else None."""
    de = (ckpt.manifest.get("device_encoder") if ckpt is not None else None) or None
    if not de:
        return None
    from semedge.semcom.models import load_model

    enc = load_model(de["source"])
    if enc.weight_hash != de.get("weight_hash"):
        raise UserError(f"checkpoint {ckpt.path} was trained on the encoder of {de['source']} with weights "
                        f"{str(de.get('weight_hash'))[:12]}, but {de['source']} now has {enc.weight_hash[:12]}",
                        "retrain the codec for this encoder")
    return enc


def load_for_inference(loaded, jsc: str | None = None, k: int | None = None):
    """(receiver LoadedModel, Checkpoint | None): `jsc` a folder, 'default' / None (shipped default) or 'identity'."""
    if jsc == "identity":
        return loaded, None
    if jsc in (None, "default"):
        ck = load_default_codec(loaded)
        if ck is None:
            if jsc == "default":
                raise UserError(f"{loaded.source} has no shipped default codec", "train one: semedge train --model ... --out CKPT")
            return loaded, None
        if k is not None and ck.k != k:
            raise UserError(f"the default codec has k={ck.k}, not {k}", f"drop --k, or train a codec with --k {k}")
    else:
        ck = load_checkpoint(jsc, loaded, k=k)
    return apply_checkpoint(loaded, ck), ck
