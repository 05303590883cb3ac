"""CLI: `semedge build` (plan → package → profile → evaluate → report) and `semedge demo`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from semedge.cli_options import echo_json
from semedge.core.errors import UserError

DEMO_MODEL = "whisper-base"
DEMO_OUT = "build"


def _shipped_profiles() -> Path:
    from semedge.runtime.profiles import profiles_dir

    return profiles_dir()


def _devices(values: Optional[List[str]]) -> list[str] | None:
    if not values:
        return None
    out = [v.strip() for s in values for v in s.split(",") if v.strip()]
    if not out:
        raise UserError("--devices is empty", "name devices, e.g. --devices watch,android-mid")
    return out


def _summary(record: dict, to_stderr: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    m = (record.get("metric") or {}).get("primary", "wer")
    label = {"wer": "WER", "psnr": "PSNR (dB)", "similarity": "similarity"}.get(m, m)
    task = record.get("task", "speech")
    t = Table(title=f"semedge build: {record['model']}" + ("" if task == "speech" else f" ({task} task)"), show_lines=False)
    for col in ("device", "fits", "plan", "package", "pred. latency", "host p50", "peak RSS", f"{label} at device SNRs"):
        t.add_column(col)
    for name, d in record["devices"].items():
        pkg = d.get("package") or {}
        host = d.get("host") or {}
        pred = d.get("predicted") or {}
        wer = "; ".join(f"{s} dB {a[m]:.3f}" for s, a in (d.get("accuracy") or {}).items() if a.get(m) is not None)
        t.add_row(name, "yes" if d["fits"] else f"no ({d.get('failing_budget') or 'budget'})", d.get("describe") or "–",
                  f"{pkg['bytes'] / 1e6:.1f} MB" if pkg else "–",
                  f"{pred['latency_ms']:.0f} ms" if pred.get("latency_ms") is not None else "–",
                  f"{host['latency_ms_p50']:.0f} ms" if host.get("latency_ms_p50") is not None else "–",
                  f"{host['peak_rss_mb']:.0f} MB" if host.get("peak_rss_mb") is not None else "–", wer or "–")
    c = Console(stderr=to_stderr)
    c.print(t)
    skipped = [k for k, v in (record.get("stages") or {}).items() if v.get("skipped")]
    if skipped:
        c.print(f"up to date (skipped): {', '.join(skipped)}")
    c.print(f"build took {record['timing']['seconds']:.0f} s")


def _run(model, profiles, out, devices, quick, plans, jsc, n_eval, progress, strict: bool = True,
         plan_quick: bool | None = None, voices: str = "mix", data=None, as_json: bool = False, ray=None,
         task: str = "speech") -> dict:
    if task == "speech":
        from semedge.pipeline import build as run_build

        record = run_build(model, profiles, out, devices=_devices(devices), quick=quick, progress=progress, plans=plans,
                           jsc=jsc, n_eval=n_eval, plan_quick=plan_quick, voices=voices, data=data, ray=ray)
    else:
        from semedge.task_build import build_task

        record = build_task(task, model, profiles, out, _devices(devices), quick=quick, plans=plans, jsc=jsc,
                            n_eval=n_eval, progress=progress)
    _summary(record, as_json)
    typer.echo(f"Report: {Path(out) / record['report']}", err=as_json)
    if as_json:
        echo_json({"build": str(Path(out) / "build.json"), "report": str(Path(out) / record["report"]), "task": task,
                   "exit_code": record.get("exit_code", 0), "unfit": record.get("unfit", []),
                   "devices": record["devices"]})
    if record.get("exit_code"):
        typer.echo(f"no plan fits: {', '.join(record['unfit'])} (packages built for the others)", err=True)
        if strict:  # build: exit 3; the demo still succeeds, the report marks those devices
            raise typer.Exit(record["exit_code"])
    return record


def build(
    model: Optional[str] = typer.Option(None, help="speech: a Whisper model (default whisper-base); text: a text seq2seq (required); image: a `semedge train-image` folder (default: the shipped codec)"),
    task: str = typer.Option("speech", "--task", help="speech, text or image (one task per run; docs/tasks.md)"),
    profiles: Path = typer.Option(None, help="device profiles folder (default: the shipped device_profiles/)"),
    out: Path = typer.Option(Path(DEMO_OUT), help="output folder (plans.json, packages/, report/, build.json)"),
    devices: Optional[List[str]] = typer.Option(None, help="devices to build for (comma-separated or repeated; default all)"),
    quick: bool = typer.Option(False, help="fewer candidates, utterances, SNRs and timing runs"),
    plans: Optional[Path] = typer.Option(None, help="use this plans.json instead of running the planner"),
    jsc: Optional[str] = typer.Option(None, help="JSC codec: a checkpoint folder, 'default' or 'identity' (default: shipped, else identity)"),
    n_eval: Optional[int] = typer.Option(None, help="test examples for accuracy (speech: utterances, default 16, --quick 4; image: patches, 64 / 8; text: sentences, 24 / 8)"),
    progress: bool = typer.Option(True, help="progress bars"),
    as_json: bool = typer.Option(False, "--json", help="print the result (build.json's devices, report, exit code) as JSON; the table goes to stderr"),
    voices: str = typer.Option("mix", help="voice families of the built-in splits: mix, espeak, piper, flite or a+b (docs/data.md)"),
    data: Optional[Path] = typer.Option(None, help="plan and evaluate on your recordings (audiofolder: metadata.csv with file_name,transcription)"),
    ray: bool = typer.Option(False, "--ray", help="the planner's builds and evaluations as Ray tasks (docs/scale.md); same plans.json"),
    address: Optional[str] = typer.Option(None, "--address", help="with --ray: join this cluster (e.g. auto); default: a local one"),
    ray_workers: Optional[int] = typer.Option(None, "--ray-workers", help="with --ray: planner workers, 1 CPU each (default 2)"),
):
    """Plan, compress, export, package, profile and evaluate per device; write a report. Exit 3 if some device has no plan that fits."""
    from semedge.cli_compress import speech_only
    from semedge.compress.fanout import ray_spec
    from semedge.compress.task_subjects import check_task_model, parse_task

    task = parse_task(task)
    model = check_task_model(task, model)
    if task != "speech":
        speech_only(task, {"--data": data, "--ray": ray or None, "--voices": None if voices == "mix" else voices})
    _run(model, profiles or _shipped_profiles(), out, devices, quick, plans, jsc, n_eval, progress, voices=voices, data=data,
         as_json=as_json, ray=ray_spec(ray, address, ray_workers), task=task)


def demo(
    out: Path = typer.Option(Path(DEMO_OUT), help="output folder"),
    progress: bool = typer.Option(True, help="progress bars"),
):
    """`semedge build` on whisper-base and the shipped device profiles; prints where the report is.

    The planner runs its quick candidate space (28 plans, each device offered those its first EP runs; small samples) so the demo fits in
    about half an hour on 2 cores; evaluation of the chosen packages uses the full settings."""
    _run(DEMO_MODEL, _shipped_profiles(), out, None, False, None, None, None, progress, strict=False, plan_quick=True)


def register(app: typer.Typer) -> None:
    app.command("build")(build)
    app.command("demo")(demo)
