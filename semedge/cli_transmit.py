"""`semedge transmit`: one utterance through device half -> channel -> server half."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer

from semedge.semcom.errors import UserError


def _parse_k(k: Optional[str]) -> Optional[str | int]:
    if k is None or k == "auto":
        return k
    try:
        v = int(k)
    except ValueError:
        raise UserError(f"--k must be a whole number or 'auto', got {k!r}", "e.g. --k 64 or --k auto") from None
    if v < 1:
        raise UserError(f"--k must be positive, got {v}", "e.g. --k 64")
    return v


def transmit(
    model: str = typer.Option("whisper-base", help="model source: whisper-base, whisper-tiny.en, a local HF checkpoint dir, or a hub id"),
    channel: str = typer.Option("awgn", help="none, awgn, rayleigh, rayleigh-fast, rician[:K=4], rician-fast[:K=4]"),
    snr: str = typer.Option("10", help="SNR in dB (Es/N0 per real symbol), or 'inf'"),
    text: Optional[str] = typer.Option(None, help="text to speak with espeak-ng (speech models) or to send (text models)"),
    wav: Optional[Path] = typer.Option(None, help="a WAV file to send (speech models)"),
    reference: Optional[str] = typer.Option(None, help="reference transcript for --wav (default: the unsplit model's own output)"),
    k: Optional[str] = typer.Option(None, help="symbols per token: a number the codec was trained with, or 'auto' (rate policy by SNR)"),
    jsc: Optional[Path] = typer.Option(None, help="a JSC checkpoint (safetensors + manifest) from `semedge train`"),
    frames: str = typer.Option("content", help="speech: 'content' (utterance frames + shared silence fill) or 'all' (the padded 30 s window)"),
    seed: int = typer.Option(0, help="channel noise seed"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
):
    """Send one message through device half -> channel -> server half; print the output and metrics."""
    from semedge.semcom.channel_spec import parse_channel, parse_snr

    snr_db = parse_snr(snr)
    parse_channel(channel)
    k_opt = _parse_k(k)
    if frames not in ("content", "all"):
        raise UserError(f"--frames must be 'content' or 'all', got {frames!r}", "use --frames content")
    if (text is None) == (wav is None):
        raise UserError("give exactly one of --text or --wav", 'e.g. --text "the boy threw the ball"')

    from semedge.semcom.models import load_model

    loaded = load_model(model)
    if loaded.kind == "speech":
        from semedge.semcom.tasks.speech import read_wav, synthesize

        audio = synthesize(text) if text is not None else read_wav(wav)
        inputs = [audio]
    else:
        if wav is not None:
            raise UserError(f"{model} is a text model; --wav needs a speech model", "pass --text instead")
        inputs = [text]

    from semedge.semcom.split import build_split
    from semedge.semcom.system import run_link, unsplit_outputs

    from semedge.semcom.checkpoint import load_for_inference

    # --k N with no --jsc: the shipped codec if its k is N, else a clear error; --k auto: rate policy.
    k_ckpt = k_opt if isinstance(k_opt, int) and k_opt != loaded.d_model else None
    receiver, ckpt = load_for_inference(loaded, None if jsc is None else str(jsc), k=k_ckpt)
    if ckpt is None and k_ckpt is not None:
        raise UserError(
            f"no trained codec with k={k_opt} ships for {loaded.source}",
            f"train one (semedge train --model {loaded.source} --k {k_opt}) and pass --jsc, or drop --k",
        )
    from semedge.semcom.checkpoint import device_encoder

    split = build_split(receiver, None if ckpt is None else ckpt.codec, encoder=device_encoder(ckpt))
    k_keep = None
    if k_opt == "auto":
        from semedge.semcom.rate import pick_k

        k_keep = pick_k(split.codec, snr_db)
    res = run_link(split, inputs, channel=channel, snr_db=snr_db, k_keep=k_keep, frames=frames, seed=seed)
    hyp = res.hyps[0]
    if text is not None:
        ref, ref_source = text, "text"
    elif reference is not None:
        ref, ref_source = reference, "given"
    else:
        ref, ref_source = unsplit_outputs(split, inputs)[0], "unsplit-model"

    from semedge.semcom.metrics import score

    m = score([ref], [hyp])
    out = {
        "transcript": hyp,
        "reference": ref,
        "reference_source": ref_source,
        "wer": m["wer"],
        "bleu": m["bleu"],
        "similarity": m["similarity"],
        "snr_db": snr_db if math.isfinite(snr_db) else "inf",
        "channel": channel,
        "symbols_sent": res.symbols_sent[0],
        "tokens_sent": res.tokens_sent[0],
        "k": k_keep or split.k,
        "model": loaded.source,
        "codec": "identity" if split.codec.cfg.identity else f"jsc k={split.k}",
    }
    if as_json:
        typer.echo(json.dumps(out))
        return
    typer.echo(f"transcript : {hyp}")
    typer.echo(f"reference  : {ref}  ({ref_source})")
    typer.echo(
        f"WER {m['wer']:.3f}  BLEU {m['bleu']:.1f}  similarity {m['similarity']:.3f}  |  "
        f"{channel} {snr} dB, {out['symbols_sent']} real symbols ({out['tokens_sent']} tokens x k={out['k']}), codec {out['codec']}"
    )


def register(app: typer.Typer) -> None:
    app.command("transmit")(transmit)
