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
        no_optimize: bool = typer.Option(False, "--no-optimize", help="skip the offline attention/GELU/LayerNorm fusions (default: build both graphs, keep the faster, timed at export)"),
        tail_frames: Optional[str] = typer.Option(None, "--tail-frames", help="identity JSC only: silence frames after the content the server decoder sees (e.g. 300; 'full': the 30 s window)"),
        sign: Optional[Path] = typer.Option(None, "--sign", help="signing.key (semedge keys new): sign the manifest (Ed25519); devices check it with --trust"),
        as_json: bool = typer.Option(False, "--json", help="print the package (path, id, bytes, precision, parity) as JSON"),
    ) -> None:
        """Export the device half to ONNX, check parity, and write a device package."""
        import tempfile

        from rich.console import Console

        from semedge.export.package import build_package, package_bytes
        from semedge.runtime.profiles import load_profile
        from semedge.core.errors import UserError

        con = Console(stderr=True)
        sign_key = None
        if sign is not None:  # a bad key fails before the model loads
            from semedge.runtime.trust import load_private_key

            sign_key = load_private_key(sign)

        def say(msg: str) -> None:
            con.print(f"[dim]…[/dim] {msg}")

        prof = load_profile(device)
        say(f"profile {prof.name}")
        from semedge.semcom.checkpoint import load_for_inference
        from semedge.semcom.models import load_source
        from semedge.semcom.split import build_split

        say(f"loading {model}")
        loaded = load_source(model)
        loaded, ckpt = load_for_inference(loaded, jsc)
        from semedge.semcom.checkpoint import device_encoder

        split = build_split(loaded, ckpt.codec if ckpt is not None else None, encoder=device_encoder(ckpt))
        if tail_frames is not None:
            from semedge.semcom.jsc import with_tail

            try:
                tail = None if tail_frames == "full" else int(tail_frames)
            except ValueError:
                raise UserError(f"--tail-frames {tail_frames!r} is not a number", "give e.g. --tail-frames 300, or full") from None
            with_tail(split.codec, tail)
        plan_obj, onnx_path, report = None, None, None
        with tempfile.TemporaryDirectory(prefix="semedge-export-") as tmp:
            if plan is not None:
                try:
                    from semedge.compress.plan import Plan, apply_onnx_steps, apply_torch_steps
                except ImportError as e:
                    raise UserError(f"--plan needs semedge.compress.plan, which is not available ({e})", "export without --plan") from None
                plan_obj = Plan.from_json(plan)
                say(f"applying plan {plan_obj.name or plan}")
                split = apply_torch_steps(split, plan_obj, progress=True, workdir=tmp)
                from semedge.export.onnx import export_device_half

                report = export_device_half(split, Path(tmp) / "fp32.onnx", opset=opset, optimize=False if no_optimize else "auto", progress=say)
                onnx_path = apply_onnx_steps(report.path, Path(tmp) / "device.onnx", plan_obj)
                if Path(onnx_path) == report.path or not plan_obj.ops(("quantize_onnx",)):
                    pass  # fp32 graph: the export's parity stands
                else:
                    report = None  # quantized: its parity is compress/'s to record
            pkg = build_package(split, out, onnx_path=onnx_path, plan=plan_obj, profile=prof.name,
                                jsc_ckpt=ckpt.path if ckpt is not None else None, export_report=report,
                                opset=opset, optimize=False if no_optimize else "auto", progress=say,
                                sign_key=sign_key)
        import json

        man = json.loads((pkg / "manifest.json").read_text())
        par = man["onnx"].get("parity")
        par_s = f"max|Δ| {par['max_abs']:.2e} ({par['max_abs_rel']:.1e} of scale), cos {par['cosine']:.6f}" if par else "parity: n/a"
        signed = " signed" if sign_key is not None else ""
        con.print(f"[green]package[/green] {man['package_id']} ({man['onnx']['precision']}){signed}")
        if as_json:
            echo_json({"package": str(pkg), "package_id": man["package_id"], "bytes": package_bytes(pkg),
                       "precision": man["onnx"]["precision"], "parity": par, "signed": sign_key is not None})
            return
        typer.echo(f"{pkg}  {package_bytes(pkg)} bytes  {par_s}")
