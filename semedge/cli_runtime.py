"""`semedge device run` (the device side: runner -> link -> server), `semedge serve`, and
`semedge export-image` (the image codec as a package `semedge serve` hosts).

`device run` imports no torch: it runs on the device with `pip install semedge[device]`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Optional

import typer

from semedge.cli_options import old_spelling, renamed
from semedge.core.errors import UserError

device_app = typer.Typer(no_args_is_help=True, help="Run a package on this device and talk to a server.")


def _messages(runner, pkg, wav, text, k_keep, segment_s: float | None) -> tuple[list, list | None]:
    """(symbols per message, [(start, end)] sample ranges or None): audio longer than `segment_s`
    (default: runtime.segment.default_segment_s) is cut at quiet points, one message per segment."""
    from semedge.semcom.tasks.registry import get_task

    modality = get_task(pkg.kind).modality  # the registry imports no torch
    if modality == "image":
        raise UserError(f"package {pkg.package_id} is an image model", "use --image photo.png")
    if wav is not None:
        if modality != "audio":
            raise UserError(f"package {pkg.package_id} is a text model", "use --text")
        from semedge.core.segment import default_segment_s, segment_bounds
        from semedge.semcom.tasks.speech import read_wav

        audio = read_wav(wav)
        bounds = segment_bounds(audio, segment_s or default_segment_s(pkg.identity))
        return [runner.encode_audio(audio[a:b], k_keep=k_keep) for a, b in bounds], bounds
    if modality != "text":
        raise UserError(f"package {pkg.package_id} is a speech model", "use --wav")
    return [runner.encode_text(text, k_keep=k_keep)], None


def _send_all(server: str, pkg, messages: list, timeout: float, token=None, ca=None, **link) -> list[dict]:
    """Each message in its own request, over one connection, in order; ?task= names the package's task.
    A LayoutMessage goes as its stream with its per-frame k (a layout message, runtime/client.py)."""
    from semedge.runtime.client import make_client, send

    def one(m, c):
        if hasattr(m, "stream"):
            return send(server, pkg.package_id, m.stream, timeout=timeout, client=c, task=pkg.kind, layout=m.k, **link)
        return send(server, pkg.package_id, m, timeout=timeout, client=c, task=pkg.kind, **link)

    with make_client(timeout, token=token, ca=ca) as c:
        return [one(m, c) for m in messages]


def _parse_device_k(k: Optional[str]) -> tuple[Optional[int], Optional[str]]:
    """--k: (k_keep, None) for a whole number, (None, "importance[:N]") for a per-frame layout."""
    from semedge.cli_transmit import _parse_k

    v = _parse_k(k)
    if v == "auto":
        raise UserError("--k auto is not built for device run", "give --k N or --k importance[:N]")
    return (None, v) if isinstance(v, str) else (v, None)


def _tokens(m) -> int:
    return len(m.k) if hasattr(m, "stream") else int(m.shape[0])


def _real_symbols(m) -> int:
    """Real channel symbols of a message (a layout's header included)."""
    return m.symbols if hasattr(m, "stream") else int(m.size)


def _rate_json(rate, messages: list) -> dict:
    """--k importance: the ladder, the budget and what the layouts spent (as `semedge transmit --json`)."""
    ks = [int(k) for m in messages for k in m.k]
    return {"policy": "importance", "ladder": list(rate.levels), "budget_symbols": rate.k_budget * len(ks),
            "header_symbols": sum(m.header for m in messages), "code_rate": rate.code_rate,
            "frames_per_level": {str(v): ks.count(v) for v in rate.levels}, "k_per_frame": [m.k.tolist() for m in messages]}


def _run_image(runner, pkg, image: Path, server: str, timeout: float, k_keep, link: dict, auth: dict) -> dict:
    """--image: the photo through the device half, the link and the server; the reconstruction
    is written beside it (<stem>.semedge.png). Returns what was sent and where the image went."""
    import base64
    import time

    from semedge.core.files import atomic_path
    from semedge.runtime.client import make_client, send
    from semedge.runtime.link import channel_uses
    from semedge.semcom.tasks.image import load_image

    if pkg.kind != "image":
        raise UserError(f"package {pkg.package_id} is a {pkg.kind} model, not an image model",
                        "use --wav or --text with it, or pass an image package")
    rgb = load_image(image)
    t0 = time.perf_counter()
    symbols = runner.encode_image(rgb, k_keep=k_keep)
    t_dev = time.perf_counter() - t0
    with make_client(timeout, **auth) as c:
        answer = send(server, pkg.package_id, symbols, timeout=timeout, client=c, task="image",
                      image_size=rgb.shape[:2], **link)
    out = image.with_name(f"{image.stem}.semedge.png")
    with atomic_path(out) as tmp:
        tmp.write_bytes(base64.b64decode(answer["image"][0]))  # the PNG as the server made it
    return {"output": str(out), "package": pkg.package_id, "height": int(rgb.shape[0]), "width": int(rgb.shape[1]),
            "tokens": int(symbols.shape[0]), "symbols_per_token": int(symbols.shape[1]),
            "channel_uses": channel_uses(symbols.size), "providers": runner.providers,
            "timings_ms": {"device": round(1000 * t_dev, 2), "server": answer["timings_ms"],
                           "total": round(1000 * (time.perf_counter() - t0), 2)}}


def _summed(timings: list[dict]) -> dict:
    """The server's timings summed over the requests (one request: as the server gave them)."""
    return {k: round(sum(t.get(k, 0.0) for t in timings), 3) for k in timings[0]}


def _result(pkg, runner, channel: str, snr_db: float, messages: list, bounds, answers: list, times: tuple) -> dict:
    from semedge.runtime.link import channel_uses
    from semedge.core.segment import describe, join_texts

    t_dev, t_all = times
    texts = [a["text"][0] for a in answers]
    out = {
        "text": join_texts(texts),
        "package": pkg.package_id,
        "channel": channel,
        "snr_db": snr_db if math.isfinite(snr_db) else "inf",
        "tokens": sum(_tokens(m) for m in messages),
        "symbols_per_token": int(messages[0].shape[1]) if not hasattr(messages[0], "stream") else "importance",
        "channel_uses": sum(channel_uses(_real_symbols(m)) for m in messages),
        "messages": len(messages),
        "providers": runner.providers,
        "timings_ms": {"device": round(1000 * t_dev, 2), "server": _summed([a["timings_ms"] for a in answers]),
                       "round_trip": round(1000 * (t_all - t_dev), 2), "total": round(1000 * t_all, 2)},
    }
    if bounds is not None:
        out["segments"] = [{**d, "text": t, "tokens": _tokens(m), "channel_uses": channel_uses(_real_symbols(m))}
                           for d, t, m in zip(describe(bounds), texts, messages)]
    return out


@device_app.command("run")
def device_run(
    package: Path = typer.Argument(..., help="the package folder (holds manifest.json)"),
    wav: Optional[Path] = typer.Option(None, help="an audio file to send (speech packages; longer than --segment-s: one message per segment)"),
    text: Optional[str] = typer.Option(None, help="a sentence to send (text packages)"),
    image: Optional[Path] = typer.Option(None, "--image", help="a PNG/JPEG to send (image packages); the server's "
                                         "reconstruction is written beside it (<stem>.semedge.png)"),
    server: str = typer.Option("http://127.0.0.1:8000", help="the server's base URL"),
    channel: str = typer.Option("awgn", help="link simulated on the device: none, awgn, rayleigh, rayleigh-fast, rician[:K=4], rician-fast[:K=4]"),
    snr: str = typer.Option("10", help="SNR in dB (Es/N0 per real symbol), or 'inf'"),
    k_keep: Optional[str] = typer.Option(None, "--k", help="send only the first K symbols per token (renormalised), or "
                                         "'importance[:N]' (per-frame k on a nested package's ladder, N per frame on "
                                         "average incl. the layout header; default N: the package's rate policy)"),
    k_keep_old: Optional[str] = old_spelling("--k-keep", "--k"),
    segment_s: Optional[float] = typer.Option(None, "--segment-s", help="audio longer than this is cut at quiet points and sent as several messages (1-30; default 30 for an identity-codec package, 6 for a trained codec)"),
    profile: Optional[str] = typer.Option(None, "--device", help="device profile (name or YAML path) whose execution providers and threads to use"),
    profile_old: Optional[str] = old_spelling("--profile", "--device"),
    ep: Optional[str] = typer.Option(None, "--ep", help="execution provider to run the device half on (cpu, xnnpack, "
                                     "cuda, tensorrt, qnn, nnapi, coreml); exit 2 if this onnxruntime build lacks it"),
    ep_option: Optional[List[str]] = typer.Option(None, "--ep-option", help="KEY=VALUE provider option for --ep (repeat)"),
    seed: Optional[int] = typer.Option(None, help="channel noise seed (default: random)"),
    dtype: str = typer.Option("float32", help="wire format of the symbols: float32 or float16"),
    timeout: float = typer.Option(60.0, help="seconds to wait for the server"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    trust: Optional[Path] = typer.Option(None, "--trust", help="signing.pub: refuse the package unless it is signed by this key"),
    token: Optional[str] = typer.Option(None, "--token", envvar="SEMEDGE_TOKEN", show_envvar=True,
                                        help="this device's bearer token for a server run with --auth"),
    ca: Optional[Path] = typer.Option(None, "--ca", help="the server's TLS certificate (PEM): trust only it (https)"),
):
    """Encode a message (a long recording: one per segment) with the package's ONNX device half, send it through the link to the server, print the text."""
    import time

    import numpy as np

    from semedge.runtime.package import Package
    from semedge.runtime.partition import check_session_ep
    from semedge.runtime.providers import ep_session_args
    from semedge.runtime.runner import DeviceRunner
    from semedge.core.channel_spec import parse_channel, parse_snr

    if sum(x is not None for x in (wav, text, image)) != 1:
        raise UserError("give exactly one of --wav, --text and --image",
                        "e.g. --wav hello.wav (speech), --text 'hello' (text) or --image photo.png (image)")
    snr_db = parse_snr(snr)
    parse_channel(channel)
    k_keep, per_frame = _parse_device_k(renamed(k_keep, k_keep_old, "--k", "--k-keep"))
    profile = renamed(profile, profile_old, "--device", "--profile")
    prof = None
    if profile is not None:
        from semedge.runtime.profiles import load_profile

        prof = load_profile(profile)
    wanted, extra, strict = ep_session_args(ep, ep_option, prof)
    pkg = Package.load(package, trust=trust)
    check_session_ep(wanted, extra, strict, pkg.manifest, str(package))
    runner = DeviceRunner(pkg, providers=wanted, threads=prof.threads if prof else None,
                          provider_options=extra, strict=strict)
    if k_keep is not None and not 1 <= k_keep <= pkg.k:
        raise UserError(f"--k {k_keep} is out of range for this package (k={pkg.k})", f"choose 1 to {pkg.k}")
    if image is not None and per_frame:
        raise UserError("--k importance is built for speech and text packages", "send the image with --k N or no --k")
    rate = None
    if per_frame:
        from semedge.runtime.runner import package_rate

        rate = package_rate(pkg, int(per_frame.split(":")[1]) if ":" in per_frame else None, snr_db)
    if image is not None:
        out = _run_image(runner, pkg, image, server, timeout, k_keep,
                         dict(channel=channel, snr_db=snr_db, rng=np.random.default_rng(seed), dtype=dtype),
                         dict(token=token, ca=str(ca) if ca else None))
        typer.echo(json.dumps(out) if as_json else f"wrote {out['output']}")
        return
    t0 = time.perf_counter()
    messages, bounds = _messages(runner, pkg, wav, text, k_keep, segment_s)
    if rate is not None:
        from semedge.runtime.runner import layout_message

        messages = [layout_message(m, rate, snr_db, pkg.power) for m in messages]
    t_dev = time.perf_counter() - t0
    answers = _send_all(server, pkg, messages, timeout, token=token, ca=str(ca) if ca else None, channel=channel, snr_db=snr_db, rng=np.random.default_rng(seed), dtype=dtype)
    result = _result(pkg, runner, channel, snr_db, messages, bounds, answers, (t_dev, time.perf_counter() - t0))
    if rate is not None:
        result["rate"] = _rate_json(rate, messages)
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(result["text"])
    parts = f" in {result['messages']} messages" if result["messages"] > 1 else ""
    if rate is not None:
        r = result["rate"]
        typer.echo(f"[layout: frames per k' {r['frames_per_level']}, {r['header_symbols']} header symbols, "
                   f"budget {r['budget_symbols']} symbols]", err=True)
    typer.echo(f"[{result['tokens']} tokens x {result['symbols_per_token']} symbols = {result['channel_uses']} channel uses{parts}, "
               f"{channel} {snr} dB; device {result['timings_ms']['device']:.0f} ms, "
               f"round trip {result['timings_ms']['round_trip']:.0f} ms]", err=True)


def serve(
    packages: Path = typer.Option(..., "--packages", help="a folder of package folders (each with manifest.json), or one package"),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, help="port (0: a free one)"),
    max_batch: int = typer.Option(8, help="most messages decoded together"),
    max_wait_ms: float = typer.Option(20.0, help="how long a message waits for others to batch with"),
    max_body_mb: float = typer.Option(8.0, help="largest request body (MiB); larger gets 413"),
    max_new_tokens: int = typer.Option(96, help="longest output (tokens)"),
    backend: str = typer.Option("auto", help="decoder: ct2 (CTranslate2, Whisper), torch, or auto (ct2 for Whisper, else torch)"),
    compute_type: str = typer.Option("int8", help="CTranslate2 weights: int8 or float32"),
    workers: int = typer.Option(1, help="batches decoded at the same time (2 on a 2-core host doubles throughput under load)"),
    threads: Optional[int] = typer.Option(None, help="CPU threads per batch (default 1 for ct2, torch's default for torch)"),
    log_level: str = typer.Option("info", help="uvicorn log level"),
    drain_s: float = typer.Option(30.0, "--drain-s", help="on SIGTERM: seconds accepted requests may take to finish (none are cut off before)"),
    trust: Optional[Path] = typer.Option(None, "--trust", help="signing.pub: refuse to start unless every package is signed by this key"),
    auth: Optional[Path] = typer.Option(None, "--auth", help="auth file (YAML): per-device bearer tokens, package scopes, limits (`semedge auth add`)"),
    ssl_certfile: Optional[Path] = typer.Option(None, "--ssl-certfile", help="TLS certificate (PEM): serve https"),
    ssl_keyfile: Optional[Path] = typer.Option(None, "--ssl-keyfile", help="TLS private key (PEM) for --ssl-certfile"),
    engine: str = typer.Option("local", "--engine", help="local (one process) or ray (Ray Serve: replicas, docs/scale.md)"),
    replicas: Optional[int] = typer.Option(None, "--replicas", help="ray: decoder replicas (default 1)"),
    autoscale: Optional[str] = typer.Option(None, "--autoscale", help="ray: MIN,MAX replicas, scaled on ongoing requests"),
    address: Optional[str] = typer.Option(None, "--address", help="ray: join this cluster (e.g. auto, ray://head:10001); default: start a local one"),
    ray_num_cpus: float = typer.Option(1.0, "--ray-num-cpus", help="ray: CPUs reserved per decoder replica"),
    ray_num_gpus: float = typer.Option(0.0, "--ray-num-gpus", help="ray: GPUs reserved per decoder replica"),
    memory: Optional[str] = typer.Option(None, "--memory", help="keep a memory per ?session=S whose text prompts the decoder: "
                                         "fifo, fresh, value, corr, or a sum like fresh+corr (docs/context.md)"),
    memory_items: int = typer.Option(8, "--memory-items", help="items per session memory (with --memory)"),
    kb: Optional[Path] = typer.Option(None, "--kb", help="knowledge-base folder (`semedge kb add`): its best passages "
                                      "prompt the decoder; updates apply without a restart"),
    context_guard: bool = typer.Option(False, "--context-guard", help="with --memory/--kb: decode each message without "
                                       "the prompt too, and answer that when the prompted text ran on or copied the prompt"),
):
    """Serve every package under --packages: POST /v1/decode?package=ID[&session=S], GET /healthz, GET /metrics."""
    from semedge.runtime.server import ServerConfig
    from semedge.runtime.server import serve as run_server

    if max_batch < 1 or max_wait_ms < 0 or max_body_mb <= 0 or max_new_tokens < 1:
        raise UserError("--max-batch, --max-new-tokens and --max-body-mb must be positive, --max-wait-ms >= 0",
                        "e.g. --max-batch 8 --max-wait-ms 8 --max-body-mb 8")
    if context_guard and not (memory or kb):
        raise UserError("--context-guard guards a prompt, and without --memory or --kb there is none",
                        "add --memory fifo or --kb DIR, or leave out --context-guard")
    import torch

    if threads is not None:
        torch.set_num_threads(max(1, threads))
    elif backend != "torch":  # the JSC decoder's small matmuls: one thread each, the cores go to the workers
        torch.set_num_threads(1)
    cfg = ServerConfig(max_body_bytes=int(max_body_mb * 1024 * 1024), max_batch=max_batch, max_wait_ms=max_wait_ms,
                       max_new_tokens=max_new_tokens, backend=backend, compute_type=compute_type, workers=workers,
                       threads=max(1, threads or 1), memory=memory, memory_items=memory_items,
                       kb=str(kb) if kb else None, context_guard=context_guard, drain_s=drain_s)
    if engine == "ray" or replicas or autoscale or address:
        return _serve_ray(packages, host, port, cfg, engine, trust=trust, replicas=replicas, autoscale=autoscale,
                          address=address, num_cpus=ray_num_cpus, num_gpus=ray_num_gpus, auth=auth,
                          unsupported={"--ssl-certfile": ssl_certfile, "--memory": memory, "--kb": kb,
                                       "--context-guard": context_guard or None})
    scheme = "https" if ssl_certfile else "http"
    typer.echo(f"serving {packages} on {scheme}://{host}:{port}" + (f" (auth: {auth})" if auth else ""), err=True)
    drained = run_server(packages, host=host, port=port, config=cfg, log_level=log_level, trust=trust, auth=auth,
                         ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
    _report_drain(drained, drain_s)


def _report_drain(d: dict, drain_s: float) -> None:
    """One line on stderr after the server stopped; exit 1 if accepted requests were cut off."""
    when = "" if d["in_flight_at_signal"] is None else f"{d['in_flight_at_signal']} in flight at the signal; "
    typer.echo(f"stopped: {when}{d['accepted']} requests accepted, {d['answered']} answered, "
               f"{d['cut_off']} cut off", err=True)
    if d["cut_off"]:
        typer.echo(f"error: {d['cut_off']} accepted requests did not finish within --drain-s {drain_s:g}", err=True)
        raise typer.Exit(1)


def _serve_ray(packages, host, port, cfg, engine, *, replicas, autoscale, unsupported, **kw) -> None:
    """`serve --engine ray`: options checked here, ray imported only now (runtime/ray_serve.py)."""
    if engine not in ("local", "ray"):
        raise UserError(f"--engine {engine} is unknown", "use --engine local or --engine ray")
    if engine != "ray":
        raise UserError("--replicas, --autoscale and --address need Ray Serve", "add --engine ray")
    given = [name for name, v in unsupported.items() if v]
    if given:
        raise UserError(f"{', '.join(given)} is not supported with --engine ray yet", "serve without it, or use --engine local")
    if replicas is not None and autoscale is not None:
        raise UserError("give --replicas or --autoscale, not both", "e.g. --replicas 2, or --autoscale 1,4")
    scale = None
    if autoscale is not None:
        try:
            scale = tuple(int(x) for x in autoscale.split(","))
            assert len(scale) == 2 and 1 <= scale[0] <= scale[1]
        except (ValueError, AssertionError):
            raise UserError(f"--autoscale {autoscale} is not MIN,MAX", "e.g. --autoscale 1,4 (1 <= MIN <= MAX)") from None
    if replicas is not None and replicas < 1:
        raise UserError(f"--replicas {replicas} must be >= 1", "e.g. --replicas 2")
    try:
        from semedge.runtime import ray_serve
    except ImportError as e:
        raise UserError(f"Ray Serve is not installed ({e})", "pip install 'semedge[full,scale]'") from None
    typer.echo(f"serving {packages} on http://{host}:{port} (Ray Serve)", err=True)
    ray_serve.serve_forever(packages, host=host, port=port, config=cfg, replicas=replicas, autoscale=scale, **kw)


def export_image(
    out: Path = typer.Option(..., "--out", help="package folder to write; <out>.zip is written beside it"),
    jsc: Optional[Path] = typer.Option(None, "--jsc", help="image codec folder (semedge train-image --out); default: the shipped one"),
    opset: int = typer.Option(17, "--opset", help="ONNX opset"),
    sign: Optional[Path] = typer.Option(None, "--sign", help="signing.key (semedge keys new): sign the manifest"),
    as_json: bool = typer.Option(False, "--json", help="print the package (path, id, parity) as JSON"),
):
    """Export the image codec's device half to ONNX (parity-checked) as a package `semedge serve` hosts."""
    from semedge.export.image_package import build_image_package
    from semedge.runtime.package import Package

    path = build_image_package(out, jsc, opset=opset, sign_key=sign, progress=lambda m: typer.echo(f"… {m}", err=True))
    pkg = Package.load(path)
    info = {"path": str(path), "package_id": pkg.package_id, "task": pkg.kind, "k": pkg.k,
            "parity": pkg.manifest["onnx"]["parity"]}
    typer.echo(json.dumps(info) if as_json else f"wrote {path} (package {pkg.package_id}, parity max |diff| "
                                                f"{info['parity']['max_abs']:.2e})")


def register(app: typer.Typer) -> None:
    from semedge.cli_profiles import bench_device_cmd

    device_app.command("bench")(bench_device_cmd)
    app.add_typer(device_app, name="device")
    app.command("serve")(serve)
    app.command("export-image")(export_image)
