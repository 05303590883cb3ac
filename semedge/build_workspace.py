"""What the stages of `semedge build` share: the model, codec, data and realised splits, loaded lazily."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from semedge.core.errors import UserError
from semedge.core.files import sha256_file, write_atomic
from semedge.stamps import Stamps, _json_bytes, content_hash

# Pruning calibration: the planner's (4 train utterances), so a plan realised here matches its ONNX.
CALIB = ("train", 4)


def load_source(model: str):
    """A LoadedModel: `tiny:whisper[:seed]` (random tiny model, tests) or any load_model source."""
    from semedge.semcom.models import load_source as load

    return load(model)


def select_profiles(profiles_dir, devices):
    """The profiles to build for (all in the folder, or `devices`) and the sha256 of each profile file."""
    from semedge.runtime.profiles import load_profiles

    d = Path(profiles_dir)
    if not d.is_dir():
        raise UserError(f"profiles folder {d} does not exist", "pass --profiles device_profiles/ (one YAML file per device)")
    profs = load_profiles(d)
    if not profs:
        raise UserError(f"profiles folder {d} holds no *.yaml profiles", "pass --profiles device_profiles/")
    if devices:
        unknown = [x for x in devices if x not in profs]
        if unknown:
            raise UserError(f"device(s) {unknown} have no profile in {d}", f"use some of: {', '.join(sorted(profs))}")
        profs = {k: profs[k] for k in devices}
    files = {name: sha256_file(d / f"{name}.yaml") for name in profs if (d / f"{name}.yaml").is_file()}
    return profs, files


class Workspace:
    """The model, codec, data and realised splits, loaded lazily and shared by the stages."""

    def __init__(self, model: str, jsc, settings: dict, out: Path, progress: bool):
        self.model, self.jsc, self.settings, self.out, self.progress = model, jsc, settings, out, progress
        self._loaded = self._split = self._ckpt = None
        self._utts = self._calib = None
        self._realised: dict[str, object] = {}

    @property
    def loaded(self):
        if self._loaded is None:
            self._loaded = load_source(self.model)
            if not self._loaded.task.supports("link-eval"):
                raise UserError(f"{self.model} is a {self._loaded.kind} model; `semedge build` evaluates speech models",
                                "use a Whisper model (whisper-base, whisper-tiny.en)")
        return self._loaded

    @property
    def split(self):
        if self._split is None:
            from semedge.semcom.checkpoint import load_for_inference
            from semedge.semcom.split import build_split

            receiver, ck = load_for_inference(self.loaded, self.jsc)
            self._ckpt = ck
            from semedge.semcom.checkpoint import device_encoder

            self._split = build_split(receiver, None if ck is None else ck.codec, encoder=device_encoder(ck))
        return self._split

    @property
    def codec_id(self) -> str:
        """What identifies the codec: its checkpoint's codec hash, or the identity codec's stats."""
        sp = self.split
        if self._ckpt is not None:
            return "ckpt:" + str(self._ckpt.manifest.get("files", {}).get("codec.safetensors", self._ckpt.path))
        import torch

        h = hashlib.sha256()
        for k, v in sorted(sp.codec.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().to(torch.float32).contiguous().numpy().tobytes())
        return "identity:" + h.hexdigest()[:16]

    def test_utts(self):
        """The utterances accuracy is measured on: the user's --data folder, else the built-in test split."""
        if self._utts is None:
            from semedge.runtime.evaluate import eval_utterances

            self._utts = eval_utterances("test", self.settings["n_eval"], self.settings.get("voices", "mix"),
                                         self.settings.get("data"))
        return self._utts

    def segment_s(self) -> float | None:
        """User data: recordings longer than this are sent in segments (core.segment); None for built-in splits."""
        if not self.settings.get("data"):
            return None
        from semedge.core.segment import default_segment_s

        return default_segment_s(self.split.codec.cfg.identity)

    def calib(self):
        """Calibration log-mel features [N, 80, 3000] (the planner's: CALIB)."""
        if self._calib is None:
            from semedge.runtime.evaluate import speech_features
            from semedge.semcom.tasks.speech import load_split

            self._calib = speech_features(self.loaded, load_split(CALIB[0], CALIB[1], progress=False))
        return self._calib

    def realise(self, plan_dict: dict):
        """The split after the plan's torch and server steps (cached per plan)."""
        from semedge.compress.plan import TORCH_OPS, Plan, apply_server_steps, apply_torch_steps

        plan = Plan.make(plan_dict.get("steps", []), plan_dict.get("name", ""))
        key = plan.hash()
        if key not in self._realised:
            import torch

            tplan = Plan.make(plan.ops(TORCH_OPS))
            sp = apply_torch_steps(self.split, tplan, torch.from_numpy(self.calib()), progress=self.progress,
                                   workdir=self.out / "cache" / "distill" / key[:16]) if tplan.steps else self.split
            self._realised[key] = apply_server_steps(sp, plan)
        return self._realised[key], plan

    def onnx_for(self, cid: str, cand: dict) -> Path:
        """The device graph of a candidate: the planner's cached file when it names one (and matches its
        sums), else built here."""
        from semedge.core.files import check_cache

        given = cand.get("onnx")
        if given:
            p = Path(given)
            p = p if p.is_absolute() else self.out / p
            if check_cache(p, "ONNX candidate"):
                return p
        from semedge.compress.plan import Plan
        from semedge.compress.realise import RealiseFiles, realise

        pd = cand.get("plan") or {}
        plan = Plan.make(pd.get("steps", []), pd.get("name", ""))
        key = content_hash({"plan": plan.hash(), "weights": self.loaded.weight_hash, "codec": self.codec_id})[:16]
        final = self.out / "cache" / "onnx" / f"{key}.onnx"
        files = RealiseFiles(final, final.with_name(f"{key}.fp32.onnx"), meta=False)
        # optimize="auto": export_device_half keeps the faster graph of those that pass parity
        return realise(plan, lambda: self.realise(pd)[0], files, calib=self.calib, optimize="auto").path


def stamped_weights(st: Stamps, model: str, ws: Workspace) -> str:
    """The model's weight hash without loading the model when a stamp already knows it (resume)."""
    if ws._loaded is not None:
        return ws._loaded.weight_hash
    p = st.dir / "weights.json"
    if p.is_file():
        try:
            rec = json.loads(p.read_text())
            if rec.get("model") == model and _source_unchanged(model, rec):
                return rec["weight_hash"]
        except (OSError, json.JSONDecodeError, KeyError):
            pass
    h = ws.loaded.weight_hash
    write_atomic(p, _json_bytes({"model": model, "weight_hash": h, "mtime": _source_mtime(model)}))
    return h


def _source_mtime(model: str):
    p = Path(model).expanduser()
    return max((f.stat().st_mtime for f in p.rglob("*") if f.is_file()), default=None) if p.is_dir() else None


def _source_unchanged(model: str, rec: dict) -> bool:
    """Built-ins and tiny models are fixed; a local checkpoint folder must keep its files' mtimes."""
    return rec.get("mtime") == _source_mtime(model)
