"""`semedge build`: plan → compress → export → package → profile → evaluate → report.

    from semedge.pipeline import build
    result = build("whisper-base", "device_profiles", "build")   # also written to build/build.json

Stages (docs/build.md). Each one records a stamp `out/.stamps/<stage>.json` with the
content hash of its inputs, the sha256 of its outputs and its result; a later run
whose inputs hash the same, and whose outputs are still there unchanged, skips the
stage and reuses the recorded result.

1. plan       compress.planner.plan_devices → out/plans.json (or a given plans file)
2. package    per device: the chosen plan realised (compress/realise.py: torch steps, export,
              ONNX steps; one ONNX per plan, cached under out/cache/onnx/) → out/packages/<device>/ + .zip
3. profile    per device: host p50/p95 + peak RSS (measured), latency/memory on the device (cost model)
4. evaluate   per device: package ONNX via DeviceRunner → numpy link → server half, at the
              device's SNRs and an SNR sweep; the conventional baseline per channel
5. latency    device (measured / predicted), link airtime (predicted), server decode (measured)
6. report     semedge.report.write_report → out/report/

`build` is the list of stage calls (semedge/stages.py); stamps in semedge/stamps.py, the
shared model/data workspace in semedge/build_workspace.py, progress in semedge/build_ui.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from semedge.build_ui import UI
from semedge.build_workspace import CALIB, Workspace, load_source, select_profiles  # noqa: F401 (re-exported)
from semedge.core.errors import UserError
from semedge.core.files import write_atomic
from semedge.stages import (BITS_PER_USE, FORMAT, LINK_ASSUMPTION, BuildRun, build_record,  # noqa: F401
                            device_record, fitting_devices, stage_evaluate, stage_package, stage_plan, stage_profile,
                            stage_report)
from semedge.stamps import Stamps, _json_bytes, content_hash  # noqa: F401 (re-exported)

# Evaluation settings: full (the demo) and --quick.
FULL = {"n_eval": 16, "sweep": [-5.0, 0.0, 5.0, 10.0, 15.0, 20.0], "runs": 10, "max_new_tokens": 96,
        "server_timing_msgs": 3}
QUICK = {"n_eval": 4, "sweep": [-5.0, 5.0, 20.0], "runs": 3, "max_new_tokens": 96, "server_timing_msgs": 1}


@dataclass(frozen=True)
class BuildConfig:
    """A build's options, checked: where it goes, the evaluation settings, where its plans come from."""

    out: Path
    quick: bool = False
    settings: dict = field(default_factory=dict)  # FULL or QUICK with the overrides applied
    plans_in: Path | None = None  # a plans.json to use instead of running the planner
    plan_quick: bool | None = None  # the planner's quick space and sample sizes (None: `quick`)
    jsc: str | None = None
    progress: bool = True
    ray: object = None  # a compress.fanout.RaySpec: the planner's builds and evaluations on Ray

    @classmethod
    def make(cls, out, quick=False, *, plans=None, jsc=None, n_eval=None, sweep=None, runs=None, plan_quick=None,
             progress=True, voices="mix", data=None, ray=None) -> "BuildConfig":
        out = Path(out).expanduser().absolute()
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} exists and is not a folder", "choose another --out folder")
        settings = dict(QUICK if quick else FULL)
        if n_eval is not None:
            if n_eval < 1:
                raise UserError(f"n_eval={n_eval} must be >= 1", "evaluate on at least one test utterance")
            settings["n_eval"] = int(n_eval)
        if sweep is not None:
            settings["sweep"] = sorted(float(s) for s in sweep)
        if runs is not None:
            settings["runs"] = max(1, int(runs))
        settings["voices"] = voices
        settings["data"] = _check_data(data)
        plans_in = Path(plans) if plans is not None else None
        return cls(out, quick, settings, plans_in, plan_quick, jsc, progress, ray)


def _check_data(data) -> str | None:
    """The user's audiofolder as an absolute path, read once here so bad rows fail before any work."""
    if data is None:
        return None
    from semedge.semcom.tasks.audiofolder import load_audiofolder

    load_audiofolder(data)  # UserError naming every bad row
    return str(Path(data).expanduser().resolve())


def build(model: str, profiles_dir, out, devices=None, quick: bool = False, progress: bool = True, *,
          plans=None, jsc: str | None = None, n_eval: int | None = None, sweep=None, runs: int | None = None,
          plan_quick: bool | None = None, voices: str = "mix", data=None, ray=None) -> dict:
    """Run every stage into `out`; returns (and writes to out/build.json) the build record.

    plans: a plans.json to use instead of running the planner. plan_quick: the planner's
    quick candidate space and sample sizes (default: `quick`). voices: the built-in splits'
    voice families; data: the user's audiofolder, read instead of them (planner and
    evaluation; n_eval caps it). ray: a compress.fanout.RaySpec, the planner's builds and
    evaluations as Ray tasks (same plans.json). The record's `exit_code`
    is 3 when some device has no plan that fits (its package is not built), else 0.
    """
    t_start = time.perf_counter()
    cfg = BuildConfig.make(out, quick, plans=plans, jsc=jsc, n_eval=n_eval, sweep=sweep, runs=runs,
                           plan_quick=plan_quick, progress=progress, voices=voices, data=data, ray=ray)
    cfg.out.mkdir(parents=True, exist_ok=True)
    profs, prof_files = select_profiles(profiles_dir, devices)
    if cfg.plans_in is not None and not cfg.plans_in.is_file():
        raise UserError(f"plans file {cfg.plans_in} does not exist", "give the plans.json `semedge plan` wrote, or drop --plans")
    return run_build(model, profs, prof_files, cfg, t_start)


def run_build(model: str, profs: dict, prof_files: dict, cfg: BuildConfig, t_start: float) -> dict:
    """plan → package → profile → evaluate → device records → report; writes out/build.json."""
    out = cfg.out
    ws = Workspace(model, cfg.jsc, cfg.settings, out, cfg.progress)
    with UI(out, cfg.progress) as ui:
        ui.log(f"build {model} → {out} ({'quick' if cfg.quick else 'full'}; devices: {', '.join(profs)})")
        run = BuildRun(model, cfg.jsc, out, cfg.settings, profs, prof_files, ws, Stamps(out, ui.log), ui, cfg.ray)
        ui.stage("plan")
        plan_res, plans_doc = stage_plan(run, cfg.quick, cfg.plan_quick, cfg.plans_in, cfg.progress)
        fitting, unfit = fitting_devices(plans_doc, profs)
        ui.advance()
        ui.stage("package")
        pkgs = stage_package(run, plans_doc, fitting)
        ui.advance()
        ui.stage("profile")
        prof_res = stage_profile(run, pkgs, fitting)
        ui.advance()
        ui.stage("evaluate")
        eval_res, baseline = stage_evaluate(run, plans_doc, pkgs, fitting)
        ui.advance()
        ui.stage("latency")
        devices_out = {d: device_record(d, prof, plans_doc, fitting, cfg.settings["sweep"], pkgs, prof_res, eval_res)
                       for d, prof in profs.items()}
        ui.advance()
        record = build_record(run, cfg.quick, plan_res, plans_doc, devices_out, baseline, unfit)
        ui.stage("report")
        # the report's header shows the time so far; build.json gets the total, report included
        record["timing"] = {"seconds": round(time.perf_counter() - t_start, 1)}
        record["report"] = stage_report(run, record)
        ui.advance()
        record["stages"] = run.st.stages
        record["timing"] = {"seconds": round(time.perf_counter() - t_start, 1)}
        write_atomic(out / "build.json", _json_bytes(record))
        ui.log(f"build.json written; report: {out / record['report']}")
    return record
