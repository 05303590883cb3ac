"""The stages of `semedge build`, each a function of the build's data (docs/build.md):
plan → package → profile → evaluate (+ baseline) → device records → report."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from semedge.build_workspace import CALIB, Workspace, stamped_weights
from semedge.compress.targets import CPU_EPS
from semedge.core.channel_spec import snr_key
from semedge.core.errors import UserError
from semedge.core.files import sha256_file, write_atomic
from semedge.stamps import Stamps, group, now


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


def _data_id(data) -> str | None:
    """What identifies the user's data folder for the stamps: its metadata.csv's hash and the folder."""
    if not data:
        return None
    from semedge.core.files import sha256_file

    meta = Path(data) / "metadata.csv"
    return f"{Path(data).resolve()}:{sha256_file(meta) if meta.is_file() else 'missing'}"


def _run_planner(ws, profiles: dict, out: Path, quick: bool, progress: bool, ray=None) -> int:
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
                     progress=progress, jsc=ws.jsc, voices=ws.settings.get("voices", "mix"), data=ws.settings.get("data"),
                     ray=ray)
    except NoPlanFits:  # plans.json is written: build what fits, mark the rest
        return 3
    return 0


# ---------------------------------------------------------------- stage 2: realise + package


def _codec_folder(ws: Workspace, sp):
    """The codec folder a package's server half comes from: a student plan's own (compress/students.py), else the build's."""
    own = getattr(sp, "jsc_path", None)
    return own if own is not None else (None if ws._ckpt is None else ws._ckpt.path)


def _package_one(ws: Workspace, device: str, profile, cid: str, cand: dict) -> dict:
    from semedge.export.package import build_package, package_bytes

    sp, plan = ws.realise(cand.get("plan") or {})
    dst = ws.out / "packages" / device
    if profile.first_ep.name in CPU_EPS:  # the planner's fused graph, as the CPU EP runs it
        build_package(sp, dst, onnx_path=ws.onnx_for(cid, cand), plan=plan, profile=profile.name,
                      jsc_ckpt=_codec_folder(ws, sp),
                      measured={"candidate": cid, "planner": {k: cand.get(k) for k in ("bytes", "host") if k in cand}})
    else:
        _accelerator_package(ws, sp, plan, profile, dst)
    man = json.loads((dst / "manifest.json").read_text())
    return {"path": str(dst.relative_to(ws.out)), "zip": str(dst.with_suffix(".zip").relative_to(ws.out)),
            "package_id": man["package_id"], "bytes": package_bytes(dst),
            "zip_bytes": dst.with_suffix(".zip").stat().st_size, "onnx_bytes": (dst / "device.onnx").stat().st_size,
            "onnx_sha256": man["files"]["device.onnx"], "jsc_sha256": man["jsc"]["sha256"],
            "precision": man["onnx"].get("precision"), "plan_hash": plan.hash()}


def _accelerator_package(ws: Workspace, sp, plan, profile, dst: Path) -> None:
    """The plan as `semedge export --device` packages it for an accelerator EP (compress/targets.py): the
    plain graph, fixed shapes where the EP needs them, .ort for ORT Mobile, node assignment per EP."""
    from semedge.compress.targets import build_target_package, package_kind

    fmt = None if plan.ops(("quantize_onnx",)) else "fp32"  # the plan's precision is the planner's choice
    kind = package_kind(profile, fmt, plan)
    build_target_package(sp, profile, kind, dst, calib=ws.calib, calib_source="built-in train split (the planner's)",
                         plan=plan, jsc_ckpt=_codec_folder(ws, sp))


# ---------------------------------------------------------------- stage 3: profile


def _measure_host(onnx: Path, runs: int) -> dict:
    """ORT latency (1 thread) and peak RSS of `onnx` on this machine: the build's measurement."""
    from semedge.runtime.profiler import peak_rss, time_onnx

    t = time_onnx(onnx, threads=1, runs=runs, warmup=1)
    rss = peak_rss(onnx, threads=1)
    return {"latency_ms_p50": t["p50_ms"], "latency_ms_p95": t["p95_ms"], "cpu_p50_ms": t.get("cpu_p50_ms"),
            "runs": t["runs"], "threads": 1, "peak_rss_mb": max(rss["peak_mb"].values())}


def _calibration(profile) -> dict:
    cal = profile.efficiency.calibrated_on if profile.efficiency else None
    return {"calibrated_on": cal, "efficiency": "calibrated" if cal else "cost-model defaults (uncalibrated)"}


def _predicted(profile, cost) -> dict:
    """The cost model's latency and memory of a graph (its GraphCost) on the device, its first EP and that EP's share."""
    from semedge.runtime import costmodel

    part = costmodel.partition_report(cost, profile)
    return {"latency_ms": round(costmodel.predict_latency_ms(cost, profile), 3),
            "memory_mb": round(costmodel.predict_memory_mb(cost, profile), 1), "gflops": round(cost.flops / 1e9, 4),
            "ep": part["first_ep"], "unit": profile.first_ep.unit, "node_share": part["first_ep_node_share"],
            "flop_share": part["first_ep_flop_share"], "boundaries": part["boundaries"], **_calibration(profile)}


def host_profile(run: "BuildRun"):
    """(profile, sha256 of its file) the predictor is checked on: the build's `host`, else the shipped one."""
    from semedge.runtime.profiles import load_profile, profiles_dir

    if "host" in run.profs:
        return run.profs["host"], run.prof_files.get("host")
    path = profiles_dir() / "host.yaml"
    return (load_profile(path), sha256_file(path)) if path.is_file() else (None, None)


def _host_check(host_prof, cost, measured_ms: float) -> dict | None:
    """The cost model's latency on the host profile vs the host's measured p50: the predictor's error here."""
    from semedge.runtime import costmodel

    if host_prof is None or not measured_ms:
        return None
    pred = costmodel.predict_latency_ms(cost, host_prof)
    return {"profile": host_prof.name, "predicted_ms": round(pred, 3), "measured_ms": measured_ms,
            "error": round(pred / measured_ms - 1, 4), **_calibration(host_prof)}


# ---------------------------------------------------------------- stage 4: evaluate


def _evaluate_one(ws: Workspace, pkg: dict, cand: dict, channel: str, snrs: list[float], memo: dict) -> dict:
    """Accuracy at `snrs` through `channel`; `memo` shares device outputs and per-SNR results between
    devices whose packages hold the same graph (same ONNX, codec and plan)."""
    import numpy as np
    import torch

    from semedge.runtime.evaluate import link_accuracy, segmented
    from semedge.runtime.runner import DeviceRunner

    sp, _ = ws.realise(cand.get("plan") or {})
    utts = ws.test_utts()
    pieces, groups = segmented(utts, ws.segment_s()) if ws.segment_s() else (utts, None)
    gkey = (pkg["onnx_sha256"], pkg["jsc_sha256"], pkg["plan_hash"])
    if gkey not in memo:
        runner = DeviceRunner(ws.out / pkg["path"], threads=1)
        msgs, enc_ms = [], []
        for u in pieces:
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
        k = (channel, snr_key(snr))
        if k not in g["acc"]:
            r = link_accuracy(sp.server, g["msgs"], refs, channel, snr, similarity=True, groups=groups,
                              max_new_tokens=None if groups else ws.settings["max_new_tokens"])
            g["acc"][k] = {m: r.get(m) for m in ACC_KEYS}
        acc[snr_key(snr)] = g["acc"][k]
    frames = [m.shape[0] for m in g["msgs"]]
    return {"accuracy": acc, "device_encode_ms_host": round(g["enc_ms"], 2), "server_ms_host": round(g["dec_ms"], 2),
            "mean_frames": float(np.mean(frames)), "k": int(g["msgs"][0].shape[-1]), "n": len(refs),
            "messages": len(g["msgs"])}


# what a build keeps of each accuracy figure: the point values, their 95% intervals, the normaliser
CURVE_KEYS = ("wer", "bleu", "similarity", "wer_ci95", "bleu_ci95", "similarity_ci95")
ACC_KEYS = (*CURVE_KEYS, "n", "normalizer")


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


def _baseline_version() -> str | None:
    """Hash of semcom/baseline.py: a changed baseline re-runs the baseline stage."""
    p = Path(__file__).resolve().parent.parent / "semcom" / "baseline.py"
    return sha256_file(p) if p.is_file() else None


# ---------------------------------------------------------------- the build's data and its stages

FORMAT = "semedge-build/1"
BITS_PER_USE = 2.0  # link assumption: 2 bits per complex channel use (QPSK-like spectral efficiency)
LINK_ASSUMPTION = (f"symbol rate = uplink Mb/s / {BITS_PER_USE:g} bits per complex channel use "
                   "(the analog JSC symbols are sent at the rate a QPSK-like link would carry; predicted)")


@dataclass
class BuildRun:
    """What every stage reads: the arguments, the shared workspace, the stamps and the progress UI."""

    model: str
    jsc: str | None
    out: Path
    settings: dict
    profs: dict  # device -> DeviceProfile
    prof_files: dict  # device -> sha256 of its profile file
    ws: Workspace
    st: Stamps
    ui: object  # build_ui.UI
    ray: object = None  # compress.fanout.RaySpec for the planner (None: serial)

    def weights(self) -> str:
        return stamped_weights(self.st, self.model, self.ws)


def stage_plan(run: BuildRun, quick: bool, plan_quick: bool | None, plans_in: Path | None, progress: bool) -> tuple[dict, dict]:
    """plans.json from the planner (or copied from `plans_in`): (the stage's result, the plans document)."""
    from semedge.runtime.evaluate import METRICS_VERSION

    out = run.out

    def do_plan():
        if plans_in is not None:
            _read_plans(plans_in)
            write_atomic(out / "plans.json", plans_in.read_bytes())
            return {"exit": 0, "source": str(plans_in)}
        return {"exit": _run_planner(run.ws, run.profs, out, quick if plan_quick is None else plan_quick, progress,
                                        run.ray),
                "source": "planner"}

    # what the results depend on beyond the arguments: the codec's weights (a retrained
    # default codec ships under the same --jsc) and how accuracy is measured
    plan_inputs = {"model": run.model, "profiles": run.prof_files, "devices": sorted(run.profs), "quick": quick,
                   "plan_quick": plan_quick, "codec": run.ws.codec_id, "metrics": METRICS_VERSION,
                   "plans_in": sha256_file(plans_in) if plans_in else None, "students": _student_ids(run.ws),
                   "voices": run.settings.get("voices"), "data": _data_id(run.settings.get("data")),
                   "planner": "per-ep-1"}  # bump when the planner's choices change for the same inputs
    plan_res = run.st.run("plan", plan_inputs, do_plan, lambda r: [out / "plans.json"])
    plans_doc = _read_plans(out / "plans.json")
    check_plans(plans_doc, run.profs)
    run.profs.update({d: planned_profile(p, plans_doc["devices"][d]) for d, p in run.profs.items()})
    return plan_res, plans_doc


def planned_profile(profile, entry: dict):
    """The profile as the plan was made for it: from its fallback EP on where the planner fell back
    (compress/fallback.py: its first EP ran no plan that fits)."""
    from semedge.compress.fallback import from_ep

    return from_ep(profile, entry["ep"]) if entry.get("fallback") else profile


def _student_ids(ws) -> dict[str, str]:
    """The shipped students in the planner's space, by folder: their codec weights' sha256 (a retrained one re-plans)."""
    from semedge.compress.students import CODEC_FILE, read_student, shipped_students

    return {p.name: read_student(p)["files"][CODEC_FILE] for p in shipped_students(ws.loaded)}


def check_plans(plans_doc: dict, profs: dict) -> None:
    """The plans are speech plans, every device has an entry, and each chosen plan is a candidate."""
    if plans_doc.get("task", "speech") != "speech":
        raise UserError(f"plans.json is for the {plans_doc['task']} task, not speech",
                        f"build it with --task {plans_doc['task']}, or give the plans.json of `semedge plan --task speech`")
    cands, pdev = plans_doc["candidates"], plans_doc["devices"]
    missing = [d for d in profs if d not in pdev]
    if missing:
        raise UserError(f"plans.json has no entry for device(s) {missing}",
                        "re-run the planner for these devices (drop --plans, or plan them)")
    for d, entry in pdev.items():
        if d in profs and entry.get("fits") and entry.get("chosen") not in cands:
            raise UserError(f"plans.json: device {d} chose {entry.get('chosen')!r}, which is not a candidate",
                            "re-run the planner")
        if d in profs and entry.get("fits"):
            _check_runs(d, planned_profile(profs[d], entry), entry["chosen"], cands[entry["chosen"]])


def _check_runs(d: str, profile, cid: str, cand: dict) -> None:
    """The chosen plan makes a format the device's first EP runs (the planner offers only those)."""
    from semedge.compress.plan import Plan
    from semedge.compress.targets import plan_format
    from semedge.runtime.partition import formats_for

    pd = cand.get("plan") or {}
    fmt, runs = plan_format(Plan.make(pd.get("steps", []), pd.get("name", ""))), formats_for(profile)
    if fmt not in runs:
        raise UserError(f"plans.json: device {d} chose {cid!r}, a {fmt} plan, which {profile.first_ep.name} "
                        f"(its first EP) does not run ({', '.join(runs)})", "re-run `semedge plan` for this device")


def fitting_devices(plans_doc: dict, profs: dict) -> tuple[list[str], list[str]]:
    """(devices with a chosen plan, devices where no plan fits)."""
    pdev = plans_doc["devices"]
    fitting = [d for d in profs if pdev[d].get("fits") and pdev[d].get("chosen")]
    return fitting, [d for d in profs if d not in fitting]


def stage_package(run: BuildRun, plans_doc: dict, fitting: list[str]) -> dict[str, dict]:
    """Per fitting device: its chosen plan realised and packaged (out/packages/<device>/ + .zip)."""
    cands, pdev = plans_doc["candidates"], plans_doc["devices"]
    pkgs: dict[str, dict] = {}
    with run.ui.sub("package", len(fitting)) as step:
        for d in fitting:
            cid = pdev[d]["chosen"]
            inputs = {"model": run.model, "plan": cands[cid].get("plan"), "cid": cid, "profile": run.prof_files.get(d),
                      "jsc": run.jsc, "codec": run.ws.codec_id, "calib": CALIB, "onnx": cands[cid].get("onnx")}
            inputs["weights"] = run.weights()
            inputs["packager"] = "cpu" if run.profs[d].first_ep.name in CPU_EPS else "target-1"
            given = Path(cands[cid].get("onnx") or "")
            inputs["onnx_sha256"] = sha256_file(given) if given.is_file() else None
            pkgs[d] = run.st.run(f"package-{d}", inputs, lambda d=d, cid=cid: _package_one(run.ws, d, run.profs[d], cid, cands[cid]),
                                 lambda r: [run.out / r["path"] / "manifest.json", run.out / r["zip"]])
            step()
    group(run.st, "package", fitting)
    return pkgs


def stage_profile(run: BuildRun, pkgs: dict, fitting: list[str]) -> dict[str, dict]:
    """Per fitting device: host timing and peak RSS (once per ONNX file), the device prediction
    (EP, its share, calibration) and the predictor's error on the host."""
    from semedge.compress.workspace import COSTS_VERSION
    from semedge.runtime import costmodel

    prof_res: dict[str, dict] = {}
    host_memo: dict[str, dict] = {}
    host_prof, host_sha = host_profile(run)
    with run.ui.sub("profile", len(fitting)) as step:
        for d in fitting:
            pkg = pkgs[d]
            inputs = {"onnx": pkg["onnx_sha256"], "profile": run.prof_files.get(d), "runs": run.settings["runs"],
                      "host_profile": host_sha, "cost_model": COSTS_VERSION}

            def do_prof(d=d, pkg=pkg):
                onnx = run.out / pkg["path"] / "device.onnx"
                host = host_memo.get(pkg["onnx_sha256"]) or _measure_host(onnx, run.settings["runs"])
                cost = costmodel.analyze(onnx)  # as the host's CPU EP runs it
                accel = run.profs[d].first_ep.name not in CPU_EPS  # as the device's accelerator compiles it
                dev_cost = costmodel.analyze(onnx, as_written=True) if accel else cost
                return {"host": host, "predicted": _predicted(run.profs[d], dev_cost),
                        "host_check": _host_check(host_prof, cost, host["latency_ms_p50"])}

            prof_res[d] = run.st.run(f"profile-{d}", inputs, do_prof)
            host_memo.setdefault(pkg["onnx_sha256"], prof_res[d]["host"])
            step()
    group(run.st, "profile", fitting)
    return prof_res


def stage_evaluate(run: BuildRun, plans_doc: dict, pkgs: dict, fitting: list[str]) -> tuple[dict, dict]:
    """Per fitting device: accuracy through the link at its SNRs and the sweep (devices whose packages
    hold the same graph share outputs and scores); then the conventional baseline per channel."""
    from semedge.runtime.evaluate import METRICS_VERSION

    cands, pdev, settings = plans_doc["candidates"], plans_doc["devices"], run.settings
    eval_res: dict[str, dict] = {}
    eval_memo: dict = {}
    with run.ui.sub("evaluate", len(fitting)) as step:
        for d in fitting:
            pkg, cid = pkgs[d], pdev[d]["chosen"]
            channel = pdev[d].get("channel") or run.profs[d].link.channel
            dev_snrs = [float(s) for s in (pdev[d].get("eval_snrs") or list(run.profs[d].link.snr_db))]
            snrs = sorted(set(settings["sweep"]) | set(dev_snrs))
            inputs = {"onnx": pkg["onnx_sha256"], "jsc": pkg["jsc_sha256"], "plan": pkg["plan_hash"],
                      "channel": channel, "snrs": snrs, "n_eval": settings["n_eval"], "weights": run.weights(),
                      "voices": settings.get("voices"), "data": _data_id(settings.get("data")),
                      "max_new_tokens": settings["max_new_tokens"], "metrics": METRICS_VERSION}

            def do_eval(pkg=pkg, cid=cid, channel=channel, snrs=snrs):
                return _evaluate_one(run.ws, pkg, cands[cid], channel, snrs, eval_memo)

            r = run.st.run(f"evaluate-{d}", inputs, do_eval)
            eval_res[d] = dict(r, channel=channel, snrs=snrs, eval_snrs=dev_snrs)
            step()
        baseline = stage_baseline(run, sorted({eval_res[d]["channel"] for d in fitting}))
    group(run.st, "evaluate", fitting)
    return eval_res, baseline


def stage_baseline(run: BuildRun, channels: list[str]) -> dict:
    """The conventional link's curves, one stamp per channel."""
    from semedge.runtime.evaluate import METRICS_VERSION

    sweep = run.settings["sweep"]
    baseline = {"curves": {}}
    for ch in channels:
        base_inputs = {"channel": ch, "snrs": sweep, "n": run.settings["n_eval"], "weights": run.weights(),
                       "baseline": _baseline_version(), "metrics": METRICS_VERSION}
        b = run.st.run(f"baseline-{ch}", base_inputs, lambda ch=ch: _baseline(run.ws, [ch], sweep, run.ui.log))
        baseline["curves"].update(b.get("curves") or {})
        baseline.update({k: v for k, v in b.items() if k != "curves"})
    group(run.st, "baseline", channels)
    return baseline


def device_record(d: str, prof, plans_doc: dict, fitting: list[str], sweep: list, pkgs: dict, prof_res: dict,
                  eval_res: dict) -> dict:
    """The build record of one device: budgets and choice, then its measured figures (or the planner's closest plan)."""
    entry = plans_doc["devices"][d]
    cid = entry.get("chosen") if d in fitting else None
    shown = cid or entry.get("closest")
    cand = plans_doc["candidates"].get(shown) or {}
    rec = {"device_class": prof.device_class, "profile": prof.name,
           "budgets": entry.get("budgets") or {"memory_mb": prof.memory_budget_mb, "latency_ms": prof.latency_budget_ms},
           "snr_db": entry.get("snr_db") or list(prof.link.snr_db), "channel": entry.get("channel") or prof.link.channel,
           "eval_snrs": entry.get("eval_snrs") or list(prof.link.snr_db), "uplink_mbps": prof.link.uplink_mbps,
           "fits": d in fitting, "chosen": cid, "closest": entry.get("closest"),
           "failing_budget": entry.get("failing_budget"), "describe": cand.get("describe"),
           "rejected": entry.get("rejected") or {}, "pareto": entry.get("pareto") or [],
           "fallback": entry.get("fallback")}
    if d in fitting:
        rec.update(_measured(prof, sweep, pkgs[d], prof_res[d], eval_res[d]))
    else:
        pred = (cand.get("predicted") or {}).get(d) or {}
        rec["predicted"] = {"latency_ms": pred.get("latency_ms"), "memory_mb": pred.get("memory_mb"),
                            "ep": prof.first_ep.name, "unit": prof.first_ep.unit, **_calibration(prof)}
        rec["accuracy"] = {k: v for k, v in (cand.get("accuracy") or {}).items()
                           if k in {snr_key(s) for s in rec["eval_snrs"]}}
        rec["package"] = None
        rec["note"] = (f"no plan fits ({entry.get('failing_budget') or 'budget'}); "
                       f"closest plan {cand.get('describe') or shown or '–'} shown from the planner's figures, not packaged")
    return rec


def _measured(prof, sweep: list, pkg: dict, prof_res: dict, ev: dict) -> dict:
    """A packaged device's figures: package, host and predicted costs, accuracy, curve, latency breakdown."""
    rec = {"package": pkg, **prof_res}
    rec["accuracy"] = {snr_key(s): ev["accuracy"][snr_key(s)] for s in ev["eval_snrs"]}
    rec["curve"] = {"channel": ev["channel"], "snrs": sweep, "n": ev["n"],
                    **{m: [ev["accuracy"][snr_key(s)].get(m) for s in sweep] for m in CURVE_KEYS}}
    uses = math.ceil(ev["mean_frames"] * ev["k"] / 2)
    rate = prof.link.uplink_mbps * 1e6 / BITS_PER_USE
    rec["latency"] = {"device_ms_host": prof_res["host"]["latency_ms_p50"],
                      "device_ms_predicted": prof_res["predicted"]["latency_ms"],
                      "link_ms_predicted": round(uses / rate * 1e3, 3), "channel_uses": uses,
                      "symbol_rate_per_s": rate, "mean_frames": ev["mean_frames"], "k": ev["k"],
                      "server_ms_host": ev["server_ms_host"]}
    rec["realised"] = {"bytes": pkg["onnx_bytes"], "host_latency_ms_p50": rec["latency"]["device_ms_host"],
                       "peak_rss_mb": prof_res["host"]["peak_rss_mb"],
                       "predicted_latency_ms": rec["latency"]["device_ms_predicted"],
                       "wer": {s: a["wer"] for s, a in rec["accuracy"].items()}, "package": pkg["path"]}
    return rec


def build_record(run: BuildRun, quick: bool, plan_res: dict, plans_doc: dict, devices_out: dict, baseline: dict,
                 unfit: list[str]) -> dict:
    """The build record (build.json) before the report stage."""
    from semedge import __version__
    from semedge.runtime.profiler import _cores, _cpu_name
    from semedge.semcom.metrics import normalizer_name

    return {
        "format": FORMAT, "semedge_version": __version__, "model": run.model, "weight_hash": run.weights(),
        "created": now(), "quick": quick, "out": str(run.out), "normalizer": normalizer_name(),
        "interval": "bootstrap 95% over test utterances (semcom.stats)",
        "host": {"cpu": _cpu_name(), "cores": _cores()},
        "settings": {**run.settings, "threads": 1, "link_assumption": LINK_ASSUMPTION,
                     "host_note": "host timings on a shared machine (other work running); ORT on 1 thread"},
        "plans": plans_doc, "plans_source": plan_res.get("source"), "devices": devices_out, "baseline": baseline,
        "unfit": unfit, "exit_code": 3 if unfit else 0,
    }


def stage_report(run: BuildRun, record: dict) -> str:
    """out/report/ (semedge.report.write_report); the index page's path relative to out."""
    from semedge.report import write_report

    out = run.out
    # the figures, not when or how long: an up-to-date report keeps the build time it was made with
    report_inputs = {k: v for k, v in record.items() if k not in ("created", "timing")}
    rep = run.st.run("report", report_inputs, lambda: {"index": str(write_report(record, out).relative_to(out))},
                     lambda r: [out / "report" / "index.html"])
    return rep["index"]
