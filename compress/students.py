"""Students: shipped codecs whose device half runs a smaller model's encoder (docs/planner.md).

A student is a JSC codec folder whose manifest names a `device_encoder` (trained with
`semedge train --encoder`, e.g. semcom/assets/whisper-base-tinyen-jsc: whisper-tiny.en's
encoder feeding whisper-base's decoder). The plan step

    {"op": "student", "config": {"codec": "whisper-base-tinyen-jsc", "sha256": "<codec.safetensors>"}}

swaps the device encoder and the codec (and the server's LoRA adapters) for the student's; later
steps (quantize_onnx) act on the student's graph. `codec` is a folder under semcom/assets/ or a path;
`sha256` is the codec weights' hash from its manifest, so a plan's hash follows the weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from semedge.compress.plan import ConfigBase, Plan
from semedge.core.errors import UserError

CODEC_FILE = "codec.safetensors"
FIX = "give a codec folder trained with `semedge train --encoder` (e.g. semcom/assets/whisper-base-tinyen-jsc)"


@dataclass(frozen=True)
class StudentConfig(ConfigBase):
    codec: str = ""  # a shipped codec's folder name (semcom/assets/) or a folder path
    sha256: str = ""  # the codec weights' sha256, from the codec's manifest
    encoder: str = ""  # the device encoder's source (for describe; checked against the manifest)

    def __post_init__(self):
        if not isinstance(self.codec, str) or not self.codec:
            raise UserError("student codec is empty", f"set codec to a student codec folder; {FIX}")
        if not isinstance(self.sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise UserError(f"student sha256={self.sha256!r} is not a sha256",
                            f"copy files.{CODEC_FILE} from the codec's manifest.json")

    def describe(self) -> str:
        return f"student({self.encoder or Path(self.codec).name})"


def assets_dir() -> Path:
    from semedge.semcom.checkpoint import ASSETS

    return ASSETS


def resolve(codec: str) -> Path:
    """The folder a student's `codec` names: a path, else a folder under semcom/assets/."""
    p = Path(codec).expanduser()
    if p.is_dir():
        return p.absolute()
    shipped = assets_dir() / codec
    if shipped.is_dir():
        return shipped
    raise UserError(f"student codec {codec!r} does not exist", FIX)


def read_student(path, where: str = "--student") -> dict:
    """The manifest of the student codec at `path`; UserError naming `where` when it is missing or not a student."""
    from semedge.semcom.checkpoint import read_manifest

    try:
        man = read_manifest(Path(path))
    except UserError as e:
        raise UserError(f"{where} {path}: {e.problem}", FIX) from None
    if not man.get("device_encoder"):
        raise UserError(f"{where} {path}: its manifest names no device_encoder, so it is not a student codec "
                        "(its device runs the server model's own encoder)", FIX)
    if CODEC_FILE not in man.get("files", {}):
        raise UserError(f"{where} {path}: its manifest lists no {CODEC_FILE}", "restore the folder or retrain")
    return man


def trained_for(man: dict, loaded) -> bool:
    return man.get("model", {}).get("weight_hash") == loaded.weight_hash


def shipped_students(loaded) -> list[Path]:
    """The shipped codec folders that are students of `loaded` (matched by weight hash)."""
    out = []
    for p in sorted(assets_dir().iterdir()):
        try:
            man = read_student(p)
        except UserError:
            continue
        if trained_for(man, loaded):
            out.append(p)
    return out


def check_students(paths, loaded) -> list[Path]:
    """Each of the user's --student folders read and matched against `loaded`; UserError naming the first bad one."""
    out = []
    for p in paths:
        man = read_student(p)
        if not trained_for(man, loaded):
            m = man.get("model", {})
            raise UserError(f"--student {p} was trained for {m.get('source')} (weights {str(m.get('weight_hash'))[:12]}), "
                            f"not {loaded.source} (weights {loaded.weight_hash[:12]})",
                            f"give a student of {loaded.source}, or plan --model {m.get('source')}")
        out.append(Path(p).expanduser().resolve())
    return out


def student_step(path: Path) -> dict:
    """The plan step for the student codec at `path` (a shipped one by its folder name)."""
    man = read_student(path)
    path = Path(path).expanduser().absolute()
    name = path.name if path.parent == assets_dir() else str(path)
    return {"op": "student", "config": {"codec": name, "sha256": man["files"][CODEC_FILE],
                                        "encoder": man["device_encoder"].get("source", "")}}


def student_plans(students: list[Path], precisions: dict[str, dict | None]) -> list[Plan]:
    """Per student: one plan per precision, named `<codec folder>.<precision>`."""
    out = []
    for path in students:
        step = student_step(path)
        for qname, q in precisions.items():
            steps = [step] + ([{"op": "quantize_onnx", "config": q}] if q else [])
            out.append(Plan.make(steps, f"{Path(path).name}.{qname}"))
    return out


def plan_codec(plan: Plan) -> dict | None:
    """What plans.json records of a plan's own codec: folder, k, device encoder (None: the run's codec)."""
    steps = plan.ops(("student",))
    if not steps:
        return None
    cfg = steps[0].config
    path = resolve(cfg.codec)
    man = read_student(path, "student codec")
    return {"checkpoint": str(path), "k": int(man["jsc"]["k"]), "sha256": cfg.sha256,
            "device_encoder": man["device_encoder"].get("source")}


# ---------------------------------------------------------------- applying


def _base(split):
    """The server model without any codec's LoRA adapters (the run's --jsc may have added some)."""
    loaded = split.loaded
    if not any("lora_" in n for n, _ in loaded.model.named_parameters()):
        return loaded
    from semedge.semcom.models import load_source

    base = load_source(loaded.source)
    if base.weight_hash != loaded.weight_hash:
        raise UserError(f"{loaded.source} reloads with other weights than the planner's", "plan a model folder that does not change")
    return base


def _device_model(man: dict, path: Path):
    """The LoadedModel whose encoder the student's device runs, its weights checked against the manifest."""
    from semedge.semcom.models import load_source

    de = man["device_encoder"]
    enc = load_source(de["source"])
    if enc.weight_hash != de.get("weight_hash"):
        raise UserError(f"student codec {path} was trained on {de['source']} with weights {str(de.get('weight_hash'))[:12]}, "
                        f"but {de['source']} now has {enc.weight_hash[:12]}", "retrain the student for this encoder")
    return enc


def apply(split, cfg: StudentConfig):
    """The split with the student's device encoder, codec and server adapters; `jsc_path` names its codec folder."""
    from semedge.semcom.checkpoint import apply_checkpoint, load_checkpoint
    from semedge.semcom.split import build_split

    path = resolve(cfg.codec)
    man = read_student(path, "student codec")
    if man["files"][CODEC_FILE] != cfg.sha256:
        raise UserError(f"student codec {path} holds other weights than the plan names (sha256 {cfg.sha256[:12]})",
                        "re-run the planner with this codec, or restore the codec the plan was made with")
    base = _base(split)
    ck = load_checkpoint(path, base)  # checks the files' hashes and the server model's weights
    new = build_split(apply_checkpoint(base, ck), ck.codec, encoder=_device_model(man, path))
    new.jsc_path = path
    return new
