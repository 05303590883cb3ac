"""Stage stamps for `semedge build`: content hashes of a stage's inputs and outputs, so an
up-to-date stage is skipped (out/.stamps/<stage>.json)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import time
from pathlib import Path

from semedge.core.files import json_default, sha256_file, write_atomic

STAMPS = ".stamps"


def _canon(obj) -> str:
    def default(o):
        if isinstance(o, float) and not math.isfinite(o):
            return str(o)
        if isinstance(o, Path):
            return str(o)
        if hasattr(o, "item"):
            return o.item()
        raise TypeError(f"not hashable as JSON: {type(o).__name__}")

    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=default)


def content_hash(obj) -> str:
    return hashlib.sha256(_canon(obj).encode()).hexdigest()


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, default=json_default) + "\n").encode()


class Stamps:
    """out/.stamps/<stage>.json: {"inputs": hash, "outputs": {relpath: sha256}, "result": ...}."""

    def __init__(self, out: Path, log):
        self.out = out
        self.dir = out / STAMPS
        self.log = log
        self.stages: dict[str, dict] = {}

    def _path(self, stage: str) -> Path:
        return self.dir / f"{stage}.json"

    def fresh(self, stage: str, inputs_hash: str) -> dict | None:
        """The recorded result when the stamp matches and every output is unchanged; else None."""
        p = self._path(stage)
        if not p.is_file():
            return None
        try:
            st = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if st.get("inputs") != inputs_hash:
            return None
        for rel, digest in (st.get("outputs") or {}).items():
            f = self.out / rel
            if not f.is_file() or sha256_file(f) != digest:
                return None
        return st

    def run(self, stage: str, inputs: dict, fn, outputs=lambda result: []):
        """Skip `stage` when fresh, else run `fn()` and stamp its result and output files."""
        h = content_hash(inputs)
        st = self.fresh(stage, h)
        if st is not None:
            self.stages[stage] = {"skipped": True, "seconds": 0.0, "ran_seconds": st.get("seconds")}
            self.log(f"{stage}: up to date, skipped")
            return st["result"]
        t0 = time.perf_counter()
        result = fn()
        secs = time.perf_counter() - t0
        outs = {}
        for f in outputs(result):
            f = Path(f)
            outs[f.relative_to(self.out).as_posix()] = sha256_file(f)
        stamp = {"stage": stage, "inputs": h, "outputs": outs, "result": result, "seconds": round(secs, 2),
                 "finished": now()}
        write_atomic(self._path(stage), _json_bytes(stamp))
        self.stages[stage] = {"skipped": False, "seconds": round(secs, 2)}
        self.log(f"{stage}: done in {secs:.1f} s")
        return result


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def group(st: Stamps, name: str, devices: list[str]) -> None:
    """Summarise per-device stamps as one stage entry (skipped when every device's was)."""
    parts = [st.stages.pop(f"{name}-{d}") for d in devices if f"{name}-{d}" in st.stages]
    st.stages[name] = {"skipped": all(p["skipped"] for p in parts) if parts else True,
                       "seconds": round(sum(p["seconds"] for p in parts), 2), "devices": len(parts)}
