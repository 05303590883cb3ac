"""`semedge build --task text|image`: plan → package → profile → evaluate → report, for one task.

    record = build_task("image", None, "device_profiles", "build-image", devices=["android-mid"])

The stages of semedge/pipeline.py on the task's device half (compress/task_subjects.py):
1. plan      compress/task_plan.py → out/plans.json (or a given plans file of the same task)
2. package   per fitting device: the chosen graph → out/packages/<device>/ + .zip, a package
             `semedge serve` hosts (image: export/image_package.py; text: export/package.py)
3. profile   per device: host p50/p95 + peak RSS of the package's graph (measured, ORT 1 thread),
             latency / memory on the device (cost model), both at the task's message size
4. evaluate  per device: the package's graph through the link at the device's SNRs and the
             sweep (the task's metric, runtime/evaluate.receive noise); image: the JPEG + LDPC +
             QPSK baseline at equal channel uses on the same patches
5. report    semedge.report.write_report (its task section) → out/report/
Each stage is stamped (semedge/stamps.py): an up-to-date stage is skipped.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from semedge.build_ui import UI
from semedge.build_workspace import select_profiles
from semedge.core.channel_spec import snr_key
from semedge.core.errors import UserError
from semedge.core.files import sha256_file, write_atomic
from semedge.stages import BITS_PER_USE, FORMAT, LINK_ASSUMPTION, _calibration, _host_check, _predicted, _read_plans
from semedge.stamps import Stamps, _json_bytes, group, now

SETTINGS = {"full": {"n_eval": None, "sweep": [-5.0, 0.0, 5.0, 10.0, 15.0, 20.0], "runs": 10},
            "quick": {"n_eval": 8, "sweep": [-5.0, 5.0, 20.0], "runs": 3}}


def _settings(quick: bool, n_eval: int | None, task: str) -> dict:
    s = dict(SETTINGS["quick" if quick else "full"])
    if n_eval is not None and n_eval < 1:
        raise UserError(f"--n-eval {n_eval} must be at least 1", "evaluate on at least one test example")
    s["n_eval"] = n_eval or s["n_eval"] or (64 if task == "image" else 24)
    return s


# ---------------------------------------------------------------- stage 1: plan


def stage_plan(st: Stamps, subject, profs: dict, prof_files: dict, out: Path, quick: bool, plans_in, log) -> dict:
    """out/plans.json from the task planner, or a given plans file of this task; the plans document."""
    from semedge.compress.planner import NoPlanFits
    from semedge.compress.task_plan import ACCURACY_VERSION, plan_task

    def run():
        if plans_in is not None:
            write_atomic(out / "plans.json", Path(plans_in).read_bytes())
            return {"source": str(plans_in)}
        try:
            plan_task(subject, list(profs.values()), quick=quick, out=out / "plans.json", say=log)
        except NoPlanFits:  # plans.json is written: build what fits, mark the rest
            pass
        return {"source": "planner"}

    inputs = {"task": subject.task, "subject": subject.key, "profiles": prof_files, "devices": sorted(profs),
              "quick": quick, "plans_in": sha256_file(plans_in) if plans_in else None, "accuracy": ACCURACY_VERSION}
    res = st.run("plan", inputs, run, lambda r: [out / "plans.json"])
    doc = _read_plans(out / "plans.json")
    if doc.get("task", "speech") != subject.task:
        raise UserError(f"plans file {plans_in or out / 'plans.json'} is for the {doc.get('task', 'speech')} task, "
                        f"not {subject.task}", f"give the plans.json of `semedge plan --task {subject.task}`, or drop --plans")
    missing = [d for d in profs if d not in doc["devices"]]
    if missing:
        raise UserError(f"plans.json has no entry for device(s) {missing}", "re-run the planner for these devices")
    return {**res, "doc": doc}


# ---------------------------------------------------------------- stage 2: package


def package_one(subject, out: Path, device: str, cid: str, cand: dict) -> dict:
    """The device's chosen graph as a package folder + zip; what the record keeps of it."""
    from semedge.compress.plan import TORCH_OPS, Plan
    from semedge.export.package import package_bytes

    plan = Plan.make(cand["plan"]["steps"], cand["plan"].get("name", ""))
    onnx = subject.build(plan)
    dst = out / "packages" / device
    measured = {"candidate": cid, "planner": {"bytes": cand.get("bytes"), "host": cand.get("host")}}
    if subject.task == "image":
        from semedge.export.image_package import build_image_package

        build_image_package(dst, subject.codec_dir, codec=subject.codec, onnx_path=onnx, plan=plan.to_dict(),
                            profile=device, measured=measured)
    else:
        from semedge.export.package import build_package

        sp = subject.torch_split(Plan.make(plan.ops(TORCH_OPS)))
        build_package(sp, dst, onnx_path=onnx, plan=plan, profile=device, measured=measured,
                      jsc_ckpt=None if subject.ckpt is None else subject.ckpt.path)
    man = json.loads((dst / "manifest.json").read_text())
    return {"path": str(dst.relative_to(out)), "zip": str(dst.with_suffix(".zip").relative_to(out)),
            "package_id": man["package_id"], "kind": man["model"]["kind"], "bytes": package_bytes(dst),
            "zip_bytes": dst.with_suffix(".zip").stat().st_size, "onnx_bytes": (dst / "device.onnx").stat().st_size,
            "onnx_sha256": man["files"]["device.onnx"], "precision": man["onnx"].get("precision"),
            "plan_hash": plan.hash()}


def stage_package(st: Stamps, subject, out: Path, doc: dict, fitting: list[str], prof_files: dict) -> dict:
    pkgs = {}
    for d in fitting:
        cid = doc["devices"][d]["chosen"]
        cand = doc["candidates"][cid]
        inputs = {"task": subject.task, "subject": subject.key, "plan": cand["plan"], "profile": prof_files.get(d)}
        pkgs[d] = st.run(f"package-{d}", inputs, lambda d=d, cid=cid, cand=cand: package_one(subject, out, d, cid, cand),
                         lambda r: [out / r["path"] / "manifest.json", out / r["zip"]])
    group(st, "package", fitting)
    return pkgs


# ---------------------------------------------------------------- stage 3: profile


def profile_one(subject, onnx: Path, prof, host_prof, runs: int) -> dict:
    """Host timing and peak RSS at the task's message size, the device prediction, the predictor's error here."""
    from semedge.runtime import costmodel
    from semedge.runtime.profiler import peak_rss, time_onnx

    t = time_onnx(onnx, length=subject.length, threads=1, runs=runs, warmup=1)
    rss = peak_rss(onnx, lengths=[subject.length], threads=1)
    host = {"latency_ms_p50": t["p50_ms"], "latency_ms_p95": t["p95_ms"], "cpu_p50_ms": t.get("cpu_p50_ms"),
            "runs": t["runs"], "threads": 1, "peak_rss_mb": max(rss["peak_mb"].values()), "length": subject.length}
    cost = costmodel.analyze(onnx, length=subject.length)
    return {"host": host, "predicted": _predicted(prof, cost), "host_check": _host_check(host_prof, cost, host["latency_ms_p50"])}


def stage_profile(st: Stamps, subject, out: Path, pkgs: dict, profs: dict, prof_files: dict, runs: int) -> dict:
    from semedge.runtime.profiles import load_profile, profiles_dir

    host_file = profiles_dir() / "host.yaml"
    host_prof = profs.get("host") or (load_profile(host_file) if host_file.is_file() else None)
    res = {}
    for d, pkg in pkgs.items():
        inputs = {"onnx": pkg["onnx_sha256"], "profile": prof_files.get(d), "runs": runs, "length": subject.length}
        res[d] = st.run(f"profile-{d}", inputs,
                        lambda d=d, pkg=pkg: profile_one(subject, out / pkg["path"] / "device.onnx", profs[d], host_prof, runs))
    group(st, "profile", list(pkgs))
    return res


# ---------------------------------------------------------------- stage 4: evaluate


def evaluate_one(subject, onnx: Path, plan_dict: dict, channel: str, snrs: list[float], n: int, cache) -> dict:
    """The package's graph through `channel` at `snrs`: per SNR the task's figures (no per-example lists)."""
    from semedge.compress.candidates import Cand
    from semedge.compress.choose import cond_key
    from semedge.compress.plan import Plan
    from semedge.compress.task_plan import accuracy

    c = Cand("package", Plan.make(plan_dict["steps"], plan_dict.get("name", "")), path=onnx)
    accuracy(subject, c, {(channel, s) for s in snrs}, n, cache)
    return {snr_key(s): {k: v for k, v in c.accuracy[cond_key(channel, s)].items() if k != "per_example"} for s in snrs}


def stage_evaluate(st: Stamps, subject, out: Path, doc: dict, pkgs: dict, settings: dict) -> dict:
    from semedge.compress.task_plan import ACCURACY_VERSION
    from semedge.runtime.evaluate import AccuracyCache

    cache = AccuracyCache(out / "planner" / "task_accuracy.json")
    res = {}
    for d, pkg in pkgs.items():
        info = doc["devices"][d]
        snrs = sorted(set(settings["sweep"]) | {float(s) for s in info["eval_snrs"]})
        plan = doc["candidates"][info["chosen"]]["plan"]
        inputs = {"onnx": pkg["onnx_sha256"], "plan": pkg["plan_hash"], "subject": subject.key, "channel": info["channel"],
                  "snrs": snrs, "n": settings["n_eval"], "accuracy": ACCURACY_VERSION}
        acc = st.run(f"evaluate-{d}", inputs, lambda pkg=pkg, info=info, snrs=snrs, plan=plan: evaluate_one(
            subject, out / pkg["path"] / "device.onnx", plan, info["channel"], snrs, settings["n_eval"], cache))
        res[d] = {"accuracy": acc, "channel": info["channel"], "snrs": snrs}
    group(st, "evaluate", list(pkgs))
    return res


def image_baseline(subject, channel: str, snrs: list[float], n: int) -> dict:
    """JPEG + LDPC 1/2 + QPSK at the codec's channel uses per 32 x 32 patch, on the evaluation's patches."""
    import numpy as np

    from semedge.semcom.image_baseline import JpegLinkConfig, send_patches
    from semedge.semcom.image_eval import channel_uses, score_images
    from semedge.semcom.stats import mean_ci

    x = np.stack(subject.examples(n)[0])
    cfg = JpegLinkConfig(uses=channel_uses(subject.codec, 32, 32))
    rows = {"psnr": [], "ssim": [], "psnr_ci95": [], "decoded": []}
    for snr in snrs:
        rec, stats = send_patches(x, cfg, channel, snr)
        s = score_images(x, rec)
        ci = mean_ci(s["psnr"])
        rows["psnr"].append(round(float(ci["value"]), 5))
        rows["psnr_ci95"].append(ci)
        rows["ssim"].append(round(float(np.mean(s["ssim"])), 5))
        rows["decoded"].append(stats["decoded"])
    return {"name": cfg.label, "channel_uses_per_patch": cfg.uses, "snrs": list(snrs), "n": n, **rows}


def stage_baseline(st: Stamps, subject, channels: list[str], settings: dict, log) -> dict:
    """The task's conventional baseline per channel (image: JPEG + LDPC + QPSK; text: none in semedge yet)."""
    if subject.task != "image":
        return {"curves": {}, "note": "no conventional baseline for the text task in semedge yet"}
    curves = {}
    for ch in channels:
        inputs = {"subject": subject.key, "channel": ch, "snrs": settings["sweep"], "n": settings["n_eval"]}
        try:
            curves[ch] = st.run(f"baseline-{ch}", inputs,
                                lambda ch=ch: image_baseline(subject, ch, settings["sweep"], settings["n_eval"]))
        except (UserError, ImportError) as e:  # e.g. the LDPC library missing: the build goes on without it
            log(f"baseline: {e}")
            return {"curves": curves, "note": str(e)}
    group(st, "baseline", channels)
    return {"curves": curves}


# ---------------------------------------------------------------- records and the build


def _message_uses(subject, doc: dict) -> tuple[int, str]:
    """Complex channel uses of one message at the task's message size (image: 256 x 256; text: 128 tokens)."""
    tokens = (subject.length // 4) ** 2 if subject.task == "image" else subject.length
    return math.ceil(tokens * subject.k / 2), f"{tokens} tokens x k={subject.k} real symbols / 2"


def device_record(subject, d: str, prof, doc: dict, pkgs: dict, prof_res: dict, eval_res: dict) -> dict:
    """One device: budgets and choice, then its measured figures (or the planner's closest plan)."""
    info = doc["devices"][d]
    shown = info.get("chosen") or info.get("closest")
    cand = doc["candidates"].get(shown) or {}
    rec = {"device_class": prof.device_class, "profile": prof.name, "budgets": info["budgets"], "channel": info["channel"],
           "snr_db": info["snr_db"], "eval_snrs": info["eval_snrs"], "uplink_mbps": prof.link.uplink_mbps,
           "fits": d in pkgs, "chosen": info.get("chosen") if d in pkgs else None, "closest": info.get("closest"),
           "failing_budget": info.get("failing_budget"), "describe": cand.get("describe"), "metric": subject.metric,
           "rejected": info.get("rejected") or {}, "pareto": info.get("pareto") or []}
    if d not in pkgs:
        pred = (cand.get("predicted") or {}).get(d) or {}
        keys = {snr_key(s) for s in info["eval_snrs"]}
        acc = {k: v for k, v in (cand.get("accuracy") or {}).items() if k in keys and v.get("channel") == info["channel"]}
        rec.update(package=None, accuracy=acc,
                   predicted={"latency_ms": pred.get("latency_ms"), "memory_mb": pred.get("memory_mb"),
                              "ep": prof.first_ep.name, "unit": prof.first_ep.unit, **_calibration(prof)},
                   note=f"no plan fits ({info.get('failing_budget')}); closest plan {cand.get('describe') or shown} "
                        "shown from the planner's figures, not packaged")
        return rec
    ev = eval_res[d]
    uses, how = _message_uses(subject, doc)
    rate = prof.link.uplink_mbps * 1e6 / BITS_PER_USE
    rec.update(package=pkgs[d], **prof_res[d])
    # the planner's model memory (what the budget is compared with) beside the process memory
    rec["predicted"] = {**prof_res[d]["predicted"], "model_memory_mb": cand["predicted"][d]["memory_mb"]}
    rec["accuracy"] = {snr_key(s): ev["accuracy"][snr_key(s)] for s in info["eval_snrs"]}
    rec["curve"] = {"channel": ev["channel"], "snrs": ev["snrs"],
                    **{m: [ev["accuracy"][snr_key(s)][m] for s in ev["snrs"]] for m in subject.metrics},
                    f"{subject.metric}_ci95": [ev["accuracy"][snr_key(s)].get(f"{subject.metric}_ci95") for s in ev["snrs"]]}
    rec["latency"] = {"device_ms_host": prof_res[d]["host"]["latency_ms_p50"],
                      "device_ms_predicted": prof_res[d]["predicted"]["latency_ms"],
                      "link_ms_predicted": round(uses / rate * 1e3, 3), "channel_uses": uses, "channel_uses_how": how,
                      "symbol_rate_per_s": rate}
    return rec


def build_task(task: str, model: str | None, profiles_dir, out, devices=None, *, quick: bool = False, plans=None,
               jsc: str | None = None, n_eval: int | None = None, progress: bool = True) -> dict:
    """Every stage for `task` (text or image) into `out`; returns (and writes to out/build.json) the
    build record; its `exit_code` is 3 when some device has no plan that fits (not packaged)."""
    from semedge.compress.task_subjects import open_subject

    t0 = time.perf_counter()
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder", "choose another --out folder")
    if plans is not None and not Path(plans).is_file():
        raise UserError(f"plans file {plans} does not exist", "give the plans.json `semedge plan --task` wrote, or drop --plans")
    settings = _settings(quick, n_eval, task)
    out.mkdir(parents=True, exist_ok=True)
    profs, prof_files = select_profiles(profiles_dir, devices)
    subject = open_subject(task, model, jsc, out / "planner")
    with UI(out, progress) as ui:
        ui.log(f"build --task {task} ({subject.source}) → {out} ({'quick' if quick else 'full'}; devices: {', '.join(profs)})")
        return _run(subject, profs, prof_files, out, quick, plans, settings, Stamps(out, ui.log), ui, t0)


def _run(subject, profs, prof_files, out: Path, quick, plans, settings, st: Stamps, ui, t0) -> dict:
    from semedge import __version__
    from semedge.report import write_report

    ui.stage("plan")
    plan_res = stage_plan(st, subject, profs, prof_files, out, quick, plans, ui.log)
    doc = plan_res.pop("doc")
    fitting = [d for d in profs if doc["devices"][d].get("fits") and doc["devices"][d].get("chosen")]
    ui.stage("package")
    pkgs = stage_package(st, subject, out, doc, fitting, prof_files)
    ui.stage("profile")
    prof_res = stage_profile(st, subject, out, pkgs, profs, prof_files, settings["runs"])
    ui.stage("evaluate")
    eval_res = stage_evaluate(st, subject, out, doc, pkgs, settings)
    baseline = stage_baseline(st, subject, sorted({eval_res[d]["channel"] for d in fitting}), settings, ui.log)
    unfit = [d for d in profs if d not in fitting]
    record = {"format": FORMAT, "task": subject.task, "semedge_version": __version__, "model": subject.source,
              "weight_hash": subject.weight_hash, "created": now(), "quick": quick, "out": str(out),
              "metric": doc.get("metric"), "cost_length": doc.get("cost_length"),
              "settings": {**settings, "threads": 1, "link_assumption": LINK_ASSUMPTION,
                           "host_note": "host timings on a shared machine (other work running); ORT on 1 thread"},
              "plans": doc, "plans_source": plan_res.get("source"), "baseline": baseline, "unfit": unfit,
              "exit_code": 3 if unfit else 0,
              "devices": {d: device_record(subject, d, p, doc, pkgs, prof_res, eval_res) for d, p in profs.items()}}
    ui.stage("report")
    record["timing"] = {"seconds": round(time.perf_counter() - t0, 1)}
    report_inputs = {k: v for k, v in record.items() if k not in ("created", "timing")}
    record["report"] = st.run("report", report_inputs, lambda: {"index": str(write_report(record, out).relative_to(out))},
                              lambda r: [out / "report" / "index.html"])["index"]
    record["stages"] = st.stages
    record["timing"] = {"seconds": round(time.perf_counter() - t0, 1)}
    write_atomic(out / "build.json", _json_bytes(record))
    ui.log(f"build.json written; report: {out / record['report']}")
    return record
