"""`semedge export`: the device half of a model -> a device package (folder + zip)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from semedge.cli_options import echo_json


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_cmd(
        model: str = typer.Option("whisper-base", "--model", help="built-in name or local checkpoint directory"),
        jsc: Optional[str] = typer.Option(None, "--jsc", help="JSC checkpoint folder ('identity' or none: the shipped default / identity)"),
        plan: Optional[Path] = typer.Option(None, "--plan", help="compression plan JSON (semedge plan)"),
        device: str = typer.Option(..., "--device", help="device profile name (device_profiles/NAME.yaml) or YAML path"),
        out: Path = typer.Option(..., "--out", help="package folder to write; <out>.zip is written beside it"),
        opset: int = typer.Option(17, "--opset", help="ONNX opset"),
        frontend: str = typer.Option("numpy", "--frontend", help="speech: numpy (the device computes log-mel, today's input) or "
                                     "graph (Whisper's log-mel inside device.onnx: the app feeds 16 kHz PCM; opset >= 17)"),
        fmt: Optional[str] = typer.Option(None, "--format", help="package format (default: the one the profile's first EP runs: fp16 for TensorRT/CUDA/CoreML, qdq_a8w8 for QNN/NNAPI, int8_dynamic for CPU/XNNPACK; also fp32, qdq_a16w8, int4; docs/targets.md)"),
        no_optimize: bool = typer.Option(False, "--no-optimize", help="skip the offline attention/GELU/LayerNorm fusions (default: build both graphs, keep the faster, timed at export)"),
        tail_frames: Optional[str] = typer.Option(None, "--tail-frames", help="identity JSC only: silence frames after the content the server decoder sees (e.g. 300; 'full': the 30 s window)"),
        sign: Optional[Path] = typer.Option(None, "--sign", help="signing.key (semedge keys new): sign the manifest (Ed25519); devices check it with --trust"),
        as_json: bool = typer.Option(False, "--json", help="print the package (path, id, bytes, precision, parity) as JSON"),
    ) -> None:
        """Export the device half to ONNX, check parity, and write a device package."""
        import dataclasses

        from rich.console import Console

        from semedge.core.files import scratch_dir
        from semedge.compress.targets import build_target_package, builtin_calibration, package_kind
        from semedge.export.package import package_bytes
        from semedge.runtime.profiles import load_profile

        con = Console(stderr=True)
        sign_key = None
        if sign is not None:  # a bad key fails before the model loads
            from semedge.runtime.trust import load_private_key

            sign_key = load_private_key(sign)

        def say(msg: str) -> None:
            con.print(f"[dim]…[/dim] {msg}")

        prof = load_profile(device)
        plan_obj = _read_plan(plan)
        kind = package_kind(prof, fmt, plan_obj, opset, frontend)  # bad input fails before the model loads
        if no_optimize:
            kind = dataclasses.replace(kind, fused=False)
        say(f"profile {prof.name}: {kind.format} package for {kind.first_ep}"
            + (", fixed shapes" if kind.fixed_shapes else "") + (", + .ort" if kind.ort_style else "")
            + (", log-mel in the graph (PCM input)" if kind.frontend == "graph" else ""))
        from semedge.semcom.checkpoint import device_encoder, load_for_inference
        from semedge.semcom.models import load_source
        from semedge.semcom.split import build_split

        say(f"loading {model}")
        loaded = load_source(model)
        loaded, ckpt = load_for_inference(loaded, jsc)
        split = build_split(loaded, ckpt.codec if ckpt is not None else None, encoder=device_encoder(ckpt))
        if tail_frames is not None:
            _set_tail(split, tail_frames)
        with scratch_dir(Path(out).expanduser().absolute().parent) as tmp:  # .scratch.PID.*.tmp beside the package
            if plan_obj is not None:
                from semedge.compress.plan import apply_torch_steps

                say(f"applying plan {plan_obj.name or plan}")
                split = apply_torch_steps(split, plan_obj, progress=True, workdir=tmp)
            pkg = build_target_package(split, prof, kind, out, opset=opset, plan=plan_obj, jsc_ckpt=ckpt.path if ckpt is not None else None,
                                       calib=lambda: builtin_calibration(loaded), calib_source=CALIB_SOURCE,
                                       sign_key=sign_key, progress=say)
        import json

        man = json.loads((pkg / "manifest.json").read_text())
        par = man["onnx"].get("parity")
        par_s = f"max|Δ| {par['max_abs']:.2e} ({par['max_abs_rel']:.1e} of scale), cos {par['cosine']:.6f}" if par else "parity: n/a"
        if par and not par["ok"]:
            con.print(f"[yellow]warning[/yellow] {man['target']['format']} symbols differ from PyTorch beyond its limits "
                      f"(cos {par['cosine']:.4f}, max|Δ| {par['max_abs_rel']:.2f} of scale): measure the package's "
                      "accuracy through the link before shipping it, or try another --format (docs/targets.md)")
        signed = " signed" if sign_key is not None else ""
        con.print(f"[green]package[/green] {man['package_id']} ({man['onnx']['precision']}){signed}")
        if as_json:
            echo_json({"package": str(pkg), "package_id": man["package_id"], "bytes": package_bytes(pkg),
                       "precision": man["onnx"]["precision"], "format": man["target"]["format"],
                       "parity": par, "signed": sign_key is not None, "frontend": man.get("frontend", {}).get("compute")})
            return
        typer.echo(f"{pkg}  {package_bytes(pkg)} bytes  {par_s}")


CALIB_SOURCE = "built-in train split, first 8 utterances (log-mel, 30 s windows)"


def _read_plan(plan: Optional[Path]):
    if plan is None:
        return None
    from semedge.core.errors import UserError

    try:
        from semedge.compress.plan import Plan
    except ImportError as e:
        raise UserError(f"--plan needs semedge.compress.plan, which is not available ({e})", "export without --plan") from None
    return Plan.from_json(plan)


def _set_tail(split, tail_frames: str) -> None:
    from semedge.core.errors import UserError
    from semedge.semcom.jsc import with_tail

    try:
        tail = None if tail_frames == "full" else int(tail_frames)
    except ValueError:
        raise UserError(f"--tail-frames {tail_frames!r} is not a number", "give e.g. --tail-frames 300, or full") from None
    with_tail(split.codec, tail)
