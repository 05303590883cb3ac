"""CLI: `semedge plan` — per device, the most accurate compression plan that fits its budgets."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from semedge.cli_options import echo_json
from semedge.core.errors import UserError


def _select_profiles(profiles_dir: Optional[Path], devices: Optional[str]):
    from semedge.runtime.profiles import load_profile, load_profiles, profile_names

    if profiles_dir is not None and not profiles_dir.is_dir():
        raise UserError(f"--profiles {profiles_dir}: no such folder", "give the folder holding the device .yaml files")
    if devices:
        wanted = [d.strip() for d in devices.split(",") if d.strip()]
        if not wanted:
            raise UserError(f"--devices '{devices}' names no device", "write e.g. --devices watch,jetson-agx-orin")
        have = profile_names(profiles_dir) if profiles_dir else profile_names()
        out = []
        for d in wanted:
            if d.endswith((".yaml", ".yml")) or Path(d).is_file():
                out.append(load_profile(d))
            elif d in have:
                out.append(load_profile((profiles_dir / f"{d}.yaml") if profiles_dir else d))
            else:
                raise UserError(f"--devices: unknown device profile '{d}'", f"use one of: {', '.join(have) or '(none)'}")
        return out
    profs = list(load_profiles(profiles_dir).values())
    if not profs:
        raise UserError(f"no device profiles in {profiles_dir}", "add .yaml profiles or pass --devices")
    return profs


def register(app: typer.Typer) -> None:
    @app.command("plan")
    def plan_cmd(
        model: Optional[str] = typer.Option(None, "--model", help="speech: a Whisper model (default whisper-base); text: a text seq2seq (required); image: a `semedge train-image` folder (default: the shipped codec)"),
        task: str = typer.Option("speech", "--task", help="speech, text or image (one task per run; docs/tasks.md)"),
        profiles: Optional[Path] = typer.Option(None, "--profiles", help="folder of device profiles (default: the shipped ones)"),
        devices: Optional[str] = typer.Option(None, "--devices", help="comma-separated profile names (default: every profile in --profiles)"),
        out: Path = typer.Option(Path("build/plans.json"), "--out", help="plans.json to write"),
        quick: bool = typer.Option(False, "--quick", help="smaller candidate space, fewer utterances, low-end SNR only"),
        memory_mb: Optional[float] = typer.Option(None, "--memory-mb", help="memory budget for every selected device (MB)"),
        latency_ms: Optional[float] = typer.Option(None, "--latency-ms", help="latency budget for every selected device (ms)"),
        max_wer: Optional[float] = typer.Option(None, "--max-wer", help="accuracy budget: mean WER at the device's SNRs"),
        jsc: Optional[str] = typer.Option(None, "--jsc", help="JSC codec checkpoint folder, 'default' or 'identity'"),
        workdir: Optional[Path] = typer.Option(None, "--workdir", help="cache of built candidates and measurements (default: OUT's folder/planner)"),
        n_cheap: Optional[int] = typer.Option(None, "--n-cheap", help="utterances for the cheap pass (default 8; quick 4)"),
        n_full: Optional[int] = typer.Option(None, "--n-full", help="utterances for the full pass (default 40; quick 12)"),
        candidates: Optional[Path] = typer.Option(None, "--candidates", help="JSON list of plans to search instead of the built-in space"),
        no_realise: bool = typer.Option(False, "--no-realise", help="skip measuring the chosen plans on this host"),
        as_json: bool = typer.Option(False, "--json", help="print the result (plans.json's devices, exit code) as JSON; the table goes to stderr"),
        voices: str = typer.Option("mix", "--voices", help="voice families of the built-in splits: mix, espeak, piper, flite or a+b (docs/data.md)"),
        data: Optional[Path] = typer.Option(None, "--data", help="measure accuracy on your recordings (audiofolder: metadata.csv with file_name,transcription) instead of the built-in splits"),
        ray: bool = typer.Option(False, "--ray", help="builds, cost predictions and accuracy evaluations as Ray tasks (docs/scale.md); same plans.json"),
        address: Optional[str] = typer.Option(None, "--address", help="with --ray: join this cluster (e.g. auto); default: a local one"),
        ray_workers: Optional[int] = typer.Option(None, "--ray-workers", help="with --ray: planner workers, 1 CPU each (default 2)"),
        student: Optional[List[Path]] = typer.Option(None, "--student", help="a student codec folder (semedge train --encoder) to add, x every precision; repeatable (the shipped students are always in)"),
    ):
        """Choose a compression plan per device: predicted bytes/memory/latency, accuracy measured through the channel."""
        import json

        from rich.console import Console

        from semedge.compress.fanout import ray_spec
        from semedge.compress.planner import NoPlanFits, plan_devices
        from semedge.compress.students import read_student

        from semedge.compress.task_subjects import check_task_model, parse_task

        con = Console(stderr=True)
        for name, v in (("--n-cheap", n_cheap), ("--n-full", n_full)):
            if v is not None and v < 1:
                raise UserError(f"{name} {v} must be at least 1", f"e.g. {name} 8")
        task = parse_task(task)
        model = check_task_model(task, model)
        if task != "speech":
            speech_only(task, {"--n-cheap": n_cheap, "--max-wer": max_wer, "--data": data, "--student": student,
                               "--ray": ray or None, "--voices": None if voices == "mix" else voices})
        spec = ray_spec(ray, address, ray_workers)
        profs = _select_profiles(profiles, devices)
        for p in student or []:
            read_student(p)  # a missing folder or a codec that is no student: exit 2 before any work
        if data is not None:
            from semedge.semcom.tasks.audiofolder import load_audiofolder

            load_audiofolder(data)  # every bad row named, exit 2, before any work
        plans = None
        if candidates is not None:
            from semedge.compress.plan import Plan

            if not candidates.is_file():
                raise UserError(f"--candidates {candidates}: no such file", "give a JSON file with a list of plans")
            try:
                items = json.loads(candidates.read_text())
            except json.JSONDecodeError as e:
                raise UserError(f"--candidates {candidates} is not valid JSON: {e}", "fix the file's syntax") from None
            if not isinstance(items, list) or not items:
                raise UserError(f"--candidates {candidates} must hold a non-empty JSON list of plans",
                                '[{"name": "int8", "steps": [{"op": "quantize_onnx", "config": {"mode": "int8_dynamic"}}]}]')
            plans = [Plan.from_json(json.dumps(p)) for p in items]
        if task != "speech":
            return _plan_task(task, model, jsc, profs, out, workdir, quick, n_full, memory_mb, latency_ms,
                              not no_realise, plans, as_json, con)
        con.print(f"planning {model} for {len(profs)} device(s): {', '.join(p.name for p in profs)}")
        try:
            res = plan_devices(model, profs, quick=quick, out=out, n_cheap=n_cheap, n_full=n_full, candidates=plans,
                               realise=not no_realise, workdir=workdir or out.parent / "planner",
                               progress=lambda msg: con.print(msg, markup=False, highlight=False),
                               jsc=jsc, memory_mb=memory_mb, latency_ms=latency_ms, max_wer=max_wer,
                               voices=voices, data=data, ray=spec, students=student)
        except NoPlanFits as e:
            _summary(e.result, as_json)
            if as_json:
                echo_json({"plans": str(out), "exit_code": e.exit_code, "devices": e.result["devices"]})
            raise
        _summary(res, as_json)
        if as_json:
            echo_json({"plans": str(out), "exit_code": 0, "devices": res["devices"]})
        typer.echo(f"wrote {out}", err=as_json)


def speech_only(task: str, given: dict) -> None:
    """A UserError naming the first option given that only the speech task takes."""
    for name, v in given.items():
        if v:
            raise UserError(f"{name} applies to --task speech only, not --task {task}", f"drop {name}")


def _plan_task(task, model, jsc, profs, out: Path, workdir, quick, n_full, memory_mb, latency_ms, realise, plans,
               as_json: bool, con) -> None:
    """`semedge plan --task text|image`: compress/task_plan.py, the same plans.json format and exit codes."""
    from semedge.compress.planner import NoPlanFits
    from semedge.compress.task_plan import plan_task
    from semedge.compress.task_subjects import open_subject

    say = lambda msg: con.print(msg, markup=False, highlight=False)  # noqa: E731
    con.print(f"planning the {task} task ({model or 'the shipped image codec'}) for {len(profs)} device(s): "
              f"{', '.join(p.name for p in profs)}")
    subject = open_subject(task, model, jsc, workdir or out.parent / "planner")
    try:
        res = plan_task(subject, profs, quick=quick, out=out, n_eval=n_full, memory_mb=memory_mb,
                        latency_ms=latency_ms, realise=realise, candidates=plans, say=say)
    except NoPlanFits as e:
        _summary(e.result, as_json)
        if as_json:
            echo_json({"plans": str(out), "task": task, "exit_code": e.exit_code, "devices": e.result["devices"]})
        raise
    _summary(res, as_json)
    if as_json:
        echo_json({"plans": str(out), "task": task, "exit_code": 0, "devices": res["devices"]})
    typer.echo(f"wrote {out}", err=as_json)


def _summary(res: dict, to_stderr: bool = False) -> None:
    metric = (res.get("metric") or {}).get("primary", "wer")
    col = {"wer": "WER", "psnr": "PSNR", "similarity": "sim."}.get(metric, metric)
    typer.echo(f"{'device':18} {'mem MB':>7} {'ms':>6}  {'plan':22} {col:>6}  {'pred MB':>7} {'pred ms':>7}  note",
               err=to_stderr)
    for d, info in res["devices"].items():
        cid = info["chosen"] or info["closest"] or "-"
        p = info.get("predicted") or {}
        w = info.get("wer") if metric == "wer" else info.get("score")
        note = "" if info["fits"] else f"NO PLAN FITS ({info['failing_budget']}); closest shown"
        note += f"  [{info['ep']}]" if info.get("ep") else ""
        typer.echo(f"{d:18} {info['budgets']['memory_mb']:7.0f} {info['budgets']['latency_ms']:6.0f}  {cid:22} "
                   f"{'-' if w is None else f'{w:.3f}':>6}  {p.get('memory_mb', 0):7.0f} {p.get('latency_ms', 0):7.0f}  {note}", err=to_stderr)
