"""`semedge build`: plan → compress → export → package → profile → evaluate → report.

    from semedge.pipeline import build
    result = build("whisper-base", "device_profiles", "build")   # also written to build/build.json

Stages (docs/build.md). Each one records a stamp `out/.stamps/<stage>.json` with the
content hash of its inputs, the sha256 of its outputs and its result; a later run
whose inputs hash the same, and whose outputs are still there unchanged, skips the
stage and reuses the recorded result.

1. plan       compress.planner.plan_devices → out/plans.json (or a given plans file)
2. package    per device: apply the chosen plan (torch steps, export, ONNX steps; one
              ONNX per plan, cached under out/cache/onnx/) → out/packages/<device>/ + .zip
3. profile    per device: host p50/p95 + peak RSS (measured), latency/memory on the device (cost model)
4. evaluate   per device: package ONNX via DeviceRunner → numpy link → server half, at the
              device's SNRs and an SNR sweep; the conventional baseline per channel
5. latency    device (measured / predicted), link airtime (predicted), server decode (measured)
6. report     semedge.report.write_report → out/report/
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import time
from contextlib import contextmanager
from pathlib import Path

from semedge.semcom.files import sha256_file, write_atomic
from semedge.semcom.errors import UserError

FORMAT = "semedge-build/1"
STAMPS = ".stamps"
# Evaluation settings: full (the demo) and --quick.
FULL = {"n_eval": 16, "sweep": [-5.0, 0.0, 5.0, 10.0, 15.0, 20.0], "runs": 10, "max_new_tokens": 96,
        "server_timing_msgs": 3}
QUICK = {"n_eval": 4, "sweep": [-5.0, 5.0, 20.0], "runs": 3, "max_new_tokens": 96, "server_timing_msgs": 1}
# Pruning calibration: the planner's (4 train utterances), so a plan realised here matches its ONNX.
CALIB = ("train", 4)
BITS_PER_USE = 2.0  # link assumption: 2 bits per complex channel use (QPSK-like spectral efficiency)
LINK_ASSUMPTION = (f"symbol rate = uplink Mb/s / {BITS_PER_USE:g} bits per complex channel use "
                   "(the analog JSC symbols are sent at the rate a QPSK-like link would carry; predicted)")


# ---------------------------------------------------------------- hashing and stamps


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
    def default(o):
        if hasattr(o, "item"):
            return o.item()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    return (json.dumps(obj, indent=1, default=default) + "\n").encode()


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
                 "finished": _now()}
        write_atomic(self._path(stage), _json_bytes(stamp))
        self.stages[stage] = {"skipped": False, "seconds": round(secs, 2)}
        self.log(f"{stage}: done in {secs:.1f} s")
        return result


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- loading


def load_source(model: str):
    """A LoadedModel: `tiny:whisper[:seed]` (random tiny model, tests) or any load_model source."""
    if isinstance(model, str) and model.startswith("tiny:"):
        from semedge.semcom.models import tiny_model

        parts = model.split(":")
        seed = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 0
        return tiny_model(parts[1] if len(parts) > 1 else "whisper", seed=seed)
    from semedge.semcom.models import load_model

    return load_model(model)


def _profiles(profiles_dir, devices):
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


# ---------------------------------------------------------------- progress


class _UI:
    """Rich progress bar + log lines (log also appended to out/build.log)."""

    def __init__(self, out: Path, progress: bool):
        self.out = out
        self.progress = None
        self.console = None
        if progress:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.console = Console(stderr=True)
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=self.console, transient=False)
        self.task = None

    def __enter__(self):
        if self.progress:
            self.progress.start()
            self.task = self.progress.add_task("build", total=6)
        return self

    def __exit__(self, *exc):
        if self.progress:
            self.progress.stop()

    def log(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        with open(self.out / "build.log", "a", encoding="utf-8") as f:
            f.write(line + "\n")
        if self.console:
            self.console.log(msg)

    def stage(self, name: str) -> None:
        if self.progress:
            self.progress.update(self.task, description=f"build: {name}")

    def advance(self) -> None:
        if self.progress:
            self.progress.advance(self.task)

    @contextmanager
    def sub(self, desc: str, total: int):
        if not self.progress:
            yield lambda: None
            return
        t = self.progress.add_task(f"  {desc}", total=total)
        try:
            yield lambda: self.progress.advance(t)
        finally:
            self.progress.remove_task(t)


# ---------------------------------------------------------------- stage 1: plan


def _read_plans(path: Path) -> dict:
    try:
        plans = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"plans file {path} is not readable JSON ({e})", "re-run the planner (semedge plan) or drop --plans")
    if not isinstance(plans, dict) or plans.get("format") != "semedge-plans/1":
        raise UserError(f"{path} is not a plans file (format {plans.get('format') if isinstance(plans, dict) else None!r})",
                        "give the plans.json `semedge plan` writes (format semedge-plans/1)")
    for key in ("candidates", "devices"):
        if not isinstance(plans.get(key), dict):
            raise UserError(f"{path} has no {key!r} object", "give the plans.json `semedge plan` writes")
    return plans


def _run_planner(ws, profiles: dict, out: Path, quick: bool, progress: bool) -> int:
    """Run the planner into out/plans.json (its cache under out/planner/); 3 when some device has no plan that fits."""
    try:
        from semedge.compress.planner import NoPlanFits, plan_devices
    except ModuleNotFoundError as e:
        if e.name != "semedge.compress.planner":
            raise
        raise UserError("the planner (semedge.compress.planner) is not in this installation",
                        "pass a plans file with --plans plans.json") from None
    try:
        plan_devices(ws.loaded, list(profiles.values()), quick=quick, out=out / "plans.json", workdir=out / "planner",
                     progress=progress, jsc=ws.jsc)
    except NoPlanFits:  # plans.json is written: build what fits, mark the rest
        return 3
    return 0


# ---------------------------------------------------------------- stage 2: realise + package


class _Workspace:
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
            if self._loaded.kind != "speech":
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
        if self._utts is None:
            from semedge.semcom.tasks.speech import load_split

            self._utts = load_split("test", self.settings["n_eval"], progress=False)
        return self._utts

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
        """The device graph of a candidate: the planner's cached file when it names one, else built here."""
        given = cand.get("onnx")
        if given:
            p = Path(given)
            p = p if p.is_absolute() else self.out / p
            if p.is_file():
                return p
        from semedge.compress.plan import apply_onnx_steps
        from semedge.export.onnx import ExportParityError, export_device_half

        sp, plan = self.realise(cand.get("plan") or {})
        key = content_hash({"plan": plan.hash(), "weights": self.loaded.weight_hash, "codec": self.codec_id})[:16]
        final = self.out / "cache" / "onnx" / f"{key}.onnx"
        if final.is_file():
            return final
        raw = final.with_name(f"{key}.fp32.onnx")
        if not raw.is_file():
            try:
                export_device_half(sp, raw)
            except ExportParityError:  # the fused graph disagrees: ship the plain export
                export_device_half(sp, raw, optimize=False)
        apply_onnx_steps(raw, final, plan, calib=self.calib())
        return final


def _package_one(ws: _Workspace, device: str, profile, cid: str, cand: dict) -> dict:
    from semedge.export.package import build_package, package_bytes

    onnx = ws.onnx_for(cid, cand)
    sp, plan = ws.realise(cand.get("plan") or {})
    dst = ws.out / "packages" / device
    build_package(sp, dst, onnx_path=onnx, plan=plan, profile=profile.name,
                  jsc_ckpt=None if ws._ckpt is None else ws._ckpt.path,
                  measured={"candidate": cid, "planner": {k: cand.get(k) for k in ("bytes", "host") if k in cand}})
    man = json.loads((dst / "manifest.json").read_text())
    return {"path": str(dst.relative_to(ws.out)), "zip": str(dst.with_suffix(".zip").relative_to(ws.out)),
            "package_id": man["package_id"], "bytes": package_bytes(dst),
            "zip_bytes": dst.with_suffix(".zip").stat().st_size, "onnx_bytes": (dst / "device.onnx").stat().st_size,
            "onnx_sha256": man["files"]["device.onnx"], "jsc_sha256": man["jsc"]["sha256"],
            "precision": man["onnx"].get("precision"), "plan_hash": plan.hash()}


# ---------------------------------------------------------------- stage 3: profile


def _profile_one(ws: _Workspace, profile, pkg: dict, runs: int) -> dict:
    from semedge.runtime import costmodel
    from semedge.runtime.profiler import peak_rss, time_onnx

    onnx = ws.out / pkg["path"] / "device.onnx"
    t = time_onnx(onnx, threads=1, runs=runs, warmup=1)
    rss = peak_rss(onnx, threads=1)
    pred = costmodel.predict(onnx, profile)
    cal = profile.efficiency.calibrated_on if profile.efficiency else None
    return {"host": {"latency_ms_p50": t["p50_ms"], "latency_ms_p95": t["p95_ms"], "cpu_p50_ms": t.get("cpu_p50_ms"),
                     "runs": t["runs"], "threads": 1, "peak_rss_mb": max(rss["peak_mb"].values())},
            "predicted": {"latency_ms": pred["predicted_ms"], "memory_mb": pred["predicted_peak_mb"],
                          "gflops": pred["gflops"], "calibrated_on": cal,
                          "efficiency": "calibrated" if cal else "cost-model defaults (uncalibrated)"}}


# ---------------------------------------------------------------- stage 4: evaluate


def _evaluate_one(ws: _Workspace, pkg: dict, cand: dict, channel: str, snrs: list[float], memo: dict) -> dict:
    """Accuracy at `snrs` through `channel`; `memo` shares device outputs and per-SNR results between
    devices whose packages hold the same graph (same ONNX, codec and plan)."""
    import numpy as np
    import torch

    from semedge.runtime.evaluate import link_accuracy
    from semedge.runtime.runner import DeviceRunner

    sp, _ = ws.realise(cand.get("plan") or {})
    utts = ws.test_utts()
    gkey = (pkg["onnx_sha256"], pkg["jsc_sha256"], pkg["plan_hash"])
    if gkey not in memo:
        runner = DeviceRunner(ws.out / pkg["path"], threads=1)
        msgs, enc_ms = [], []
        for u in utts:
            t0 = time.perf_counter()
            msgs.append(runner.encode_audio(u.audio))
            enc_ms.append((time.perf_counter() - t0) * 1e3)
        dec = []  # server decode time per message (one message at a time, as a device would see it)
        with torch.no_grad():
            for m in msgs[: ws.settings["server_timing_msgs"]]:
                t0 = time.perf_counter()
                sp.server.transcribe([torch.from_numpy(m)], max_new_tokens=ws.settings["max_new_tokens"])
                dec.append((time.perf_counter() - t0) * 1e3)
        memo[gkey] = {"msgs": msgs, "enc_ms": float(np.median(enc_ms)), "dec_ms": float(np.median(dec)), "acc": {}}
    g = memo[gkey]
    refs = [u.text for u in utts]
    acc = {}
    for snr in snrs:
        k = (channel, _snr_key(snr))
        if k not in g["acc"]:
            r = link_accuracy(sp.server, g["msgs"], refs, channel, snr, similarity=True,
                              max_new_tokens=ws.settings["max_new_tokens"])
            g["acc"][k] = {m: r.get(m) for m in ACC_KEYS}
        acc[_snr_key(snr)] = g["acc"][k]
    frames = [m.shape[0] for m in g["msgs"]]
    return {"accuracy": acc, "device_encode_ms_host": round(g["enc_ms"], 2), "server_ms_host": round(g["dec_ms"], 2),
            "mean_frames": float(np.mean(frames)), "k": int(g["msgs"][0].shape[-1]), "n": len(g["msgs"])}


# what a build keeps of each accuracy figure: the point values, their 95% intervals, the normaliser
CURVE_KEYS = ("wer", "bleu", "similarity", "wer_ci95", "bleu_ci95", "similarity_ci95")
ACC_KEYS = (*CURVE_KEYS, "n", "normalizer")


def _snr_key(s) -> str:
    f = float(s)
    return "inf" if math.isinf(f) else f"{f:g}"


def _baseline(ws, channels: list[str], snrs: list[float], log) -> dict:
    """The conventional link (semcom.baseline: Codec 2 + LDPC + QAM, then the unmodified model) per channel."""
    try:
        from semedge.semcom.baseline import BaselineConfig, ConventionalLink
    except ModuleNotFoundError as e:
        return {"curves": {}, "note": f"semedge.semcom.baseline is not available ({e.name})"}
    from semedge.semcom.metrics import score

    utts = ws.test_utts()
    refs = [u.text for u in utts]
    cfg = BaselineConfig()
    try:
        link = ConventionalLink(ws.loaded, cfg)
        curves = {}
        for ch in channels:
            rows = {m: [] for m in CURVE_KEYS}
            uses = []
            for snr in snrs:
                hyps, u, _ = link.run(utts, ch, snr)
                sc = score(refs, hyps)
                for m in rows:
                    rows[m].append(sc[m] if m.endswith("_ci95") else round(float(sc[m]), 5))
                uses += u
            curves[ch] = {"snrs": list(snrs), "n": len(utts), **rows, "normalizer": sc["normalizer"],
                          "channel_uses_mean": float(sum(uses) / len(uses))}
    except UserError as e:  # e.g. c2enc missing: the build goes on without the baseline
        log(f"baseline: {e}")
        return {"curves": {}, "note": str(e)}
    return {"name": cfg.name, "config": {"mode": cfg.mode, "rate": cfg.rate, "bits_per_symbol": cfg.bits_per_symbol},
            "curves": curves}


# ---------------------------------------------------------------- build


def build(model: str, profiles_dir, out, devices=None, quick: bool = False, progress: bool = True, *,
          plans=None, jsc: str | None = None, n_eval: int | None = None, sweep=None, runs: int | None = None,
          plan_quick: bool | None = None) -> dict:
    """Run every stage into `out`; returns (and writes to out/build.json) the build record.

    plans: a plans.json to use instead of running the planner. plan_quick: the planner's
    quick candidate space and sample sizes (default: `quick`). The record's `exit_code`
    is 3 when some device has no plan that fits (its package is not built), else 0.
    """
    t_start = time.perf_counter()
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder", "choose another --out folder")
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(QUICK if quick else FULL)
    if n_eval is not None:
        if n_eval < 1:
            raise UserError(f"n_eval={n_eval} must be >= 1", "evaluate on at least one test utterance")
        settings["n_eval"] = int(n_eval)
    if sweep is not None:
        settings["sweep"] = sorted(float(s) for s in sweep)
    if runs is not None:
        settings["runs"] = max(1, int(runs))
    profs, prof_files = _profiles(profiles_dir, devices)
    plans_in = Path(plans) if plans is not None else None
    if plans_in is not None and not plans_in.is_file():
        raise UserError(f"plans file {plans_in} does not exist", "give the plans.json `semedge plan` wrote, or drop --plans")
    ws = _Workspace(model, jsc, settings, out, progress)

    with _UI(out, progress) as ui:
        ui.log(f"build {model} → {out} ({'quick' if quick else 'full'}; devices: {', '.join(profs)})")
        st = Stamps(out, ui.log)

        # 1. plan
        ui.stage("plan")

        def do_plan():
            if plans_in is not None:
                _read_plans(plans_in)
                write_atomic(out / "plans.json", plans_in.read_bytes())
                return {"exit": 0, "source": str(plans_in)}
            return {"exit": _run_planner(ws, profs, out, quick if plan_quick is None else plan_quick, progress),
                    "source": "planner"}

        from semedge.runtime.evaluate import METRICS_VERSION

        # what the results depend on beyond the arguments: the codec's weights (a retrained
        # default codec ships under the same --jsc) and how accuracy is measured
        plan_inputs = {"model": model, "profiles": prof_files, "devices": sorted(profs), "quick": quick,
                       "plan_quick": plan_quick, "codec": ws.codec_id, "metrics": METRICS_VERSION,
                       "plans_in": sha256_file(plans_in) if plans_in else None}
        plan_res = st.run("plan", plan_inputs, do_plan, lambda r: [out / "plans.json"])
        plans_doc = _read_plans(out / "plans.json")
        ui.advance()
        cands = plans_doc["candidates"]
        pdev = plans_doc["devices"]
        missing = [d for d in profs if d not in pdev]
        if missing:
            raise UserError(f"plans.json has no entry for device(s) {missing}",
                            "re-run the planner for these devices (drop --plans, or plan them)")
        for d, entry in pdev.items():
            if d in profs and entry.get("fits") and entry.get("chosen") not in cands:
                raise UserError(f"plans.json: device {d} chose {entry.get('chosen')!r}, which is not a candidate",
                                "re-run the planner")
        fitting = [d for d in profs if pdev[d].get("fits") and pdev[d].get("chosen")]
        unfit = [d for d in profs if d not in fitting]

        # 2. package (per device)
        ui.stage("package")
        pkgs: dict[str, dict] = {}
        with ui.sub("package", len(fitting)) as step:
            for d in fitting:
                cid = pdev[d]["chosen"]
                inputs = {"model": model, "plan": cands[cid].get("plan"), "cid": cid, "profile": prof_files.get(d),
                          "jsc": jsc, "codec": ws.codec_id, "calib": CALIB, "onnx": cands[cid].get("onnx")}
                inputs["weights"] = _stamped_weights(st, model, ws)
                given = Path(cands[cid].get("onnx") or "")
                inputs["onnx_sha256"] = sha256_file(given) if given.is_file() else None
                pkgs[d] = st.run(f"package-{d}", inputs, lambda d=d, cid=cid: _package_one(ws, d, profs[d], cid, cands[cid]),
                                 lambda r: [out / r["path"] / "manifest.json", out / r["zip"]])
                step()
        _group(st, "package", fitting)
        ui.advance()

        # 3. profile (per device; the host measurement once per ONNX file)
        ui.stage("profile")
        prof_res: dict[str, dict] = {}
        host_memo: dict[str, dict] = {}
        with ui.sub("profile", len(fitting)) as step:
            for d in fitting:
                pkg = pkgs[d]
                inputs = {"onnx": pkg["onnx_sha256"], "profile": prof_files.get(d), "runs": settings["runs"]}

                def do_prof(d=d, pkg=pkg):
                    if pkg["onnx_sha256"] in host_memo:  # same graph: reuse the host measurement
                        from semedge.runtime import costmodel

                        p = costmodel.predict(out / pkg["path"] / "device.onnx", profs[d])
                        cal = profs[d].efficiency.calibrated_on
                        return {"host": host_memo[pkg["onnx_sha256"]],
                                "predicted": {"latency_ms": p["predicted_ms"], "memory_mb": p["predicted_peak_mb"],
                                              "gflops": p["gflops"], "calibrated_on": cal,
                                              "efficiency": "calibrated" if cal else "cost-model defaults (uncalibrated)"}}
                    return _profile_one(ws, profs[d], pkg, settings["runs"])

                prof_res[d] = st.run(f"profile-{d}", inputs, do_prof)
                host_memo.setdefault(pkg["onnx_sha256"], prof_res[d]["host"])
                step()
        _group(st, "profile", fitting)
        ui.advance()

        # 4. evaluate (per device; devices whose packages hold the same graph share its outputs and scores)
        ui.stage("evaluate")
        eval_res: dict[str, dict] = {}
        eval_memo: dict = {}
        with ui.sub("evaluate", len(fitting)) as step:
            for d in fitting:
                pkg, cid = pkgs[d], pdev[d]["chosen"]
                channel = pdev[d].get("channel") or profs[d].link.channel
                dev_snrs = [float(s) for s in (pdev[d].get("eval_snrs") or list(profs[d].link.snr_db))]
                snrs = sorted(set(settings["sweep"]) | set(dev_snrs))
                inputs = {"onnx": pkg["onnx_sha256"], "jsc": pkg["jsc_sha256"], "plan": pkg["plan_hash"],
                          "channel": channel, "snrs": snrs, "n_eval": settings["n_eval"], "weights": _stamped_weights(st, model, ws),
                          "max_new_tokens": settings["max_new_tokens"], "metrics": METRICS_VERSION}

                def do_eval(pkg=pkg, cid=cid, channel=channel, snrs=snrs):
                    return _evaluate_one(ws, pkg, cands[cid], channel, snrs, eval_memo)

                r = st.run(f"evaluate-{d}", inputs, do_eval)
                eval_res[d] = dict(r, channel=channel, snrs=snrs, eval_snrs=dev_snrs)
                step()
            channels = sorted({eval_res[d]["channel"] for d in fitting})
            baseline = {"curves": {}}
            for ch in channels:  # one stamp per channel
                base_inputs = {"channel": ch, "snrs": settings["sweep"], "n": settings["n_eval"],
                               "weights": _stamped_weights(st, model, ws), "baseline": _baseline_version(),
                               "metrics": METRICS_VERSION}
                b = st.run(f"baseline-{ch}", base_inputs, lambda ch=ch: _baseline(ws, [ch], settings["sweep"], ui.log))
                baseline["curves"].update(b.get("curves") or {})
                baseline.update({k: v for k, v in b.items() if k != "curves"})
            _group(st, "baseline", channels)
        _group(st, "evaluate", fitting)
        ui.advance()

        # 5. latency breakdown
        ui.stage("latency")
        devices_out = {}
        for d, prof in profs.items():
            entry = pdev[d]
            cid = entry.get("chosen") if d in fitting else None
            shown = cid or entry.get("closest")
            cand = cands.get(shown) or {}
            rec = {"device_class": prof.device_class, "profile": prof.name,
                   "budgets": entry.get("budgets") or {"memory_mb": prof.memory_budget_mb, "latency_ms": prof.latency_budget_ms},
                   "snr_db": entry.get("snr_db") or list(prof.link.snr_db), "channel": entry.get("channel") or prof.link.channel,
                   "eval_snrs": entry.get("eval_snrs") or list(prof.link.snr_db), "uplink_mbps": prof.link.uplink_mbps,
                   "fits": d in fitting, "chosen": cid, "closest": entry.get("closest"),
                   "failing_budget": entry.get("failing_budget"), "describe": cand.get("describe"),
                   "rejected": entry.get("rejected") or {}, "pareto": entry.get("pareto") or []}
            if d in fitting:
                ev = eval_res[d]
                rec["package"] = pkgs[d]
                rec.update(prof_res[d])
                rec["accuracy"] = {s: ev["accuracy"][_snr_key(s)] for s in map(_snr_key, ev["eval_snrs"])}
                rec["curve"] = {"channel": ev["channel"], "snrs": settings["sweep"], "n": ev["n"],
                                **{m: [ev["accuracy"][_snr_key(s)].get(m) for s in settings["sweep"]]
                                   for m in CURVE_KEYS}}
                uses = math.ceil(ev["mean_frames"] * ev["k"] / 2)
                rate = prof.link.uplink_mbps * 1e6 / BITS_PER_USE
                rec["latency"] = {"device_ms_host": prof_res[d]["host"]["latency_ms_p50"],
                                  "device_ms_predicted": prof_res[d]["predicted"]["latency_ms"],
                                  "link_ms_predicted": round(uses / rate * 1e3, 3), "channel_uses": uses,
                                  "symbol_rate_per_s": rate, "mean_frames": ev["mean_frames"], "k": ev["k"],
                                  "server_ms_host": ev["server_ms_host"]}
                rec["realised"] = {"bytes": pkgs[d]["onnx_bytes"], "host_latency_ms_p50": rec["latency"]["device_ms_host"],
                                   "peak_rss_mb": prof_res[d]["host"]["peak_rss_mb"],
                                   "predicted_latency_ms": rec["latency"]["device_ms_predicted"],
                                   "wer": {s: a["wer"] for s, a in rec["accuracy"].items()}, "package": pkgs[d]["path"]}
            else:
                pred = (cand.get("predicted") or {}).get(d) or {}
                rec["predicted"] = {"latency_ms": pred.get("latency_ms"), "memory_mb": pred.get("memory_mb")}
                rec["accuracy"] = {k: v for k, v in (cand.get("accuracy") or {}).items()
                                   if k in {_snr_key(s) for s in rec["eval_snrs"]}}
                rec["package"] = None
                rec["note"] = (f"no plan fits ({entry.get('failing_budget') or 'budget'}); "
                               f"closest plan {cand.get('describe') or shown or '–'} shown from the planner's figures, not packaged")
            devices_out[d] = rec
        ui.advance()

        from semedge import __version__
        from semedge.runtime.profiler import _cores, _cpu_name
        from semedge.semcom.metrics import normalizer_name

        record = {
            "format": FORMAT, "semedge_version": __version__, "model": model,
            "weight_hash": _stamped_weights(st, model, ws),
            "created": _now(), "quick": quick, "out": str(out), "normalizer": normalizer_name(),
            "interval": "bootstrap 95% over test utterances (semcom.stats)",
            "host": {"cpu": _cpu_name(), "cores": _cores()},
            "settings": {**settings, "threads": 1, "link_assumption": LINK_ASSUMPTION,
                         "host_note": "host timings on a shared machine (other work running); ORT on 1 thread"},
            "plans": plans_doc, "plans_source": plan_res.get("source"), "devices": devices_out, "baseline": baseline,
            "unfit": unfit, "exit_code": 3 if unfit else 0,
        }

        # 6. report
        ui.stage("report")
        from semedge.report import write_report

        report_inputs = {k: v for k, v in record.items() if k not in ("created",)}
        rep = st.run("report", report_inputs, lambda: {"index": str(write_report(record, out).relative_to(out))},
                     lambda r: [out / "report" / "index.html"])
        ui.advance()
        record["report"] = rep["index"]
        record["stages"] = st.stages
        record["timing"] = {"seconds": round(time.perf_counter() - t_start, 1)}
        write_atomic(out / "build.json", _json_bytes(record))
        ui.log(f"build.json written; report: {out / rep['index']}")
    return record


def _baseline_version() -> str | None:
    """Hash of semcom/baseline.py: a changed baseline re-runs the baseline stage."""
    p = Path(__file__).resolve().parent.parent / "semcom" / "baseline.py"
    return sha256_file(p) if p.is_file() else None


def _stamped_weights(st: Stamps, model: str, ws: _Workspace) -> str:
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


def _group(st: Stamps, name: str, devices: list[str]) -> None:
    """Summarise per-device stamps as one stage entry (skipped when every device's was)."""
    parts = [st.stages.pop(f"{name}-{d}") for d in devices if f"{name}-{d}" in st.stages]
    st.stages[name] = {"skipped": all(p["skipped"] for p in parts) if parts else True,
                       "seconds": round(sum(p["seconds"] for p in parts), 2), "devices": len(parts)}
