"""`semedge transmit`: one utterance through device half -> channel -> server half."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer

from semedge.core.errors import UserError


def _parse_k(k: Optional[str]) -> Optional[str | int]:
    """None, "auto", "importance", "importance:N" or a positive int."""
    if k is None or k in ("auto", "importance"):
        return k
    budget = k[len("importance:"):] if k.startswith("importance:") else None
    try:
        v = int(k if budget is None else budget)
    except ValueError:
        raise UserError(f"--k must be a whole number, 'auto', 'importance' or 'importance:N', got {k!r}",
                        "e.g. --k 64, --k auto or --k importance:256") from None
    if v < 1:
        raise UserError(f"--k must be positive, got {v}", "e.g. --k 64")
    return v if budget is None else f"importance:{v}"


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
        kk = _check_nested_k(k_opt, ckpt)
    return None if kk == ckpt.k else kk


def _check_nested_k(kk: int, ckpt) -> int:
    """kk if the codec can send its first kk symbols (rate_min..k), else a UserError."""
    lo = (ckpt.manifest.get("rate_training") or {}).get("rate_min") or ckpt.k
    if not lo <= kk <= ckpt.k:
        parent = ckpt.manifest.get("cut_from") or {}
        more = f" (it was cut from {parent['folder']}, which sends up to {parent['k']})" if kk > ckpt.k and parent.get("folder") else ""
        raise UserError(f"--k {kk}: this codec sends {lo} to {ckpt.k} symbols per token", f"give --k between {lo} and {ckpt.k}, "
                        f"or pass --jsc with a codec trained for {kk}{more}")
    return kk


def _importance_rate(k_opt, ckpt, snr_db: float):
    """--k importance[:N]: a per-frame layout on the nested codec's ladder (rate_min, 2 rate_min, ..., k)
    at the budget of N symbols per frame (default: what --k auto sends at this SNR)."""
    from semedge.semcom.importance import ImportanceRate, ladder
    from semedge.semcom.rate import choose_k

    lo = (ckpt.manifest.get("rate_training") or {}).get("rate_min") if ckpt is not None else None
    if lo is None or lo >= ckpt.k:
        what = "the identity codec" if ckpt is None else f"codec {ckpt.path} (k={ckpt.k})"
        raise UserError(f"--k {k_opt} needs a nested codec (trained with --rate-min), and {what} is not one",
                        "pass --jsc with a codec trained with --rate-min (e.g. runs/msg512-mix), or use --k auto")
    budget = choose_k(ckpt, snr_db) if k_opt == "importance" else _check_nested_k(int(k_opt.split(":")[1]), ckpt)
    return ImportanceRate(ladder(ckpt.k, lo), budget)


def _inputs(loaded, model: str, text, wav, segment_s: float) -> tuple[list, list | None]:
    """(messages, [(start, end)] sample ranges or None): speech longer than `segment_s` is cut
    at quiet points (core.segment) and each segment is sent as its own message."""
    if loaded.task.modality != "audio":  # the message is the text itself
        if wav is not None:
            raise UserError(f"{model} is a text model; --wav needs a speech model", "pass --text instead")
        return [text], None
    from semedge.core.segment import segment_bounds
    from semedge.semcom.tasks.speech import read_wav, synthesize

    audio = synthesize(text) if text is not None else read_wav(wav)
    bounds = segment_bounds(audio, segment_s)
    return [audio[a:b] for a, b in bounds], bounds


def _reference(split, inputs, text, reference, tokens: int) -> tuple[str, str]:
    from semedge.core.segment import join_texts
    from semedge.semcom.system import unsplit_outputs

    if text is not None:
        return text, "text"
    if reference is not None:
        return reference, "given"
    return join_texts(unsplit_outputs(split, inputs, max_new_tokens=tokens)), "unsplit-model"


def _segments_json(bounds, res) -> list[dict]:
    from semedge.core.segment import describe

    return [{**d, "transcript": h, "symbols_sent": s, "tokens_sent": t}
            for d, h, s, t in zip(describe(bounds), res.hyps, res.symbols_sent, res.tokens_sent)]


def _layout_json(rate, res) -> dict:
    """--k importance: the ladder, the budget, and what the layouts spent (header included in symbols_sent)."""
    lays = res.extra["layouts"]
    ks = [k for lay in lays for k in lay["k"]]
    return {"policy": "importance", "ladder": list(rate.levels), "budget_symbols": rate.k_budget * len(ks),
            "header_symbols": sum(lay["header"] for lay in lays), "code_rate": rate.code_rate,
            "frames_per_level": {str(v): ks.count(v) for v in rate.levels}, "k_per_frame": [lay["k"] for lay in lays]}


def _k_text(out: dict) -> str:
    return f"importance, at most {out['k']} on average" if "rate" in out else str(out["k"])


def _print(out: dict, snr: str) -> None:
    segs = out.get("segments") or []
    if len(segs) > 1:
        for i, sg in enumerate(segs):
            typer.echo(f"segment {i + 1}/{len(segs)} {sg['start_s']:.1f}-{sg['end_s']:.1f} s: {sg['transcript']}")
    typer.echo(f"transcript : {out['transcript']}")
    typer.echo(f"reference  : {out['reference']}  ({out['reference_source']})")
    parts = f" in {len(segs)} messages" if len(segs) > 1 else ""
    if "rate" in out:
        r = out["rate"]
        typer.echo(f"layout     : frames per k' {r['frames_per_level']}, {r['header_symbols']} header symbols "
                   f"(BPSK, rate-{r['code_rate']:g} code), budget {r['budget_symbols']} symbols")
    typer.echo(
        f"WER {out['wer']:.3f}  BLEU {out['bleu']:.1f}  similarity {out['similarity']:.3f}  |  "
        f"{out['channel']} {snr} dB, {out['symbols_sent']} real symbols ({out['tokens_sent']} tokens x k={_k_text(out)}){parts}, codec {out['codec']}"
    )


def transmit(
    model: Optional[str] = typer.Option(None, help="model source: whisper-base (default), whisper-tiny.en, minilm-whisper-base (default of --task text), a local HF checkpoint dir, or a hub id"),
    channel: str = typer.Option("awgn", help="none, awgn, rayleigh, rayleigh-fast, rician[:K=4], rician-fast[:K=4]"),
    snr: str = typer.Option("10", help="SNR in dB (Es/N0 per real symbol), or 'inf'"),
    text: Optional[str] = typer.Option(None, help="text to speak with espeak-ng (speech models) or to send (text models)"),
    wav: Optional[Path] = typer.Option(None, help="an audio file to send (speech models; WAV/FLAC/OGG, any rate; longer than --segment-s: several messages)"),
    reference: Optional[str] = typer.Option(None, help="reference transcript for --wav (default: the unsplit model's own output)"),
    k: Optional[str] = typer.Option(None, help="symbols per token to send: up to the codec's k (down to its --rate-min), 'auto' (rate policy by SNR), or "
                                                  "'importance[:N]' (per-frame k on a nested codec's ladder, N per frame on average incl. signalling; default N: auto's)"),
    jsc: Optional[Path] = typer.Option(None, help="a JSC checkpoint (safetensors + manifest) from `semedge train` (--task text: from python -m semedge.semcom.text_codec; default the shipped text codec)"),
    frames: str = typer.Option("content", help="speech: 'content' (utterance frames + shared silence fill) or 'all' (the padded 30 s window)"),
    segment_s: Optional[float] = typer.Option(None, "--segment-s", help="speech longer than this is cut at quiet points into segments, each sent as its own message (1-30; default 30 for --jsc identity, 6 for a trained codec)"),
    seed: int = typer.Option(0, help="channel noise seed"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    task: str = typer.Option("speech", "--task", help="speech (by --model: speech or text models), text (--text through the shipped MiniLM + Whisper-decoder codec) or image (--image)"),
    image: Optional[Path] = typer.Option(None, "--image", help="--task image: a PNG/JPEG to send; the reconstruction is written beside it (<stem>.semedge.png)"),
):
    """Send one message (a long recording: one per segment) through device half -> channel -> server half; print the output and metrics."""
    from semedge.core.channel_spec import parse_channel, parse_snr

    snr_db = parse_snr(snr)
    parse_channel(channel)
    if task == "image" or image is not None:
        return _transmit_image(task, image, channel, snr_db, seed, jsc, as_json)
    model, jsc = _task_defaults(task, model, jsc, wav)
    k_opt = _parse_k(k)
    if frames not in ("content", "all"):
        raise UserError(f"--frames must be 'content' or 'all', got {frames!r}", "use --frames content")
    if (text is None) == (wav is None):
        raise UserError("give exactly one of --text or --wav", 'e.g. --text "the boy threw the ball"')

    from semedge.core.segment import default_segment_s, join_texts, new_tokens_for
    from semedge.semcom.checkpoint import device_encoder, load_for_inference
    from semedge.semcom.models import load_source
    from semedge.semcom.split import build_split
    from semedge.semcom.system import run_link

    loaded = load_source(model)
    if task == "text" and loaded.task.modality != "text":
        raise UserError(f"--task text: --model {model} is a {loaded.kind} model", "drop --model (minilm-whisper-base) or give a text model")
    receiver, ckpt = load_for_inference(loaded, None if jsc is None else str(jsc))
    per_frame = isinstance(k_opt, str) and k_opt.startswith("importance")
    rate = _importance_rate(k_opt, ckpt, snr_db) if per_frame else None
    k_keep = None if per_frame else _k_to_send(k_opt, ckpt, loaded, snr_db)
    inputs, bounds = _inputs(loaded, model, text, wav, segment_s or default_segment_s(ckpt is None))
    split = build_split(receiver, None if ckpt is None else ckpt.codec, encoder=device_encoder(ckpt))
    tokens = new_tokens_for(max(len(a) for a in inputs) / 16000) if bounds else 96
    res = run_link(split, inputs, channel=channel, snr_db=snr_db, k_keep=k_keep, frames=frames, seed=seed,
                   max_new_tokens=tokens, rate=rate)
    hyp = join_texts(res.hyps)
    ref, ref_source = _reference(split, inputs, text, reference, tokens)

    from semedge.semcom.metrics import score
    from semedge.semcom.text_baseline import exact_match

    m = score([ref], [hyp])
    out = {
        "transcript": hyp, "reference": ref, "reference_source": ref_source,
        "wer": m["wer"], "bleu": m["bleu"], "similarity": m["similarity"], "exact_match": exact_match([ref], [hyp])[0],
        "snr_db": snr_db if math.isfinite(snr_db) else "inf", "channel": channel,
        "symbols_sent": sum(res.symbols_sent), "tokens_sent": sum(res.tokens_sent),
        "channel_uses": sum((x + 1) // 2 for x in res.symbols_sent), "messages": len(inputs),
        "k": k_keep or split.k, "model": loaded.source,
        "codec": "identity" if split.codec.cfg.identity else f"jsc k={split.k}",
    }
    if rate is not None:
        out.update(k=rate.k_budget, rate=_layout_json(rate, res))
    if bounds is not None:
        out["segments"] = _segments_json(bounds, res)
    if as_json:
        typer.echo(json.dumps(out))
        return
    _print(out, snr)


def _task_defaults(task: str, model: Optional[str], jsc: Optional[Path], wav) -> tuple[str, Optional[Path]]:
    """(model, jsc) for `task`: speech -> whisper-base; text -> minilm-whisper-base with the shipped text codec."""
    from semedge.semcom.models import PAIR_SOURCE
    from semedge.semcom.tasks.text import DEFAULT_CODEC

    if task not in ("speech", "text"):
        raise UserError(f"--task {task!r} is unknown", "use --task speech, --task text or --task image")
    if task == "speech":
        return model or "whisper-base", jsc
    if wav is not None:
        raise UserError("--task text sends --text, not --wav", 'e.g. --task text --text "the boy threw the ball"')
    model = model or PAIR_SOURCE
    if jsc is None and model == PAIR_SOURCE:
        if not (DEFAULT_CODEC / "manifest.json").is_file():
            raise UserError(f"the shipped text codec is missing ({DEFAULT_CODEC})",
                            "reinstall semedge, or train one: python -m semedge.semcom.text_codec --out DIR, and pass --jsc DIR")
        jsc = DEFAULT_CODEC
    return model, jsc


def _transmit_image(task: str, image: Optional[Path], channel: str, snr_db: float, seed: int, jsc: Optional[Path],
                    as_json: bool) -> None:
    """--task image: the image through the image codec (the shipped one, or --jsc DIR from `semedge train-image`)."""
    if task != "image" or image is None:
        raise UserError("--image goes with --task image, and --task image needs --image", "e.g. --task image --image photo.png")
    from semedge.semcom.tasks.image import transmit_image

    out = transmit_image(image, channel, snr_db, seed, codec_dir=jsc)
    if as_json:
        typer.echo(json.dumps(out))
        return
    typer.echo(f"wrote {out['output']}")
    typer.echo(f"PSNR {out['psnr']:.2f} dB  SSIM {out['ssim']:.3f}  |  {out['channel']} {out['snr_db']} dB, "
               f"{out['channel_uses']} channel uses ({out['channel_uses_per_pixel']:.3f} per pixel), codec {out['codec']}")


def register(app: typer.Typer) -> None:
    app.command("transmit")(transmit)
