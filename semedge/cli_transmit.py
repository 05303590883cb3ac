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


def _k_to_send(k_opt, ckpt, loaded, snr_db: float) -> int | None:
    """Symbols per token to send (None: all of the codec's k). --k N sends the first N of a
    nested codec (trained with --rate-min); --k auto asks the codec's rate policy."""
    from semedge.semcom.rate import choose_k

    if k_opt is None:
        return None
    if ckpt is None:  # identity codec: k = d_model, nothing to choose
        if k_opt in ("auto", loaded.d_model):
            return None
        raise UserError(f"no trained codec ships for {loaded.source}, so --k {k_opt} cannot be sent",
                        f"train one (semedge train --model {loaded.source} --k {k_opt} --rate-min ...) and pass --jsc, or drop --k")
    if k_opt == "auto":
        kk = choose_k(ckpt, snr_db)
    else:
        kk = k_opt
        lo = (ckpt.manifest.get("rate_training") or {}).get("rate_min") or ckpt.k
        if not lo <= kk <= ckpt.k:
            parent = ckpt.manifest.get("cut_from") or {}
            more = f" (it was cut from {parent['folder']}, which sends up to {parent['k']})" if kk > ckpt.k and parent.get("folder") else ""
            raise UserError(f"--k {kk}: this codec sends {lo} to {ckpt.k} symbols per token", f"give --k between {lo} and {ckpt.k}, "
                            f"or pass --jsc with a codec trained for {kk}{more}")
    return None if kk == ckpt.k else kk


def transmit(
    model: str = typer.Option("whisper-base", help="model source: whisper-base, whisper-tiny.en, a local HF checkpoint dir, or a hub id"),
    channel: str = typer.Option("awgn", help="none, awgn, rayleigh, rayleigh-fast, rician[:K=4], rician-fast[:K=4]"),
    snr: str = typer.Option("10", help="SNR in dB (Es/N0 per real symbol), or 'inf'"),
    text: Optional[str] = typer.Option(None, help="text to speak with espeak-ng (speech models) or to send (text models)"),
    wav: Optional[Path] = typer.Option(None, help="a WAV file to send (speech models)"),
    reference: Optional[str] = typer.Option(None, help="reference transcript for --wav (default: the unsplit model's own output)"),
    k: Optional[str] = typer.Option(None, help="symbols per token to send: up to the codec's k (down to its --rate-min), or 'auto' (rate policy by SNR)"),
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

    receiver, ckpt = load_for_inference(loaded, None if jsc is None else str(jsc))
    k_keep = _k_to_send(k_opt, ckpt, loaded, snr_db)
    from semedge.semcom.checkpoint import device_encoder

    split = build_split(receiver, None if ckpt is None else ckpt.codec, encoder=device_encoder(ckpt))
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
