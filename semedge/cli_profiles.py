"""CLI: `semedge profiles list|show|validate|measure-host|calibrate`, `semedge profile`, `semedge device bench`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from semedge.cli_options import echo_json, old_spelling, renamed
from semedge.core.errors import UserError

profiles_app = typer.Typer(no_args_is_help=True, help="Device profiles: list, show, validate, measure, calibrate.")


def _echo_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=1))


def _parse_lengths(s: str | None) -> list[int] | None:
    if not s:
        return None
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--lengths '{s}' is not a list of integers", "write e.g. --lengths 16,64,256")
    if any(v <= 0 for v in out):
        raise UserError(f"--lengths '{s}' has a non-positive length", "use lengths >= 1")
    return out


def _resolve_model(pkg: Path) -> Path:
    """An .onnx file, or a package folder holding device.onnx."""
    if pkg.is_dir():
        m = pkg / "device.onnx"
        if not m.is_file():
            raise UserError(f"{pkg}: no device.onnx in this folder", "give an .onnx file or a package folder")
        return m
    if not pkg.is_file():
        raise UserError(f"{pkg}: no such file or folder", "give an .onnx file or a package folder")
    return pkg


@profiles_app.command("list")
def list_cmd(as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """List the device profiles."""
    from semedge.runtime.profiles import load_profiles, profiles_dir

    profs = load_profiles()
    if as_json:
        _echo_json([p.model_dump(mode="json") for p in profs.values()])
        return
    typer.echo(f"profiles in {profiles_dir()}")
    typer.echo(f"{'name':18s} {'class':7s} {'mem MB':>7s} {'fp32 GF/s':>10s} {'int8 GOP/s':>10s} {'BW GB/s':>8s}"
               f" {'thr':>3s} {'budget ms':>9s}  EPs")
    for p in profs.values():
        typer.echo(f"{p.name:18s} {p.device_class:7s} {p.memory_budget_mb:7.0f} {p.peak_gflops.fp32:10.1f} "
                   f"{p.peak_gflops.int8:10.1f} {p.mem_bandwidth_gbs:8.1f} {p.threads:3d} {p.latency_budget_ms:9.0f}"
                   f"  {','.join(p.ep_names)}")


@profiles_app.command("show")
def show_cmd(name: str, as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Show one profile (by name or path)."""
    import yaml

    from semedge.runtime.profiles import load_profile

    p = load_profile(name)
    d = p.model_dump(mode="json", exclude_none=True)
    typer.echo(json.dumps(d, indent=1) if as_json else yaml.safe_dump(d, sort_keys=False).rstrip())


@profiles_app.command("validate")
def validate_cmd(files: List[Path] = typer.Argument(..., help="profile YAML files"),
                 as_json: bool = typer.Option(False, "--json", help="print {file: [errors]} and ok as JSON")):
    """Validate profile files: one line per error on stderr; exit code 2 if any is invalid."""
    from semedge.runtime.profiles import validate_file

    result = {}
    for f in files:
        result[str(f)] = errs = validate_file(f)
        for e in errs:
            typer.echo(e, err=True)
        if not errs and not as_json:
            typer.echo(f"{f}: ok")
    ok = not any(result.values())
    if as_json:
        echo_json({"ok": ok, "files": result})
    if not ok:
        raise typer.Exit(2)


@profiles_app.command("measure-host")
def measure_host_cmd(
    out: Optional[Path] = typer.Option(None, "--out", help="write the profile here (e.g. device_profiles/host.yaml)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="ORT threads (default: all cores)"),
    seconds: float = typer.Option(1.0, "--seconds", help="time per GEMM measurement"),
):
    """Measure this machine (GEMM peaks, memory bandwidth, cores, EPs) into a `host` profile."""
    import yaml

    from semedge.runtime.profiler import measure_host
    from semedge.runtime.profiles import dump_profile

    if threads is not None and threads < 1:
        raise UserError(f"--threads {threads} is not >= 1", "use --threads 1 or more")
    prof = measure_host(threads, seconds)
    header = (f"Measured by `semedge profiles measure-host` ({prof.measured_on}).\n"
              "peak_gflops: best ORT MatMul 256x1024x1024 (fp32, fp16; int8 = MatMulInteger) with `threads`.\n"
              "mem_bandwidth_gbs: numpy copy of 256 MiB (read + write). memory_budget_mb: 25% of RAM.")
    if out:
        dump_profile(prof, out, header)
        typer.echo(f"wrote {out}")
    else:
        typer.echo(yaml.safe_dump(prof.model_dump(mode="json", exclude_none=True), sort_keys=False).rstrip())


def _calibration_unit(prof, bench_data: dict, unit: Optional[str], bench: Path) -> str:
    """The compute unit a bench's timings can fit: the unit its EP ran on, never another one."""
    from semedge.runtime.providers import canonical_ep, unit_of

    ran = (bench_data.get("providers") or ["CPUExecutionProvider"])[0]
    ran_unit = unit_of(canonical_ep(ran) or "CPU")
    if unit is not None and unit != ran_unit:
        raise UserError(f"--unit {unit}: {bench} ran on {ran} ({ran_unit}), so it can fit only the {ran_unit} entry",
                        f"use --unit {ran_unit}, or bench on the {unit} with `semedge device bench --ep ...`")
    target = prof.first_ep.unit
    if ran_unit != target and unit is None:
        raise UserError(f"{bench} ran on {ran} ({ran_unit}) but {prof.name} runs on {prof.first_ep.ort_name} "
                        f"({target}): {ran_unit} timings cannot fit its {target} roofline",
                        f"bench on the device with `semedge device bench PKG --ep {prof.first_ep.name.lower()} --json`, "
                        f"or add `--unit {ran_unit}` to fit only its {ran_unit} entry (the fallback nodes)")
    return ran_unit


@profiles_app.command("calibrate")
def calibrate_cmd(
    name: str = typer.Argument(..., help="profile name or path"),
    bench: Path = typer.Argument(..., help="JSON written by `semedge device bench --json`"),
    model: Optional[Path] = typer.Option(None, "--model", help="the benched model here, if its path differs"),
    out: Optional[Path] = typer.Option(None, "--out", help="write the calibrated profile here instead"),
    unit: Optional[str] = typer.Option(None, "--unit", help="fit only this compute unit's entry: cpu (the CPU EP "
                                       "and fallback nodes) when the profile's first EP is a GPU/NPU"),
):
    """Fit a profile's efficiency factors from a bench run on that device, on the unit the bench ran on."""
    import shutil

    from semedge.runtime import costmodel
    from semedge.runtime.profiles import load_profile, profiles_dir, update_efficiency

    prof = load_profile(name)
    src = Path(name) if name.endswith((".yaml", ".yml")) else profiles_dir() / f"{name}.yaml"
    try:
        data = json.loads(bench.read_text())
        rows = data["results"]
        mpath = _resolve_model(model or Path(data["model"]))
    except FileNotFoundError:
        raise UserError(f"{bench}: no such file", "run `semedge device bench PKG --json > bench.json` first")
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{bench}: not a bench JSON (needs 'model' and 'results')",
                        "use the output of `semedge device bench --json`")
    fit_unit = _calibration_unit(prof, data, unit, bench)
    lat, mem = [], []
    for r in rows:
        cost = costmodel.analyze(mpath, r.get("length"))
        lat.append((cost, float(r["p50_ms"])))
        if r.get("peak_rss_mb"):
            mem.append((cost, float(r["peak_rss_mb"])))
    if not lat:
        raise UserError(f"{bench}: no results", "bench at least one input length")
    before = [costmodel.predict_latency_ms(c, prof, fit_unit) for c, _ in lat]
    eff = costmodel.calibrate(lat, prof, label=f"{bench.name} ({len(lat)} lengths, {mpath.name}, "
                              f"{fit_unit} only)", unit=fit_unit)
    if len(mem) >= 3:
        eff = costmodel.calibrate_memory(mem, eff)
    cal = prof.model_copy(update={"efficiency": eff})
    after = [costmodel.predict_latency_ms(c, cal, fit_unit) for c, _ in lat]
    target = out or src
    if out:
        shutil.copyfile(src, out)
    update_efficiency(target, eff)
    for (c, m), b, a in zip(lat, before, after):
        typer.echo(f"measured {m:9.2f} ms   predicted before {b:9.2f} ms   after {a:9.2f} ms")
    typer.echo(f"wrote efficiency to {target}")


def profile_cmd(
    model: Path = typer.Argument(..., help="an .onnx model (or a package folder with device.onnx)"),
    device: str = typer.Option(..., "--device", help="profile name or path"),
    length: Optional[str] = typer.Option(None, "--lengths", help="input lengths for symbolic dims, e.g. 64,256"),
    runs: int = typer.Option(20, "--runs", help="timed runs (host only)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
):
    """Predicted latency and memory of MODEL on a device; on `host` also the measured figures."""
    from semedge.runtime import costmodel
    from semedge.runtime.profiles import load_profile

    mpath = _resolve_model(model)
    prof = load_profile(device)
    lengths = _parse_lengths(length) or [None]
    rows = []
    for ln in lengths:
        r = costmodel.predict(mpath, prof, ln)
        r["latency_budget_ms"] = prof.latency_budget_ms
        r["memory_budget_mb"] = prof.memory_budget_mb
        rows.append(r)
    if prof.device_class == "host":
        from semedge.runtime import profiler

        b = profiler.bench_onnx(mpath, [ln for ln in lengths], runs=runs, threads=prof.threads)
        by_len = {r["length"]: r for r in b["results"]}
        for r in rows:
            m = by_len.get(r["length"]) or b["results"][0]
            r.update(measured_ms=m["p50_ms"], measured_p95_ms=m["p95_ms"], measured_peak_mb=m.get("peak_rss_mb"))
        rows[0]["ops"] = profiler.op_profile(mpath, lengths[0], prof.threads, runs=3, top=8)
    if as_json:
        _echo_json({"model": str(mpath), "device": prof.name, "results": rows})
        return
    typer.echo(f"{mpath} on {prof.name} ({prof.threads} threads; predictions calibrated on: "
               f"{prof.efficiency.calibrated_on or 'defaults, uncalibrated'})")
    for r in rows:
        line = (f"  length {str(r['length']):>5s}: predicted {r['predicted_ms']:9.2f} ms, {r['predicted_peak_mb']:7.1f} MB"
                f"  (budget {r['latency_budget_ms']:.0f} ms, {r['memory_budget_mb']:.0f} MB; {r['gflops']:.2f} GFLOP)")
        if "measured_ms" in r:
            line += f"\n{'':17s}measured {r['measured_ms']:9.2f} ms, {r['measured_peak_mb'] or float('nan'):7.1f} MB"
        typer.echo(line)
    if rows and "ops" in rows[0]:
        typer.echo("  top ops (ORT profile): " + ", ".join(f"{o['op']} {100 * o['share']:.0f}%" for o in rows[0]["ops"]))


def _manifest(pkg: Path) -> dict:
    """A package folder's manifest ({} for an .onnx file or an unreadable one: Package.load judges those)."""
    try:
        m = json.loads((pkg / "manifest.json").read_text()) if pkg.is_dir() else {}
    except (OSError, json.JSONDecodeError):
        return {}
    return m if isinstance(m, dict) else {}


def _check_frontend(pkg: Path) -> None:
    """A package whose manifest front end (PCM or log-mel input) is not its graph's is refused."""
    from semedge.runtime.runner import check_frontend

    man = _manifest(pkg)
    inputs = (man.get("onnx") or {}).get("inputs")
    if inputs:
        check_frontend(man, inputs, f"package {pkg}")


def _session_plan(ep: Optional[str], ep_option: Optional[List[str]], profile: Optional[str], pkg: Path):
    """(ORT providers, their options, threads or None) from --ep/--ep-option/--device; strict with --ep,
    which must be an EP the package `pkg` can run."""
    import warnings

    from semedge.runtime.partition import check_session_ep
    from semedge.runtime.providers import ep_session_args, provider_plan

    prof = None
    if profile is not None:
        from semedge.runtime.profiles import load_profile

        prof = load_profile(profile)
    wanted, extra, strict = ep_session_args(ep, ep_option, prof)
    check_session_ep(wanted, extra, strict, _manifest(pkg), str(pkg))
    with warnings.catch_warnings():  # said once below, as a note
        warnings.simplefilter("ignore")
        names, opts = provider_plan(wanted, strict)
    if prof is not None and ep is None and names[0] != prof.first_ep.ort_name:
        typer.echo(f"note: {prof.first_ep.ort_name} (profile {prof.name}) is not in this onnxruntime build; "
                   f"running on {names[0]}", err=True)
    for i, o in enumerate(extra):
        opts[i] = {**opts[i], **o}
    return names, opts, (prof.threads if prof is not None else None)


def _write_json(res: dict, out: Path) -> None:
    import os
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, out)


def _echo_bench(res: dict, runs: int) -> None:
    typer.echo(f"{res['model']} on {res['providers'][0]} ({res['threads']} threads, {runs} runs; "
               f"baseline RSS {res['baseline_rss_mb']} MB)")
    for r in res["results"]:
        typer.echo(f"  length {str(r['length']):>5s}: p50 {r['p50_ms']:9.2f} ms  p95 {r['p95_ms']:9.2f}  "
                   f"p99 {r['p99_ms']:9.2f}  peak RSS {r.get('peak_rss_mb', float('nan')):7.1f} MB")
    for prov, d in (res.get("node_assignment") or {}).items():
        typer.echo(f"  {prov}: {d['n_nodes']} nodes, {100 * d['share']:.0f}% of kernel time")
    if res.get("ops"):
        typer.echo(f"  {'op':24s} {'ms':>9s} {'share':>6s} {'runs':>5s}  EP")
        for o in res["ops"]:
            typer.echo(f"  {o['op']:24s} {o['ms']:9.3f} {100 * o['share']:5.1f}% {o['count']:5d}  "
                       f"{','.join(o['providers'])}")


def bench_device_cmd(
    pkg: Path = typer.Argument(..., help="an .onnx file or a package folder with device.onnx"),
    lengths: Optional[str] = typer.Option(None, "--lengths", help="input lengths, e.g. 16,64,256 (speech: mel frames; "
                                          "PCM input, --frontend graph: samples; default the 30 s window)"),
    runs: int = typer.Option(20, "--runs", help="timed runs per length"),
    warmup: int = typer.Option(3, "--warmup", help="untimed runs first"),
    threads: Optional[int] = typer.Option(None, "--threads", help="ORT intra-op threads (default: the profile's, else 1)"),
    ep: Optional[str] = typer.Option(None, "--ep", help="execution provider: cpu, xnnpack, cuda, tensorrt, qnn, nnapi, "
                                     "coreml; exit 2 if this onnxruntime build lacks it"),
    ep_option: Optional[List[str]] = typer.Option(None, "--ep-option", help="KEY=VALUE provider option for --ep "
                                                  "(repeat), e.g. trt_fp16_enable=1"),
    profile: Optional[str] = typer.Option(None, "--device", help="device profile (name or YAML path) whose EPs "
                                          "(in order, with options) and threads to use"),
    profile_old: Optional[str] = old_spelling("--profile", "--device"),
    profile_ops: bool = typer.Option(False, "--profile-ops", "--op-profile", help="add ORT's per-op profile (by op type, "
                                     "with the EP that ran each) and the node assignment per EP"),
    as_json: bool = typer.Option(False, "--json", help="print JSON (input of `profiles calibrate`)"),
    out: Optional[Path] = typer.Option(None, "--out", help="also write the JSON here"),
    trust: Optional[Path] = typer.Option(None, "--trust", help="signing.pub: refuse the package unless it is "
                                         "signed by this key (needs a package folder)"),
):
    """Run on the target: latency (p50/p95/p99) and peak RSS per input length, on the chosen EP."""
    from semedge.runtime.profiler import bench_onnx, op_profile

    if runs < 1 or (threads is not None and threads < 1) or warmup < 0:
        raise UserError("--runs and --threads must be >= 1, --warmup >= 0", "e.g. --runs 20 --threads 4")
    profile = renamed(profile, profile_old, "--device", "--profile")
    if trust is not None:  # signature + every file's hash (runtime/trust.py)
        from semedge.runtime.package import Package

        mpath = Package.load(pkg, trust=trust).onnx_path
    else:
        mpath = _resolve_model(pkg)
    _check_frontend(pkg)
    names, opts, prof_threads = _session_plan(ep, ep_option, profile, pkg)
    threads = threads or prof_threads or 1
    lens = _parse_lengths(lengths)
    res = bench_onnx(mpath, lens, runs=runs, warmup=warmup, threads=threads, providers=names, provider_options=opts)
    if profile is not None:
        res["profile"] = profile
    if profile_ops:
        length = res["results"][0]["length"]
        res["ops"], res["node_assignment"] = op_profile(mpath, length, threads, runs=min(runs, 5), providers=names,
                                                        top=None, provider_options=opts, with_providers=True)
    if pkg.is_dir() and (pkg / "manifest.json").is_file():
        res["package"] = str(pkg)
    if out:
        _write_json(res, out)
    if as_json:
        _echo_json(res)
        return
    _echo_bench(res, runs)


def register(app: typer.Typer) -> None:
    app.add_typer(profiles_app, name="profiles")
    app.command("profile")(profile_cmd)
