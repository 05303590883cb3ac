"""`semedge train`, `semedge eval` and `semedge rate`: train a JSC codec (+ LoRA/QLoRA) through the channel; measure it.

The training options take their defaults from TrainConfig (torch-free, so start-up stays fast)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer

from semedge.core.errors import UserError
from semedge.semcom.training.config import TrainConfig

_D = TrainConfig()  # the defaults of `semedge train`


def _trailing_numbers(args: list[str], option: str) -> list[float]:
    """Values after the first of `option` (`--snr -5 0 5`): click hands the rest over as extra args."""
    out = []
    for a in args:
        try:
            out.append(float(a))
        except ValueError:
            raise UserError(f"unexpected argument {a!r}", f"{option} takes numbers (e.g. {option} -5 0 5 10); see --help") from None
    return out


def _threads(n: Optional[int]) -> None:
    if n is not None:
        import torch

        if n < 1:
            raise UserError(f"--threads {n} must be >= 1", "give e.g. --threads 1")
        torch.set_num_threads(n)


def _eval_data(data: Optional[Path], n: Optional[int], segment_s: Optional[float]):
    """The user's recordings for `semedge eval --data` (all rows checked first), or None for the built-in split."""
    if segment_s is not None and not 1.0 <= segment_s <= 30.0:
        raise UserError(f"--segment-s {segment_s:g} is out of range", "give 1 to 30 seconds (Whisper's window is 30 s)")
    if data is None:
        return None
    from semedge.semcom.tasks.audiofolder import load_audiofolder

    utts = load_audiofolder(data)
    return utts[:n] if n is not None else utts


def _print_eval(rows: list[dict], out: Path) -> None:
    from semedge.semcom.stats import fmt_ci

    for r in rows:
        seg = f"  segments {r['segments']}" if "segments" in r else ""
        typer.echo(f"{r['system']:>14} {r['channel']:>9} {r['snr_db']:>6g} dB  WER {fmt_ci(r.get('wer_ci95'))}  "
                   f"BLEU {r['bleu']:.1f}  sim {r.get('similarity') or float('nan'):.3f}  uses {r['channel_uses']:.0f}{seg}")
    if rows:
        typer.echo(f"n = {rows[0].get('n')} utterances; [95% bootstrap interval]; text normaliser {rows[0].get('normalizer')}")
    typer.echo(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def _command_line() -> str:
    """The command as typed, stored in what it writes."""
    return "semedge " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _model_option(help: str = "built-in name or local checkpoint"):
    return typer.Option(_D.model, "--model", help=help)


def _threads_option():
    return typer.Option(None, "--threads", help="torch CPU threads (1 is fastest on a busy machine)")


def _seed_option():
    return typer.Option(_D.seed, "--seed")


def register(app: typer.Typer) -> None:
    _register_train(app)
    _register_train_image(app)
    _register_eval(app)
    _register_rate(app)


# ------------------------------------------------------------------ train


def _register_train(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        model: str = _model_option(),
        k: int = typer.Option(_D.k, "--k", help="real channel symbols per token"),
        encoder: Optional[str] = typer.Option(_D.encoder, "--encoder", help="run another model's encoder on the device (e.g. whisper-tiny.en: a 4-layer, 384-wide student feeding --model's decoder through the JSC)"),
        channel: str = typer.Option(",".join(_D.channels), "--channel", help="comma-separated channels, one drawn per batch"),
        snr_range: tuple[float, float] = typer.Option((_D.snr_low, _D.snr_high), "--snr-range", help="training SNR range in dB (uniform)"),
        lora: Optional[str] = typer.Option(None, "--lora", help="LoRA adapters: r=8,alpha=16,targets=decoder.self_attn+decoder.encoder_attn,proj=q_proj+v_proj ('default' for these)"),
        qlora: bool = typer.Option(_D.qlora, "--qlora", help="LoRA over a frozen nf4 (bitsandbytes) base"),
        steps: int = typer.Option(_D.steps, "--steps"),
        batch_size: int = typer.Option(_D.batch_size, "--batch-size"),
        lr: float = typer.Option(_D.lr, "--lr", help="JSC codec learning rate"),
        lora_lr: float = typer.Option(_D.lora_lr, "--lora-lr"),
        hidden: int = typer.Option(_D.hidden, "--hidden", help="JSC decoder MLP width"),
        init: str = typer.Option(_D.init, "--init", help="codec start: random, or pca (a linear PCA code of the features plus a linear decoder path; the MLP learns the rest)"),
        power: str = typer.Option(_D.power, "--power", help="power normalisation of the sent symbols: token (each token unit power) or message (one scale per message, keeps relative token norms)"),
        tail_frames: Optional[int] = typer.Option(_D.tail_frames, "--tail-frames", help="speech: silence frames after the content the server decoder attends to (default: the whole 30 s window; 300 decodes ~2x faster)"),
        mse_warmup: int = typer.Option(_D.mse_warmup_steps, "--mse-warmup", help="feature-MSE-only steps first (cheap warm start)"),
        feature_loss: float = typer.Option(_D.feature_loss, "--feature-loss", help="weight of feature MSE added to the decoder loss"),
        kl_weight: float = typer.Option(_D.kl_weight, "--kl-weight", help="weight of KL(unsplit model || codec) on the decoder's next-token distributions (the unsplit model as teacher)"),
        ce_weight: float = typer.Option(_D.ce_weight, "--ce-weight", help="weight of cross-entropy on the reference transcripts"),
        temperature: float = typer.Option(_D.temperature, "--temperature", help="softmax temperature of the KL term"),
        data: Optional[Path] = typer.Option(None, "--data", help="fine-tune on your recordings: a folder with metadata.csv (file_name, transcription) and WAV/FLAC/OGG files"),
        voices: str = typer.Option(_D.voices, "--voices", help="training voices: espeak, piper, flite, mix (all three), a+b, or mix-a (the mix without family a's sentences: leave-one-out) (docs/data.md)"),
        augment: float = typer.Option(_D.augment, "--augment", help="share of training utterances degraded (speed, telephone band, codecs, noise, reverb)"),
        rate_min: Optional[int] = typer.Option(_D.rate_min, "--rate-min", help="train truncation to k' in [rate-min, k] (rate adaptation)"),
        n_train: int = typer.Option(_D.n_train, "--n-train", help="training utterances"),
        n_val: int = typer.Option(_D.n_val, "--n-val", help="validation utterances (WER at the end)"),
        seed: int = _seed_option(),
        out: Path = typer.Option(..., "--out", help="checkpoint folder"),
        resume: bool = typer.Option(False, "--resume", help="continue from --out"),
        save_every: int = typer.Option(_D.save_every, "--save-every", help="steps between checkpoints (0: only at the end)"),
        max_minutes: Optional[float] = typer.Option(_D.max_minutes, "--max-minutes", help="stop and save after this much time"),
        val_snr: List[float] = typer.Option([10.0], "--val-snr", help="SNRs (dB, AWGN) for the final validation WER"),
        fp16: bool = typer.Option(False, "--fp16", help="store weights as float16 (shipped assets)"),
        threads: Optional[int] = _threads_option(),
        fit_rate: bool = typer.Option(False, "--fit-rate", help="measure WER per SNR x k' on the validation set and store a rate policy (--k auto)"),
        rate_snr: List[float] = typer.Option([0.0, 5.0, 10.0, 20.0], "--rate-snr", help="SNRs (dB, AWGN) for --fit-rate"),
        ship: Optional[Path] = typer.Option(None, "--ship", help="also write a float16 copy without optimizer state here (e.g. semcom/assets/whisper-base-jsc)"),
    ):
        """Train a JSC codec with the channel in the loop (decoder cross-entropy), optionally with LoRA/QLoRA."""
        _threads(threads)
        from semedge.core.channel_spec import parse_channels
        from semedge.semcom.training.config import LoRASpec

        chans = tuple(str(c) for c in parse_channels(channel))
        cfg = TrainConfig(model=model, encoder=encoder, k=k, hidden=hidden, init=init, power=power, tail_frames=tail_frames, channels=chans, snr_low=snr_range[0], snr_high=snr_range[1],
                          steps=steps, batch_size=batch_size, lr=lr, lora_lr=lora_lr, mse_warmup_steps=mse_warmup,
                          feature_loss=feature_loss, ce_weight=ce_weight, kl_weight=kl_weight, temperature=temperature,
                          data=str(data) if data else None, voices=voices, augment=augment, rate_min=rate_min, lora=LoRASpec.parse(lora) if lora is not None else None,
                          qlora=qlora, n_train=n_train, n_val=n_val, seed=seed, save_every=save_every, max_minutes=max_minutes)
        _run_training(cfg, out, resume, val_snr, rate_snr if fit_rate else None, fp16, ship)


def _train_metrics(tr, res) -> dict:
    """What the checkpoint's manifest records about the run."""
    model_bytes = sum(t.numel() * t.element_size() for t in list(tr.model.parameters()) + list(tr.model.buffers()))
    return {"sec_per_step": round(res.sec_per_step, 3), "peak_rss_mb": round(res.peak_rss_mb, 1),
            "train_seconds": round(res.seconds, 1), "steps_done": res.steps,
            "model_mb": round(model_bytes / 2**20, 1),
            "loss_first20": float(sum(res.losses[:20]) / max(1, len(res.losses[:20]))),
            "loss_last20": float(sum(res.losses[-20:]) / max(1, len(res.losses[-20:])))}


def _run_training(cfg: TrainConfig, out: Path, resume: bool, val_snr, rate_snr, fp16: bool, ship: Optional[Path]) -> None:
    """Train (or resume) into `out`, validate, fit the rate policy at `rate_snr` (None: no), save (and ship)."""
    from semedge.semcom.training.evaluate import fit_rate_policy, validate
    from semedge.semcom.training.trainer import Trainer

    tr = Trainer(cfg)
    if resume and tr.resume(out):
        typer.echo(f"resuming from {out} at step {tr.step}")
    elif (out / "manifest.json").exists() and not resume:
        raise UserError(f"{out} already holds a checkpoint", "pass --resume to continue it, or choose another --out")
    res = tr.fit(out, log=typer.echo)
    metrics = _train_metrics(tr, res)
    if tr.val_examples:
        metrics["val"] = validate(tr, val_snr)
    extra = {}
    if rate_snr is not None:
        extra["rate_policy"] = fit_rate_policy(tr, rate_snr).to_dict()
    extra["command"] = _command_line()
    tr.save(out, metrics=metrics, dtype="float16" if fp16 else "float32", extra=extra)
    if ship is not None:
        tr.save(ship, metrics=metrics, dtype="float16", with_trainer=False, extra=extra)
        typer.echo(f"shipped copy (float16) in {ship}")
    typer.echo(f"saved {out}  " + "  ".join(f"{k}={v}" for k, v in metrics.items()))


def _register_train_image(app: typer.Typer) -> None:
    @app.command("train-image")
    def train_image_cmd(
        out: Path = typer.Option(..., "--out", help="codec folder (codec.safetensors + manifest.json)"),
        steps: int = typer.Option(1500, "--steps"),
        batch_size: int = typer.Option(32, "--batch-size"),
        lr: float = typer.Option(2e-3, "--lr"),
        k: int = typer.Option(16, "--k", help="real symbols per 4x4-pixel token (channel uses per pixel = k/32)"),
        width: int = typer.Option(48, "--width", help="conv channels"),
        hidden: int = typer.Option(192, "--hidden", help="JSC decoder MLP width"),
        channel: str = typer.Option("awgn,rayleigh", "--channel", help="comma-separated channels, one drawn per batch"),
        snr_range: tuple[float, float] = typer.Option((-5.0, 20.0), "--snr-range", help="training SNR range in dB (uniform)"),
        max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="stop after this much time"),
        threads: Optional[int] = _threads_option(),
        seed: int = typer.Option(0, "--seed"),
    ):
        """Train the image task's codec (CNN + JSC, semcom/image_codec.py) from scratch through the channel."""
        from semedge.semcom.image_codec import ImageCodecConfig, save_codec
        from semedge.semcom.image_train import ImageTrainConfig, config_dict, train_image_codec

        _threads(threads)
        cfg = ImageTrainConfig(codec=ImageCodecConfig(k=k, width=width, hidden=hidden), steps=steps, batch_size=batch_size,
                               lr=lr, channels=tuple(c.strip() for c in channel.split(",") if c.strip()),
                               snr_low=snr_range[0], snr_high=snr_range[1], max_minutes=max_minutes, seed=seed)
        res = train_image_codec(cfg, log=typer.echo)
        info = {"command": _command_line(), "train": config_dict(cfg), "metrics": res.summary(), "pretrained_stem": None}
        save_codec(res.codec, out, info)
        typer.echo(f"saved {out}  " + "  ".join(f"{a}={b}" for a, b in res.summary().items()))


# ------------------------------------------------------------------ eval


def _register_eval(app: typer.Typer) -> None:
    @app.command("eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def eval_cmd(
        ctx: typer.Context,
        model: str = _model_option(),
        jsc: str = typer.Option("default", "--jsc", help="checkpoint folder, 'default' (shipped) or 'identity' (unsplit features)"),
        channel: str = typer.Option("awgn,rayleigh,rician", "--channel"),
        snr: List[float] = typer.Option([-5, 0, 5, 10, 15, 20], "--snr", help="SNRs in dB: --snr -5 0 5 10 (or repeat the option)"),
        k: Optional[str] = typer.Option(None, "--k", help="symbols per token to send (<= codec k), or 'auto' (rate policy)"),
        n: Optional[int] = typer.Option(None, "--n", help="utterances: the first N of --split (default 200) or of --data's rows (default all)"),
        split: str = typer.Option("test", "--split"),
        data: Optional[Path] = typer.Option(None, "--data", help="your recordings instead of --split: a folder with metadata.csv (file_name,transcription) and WAV/FLAC/OGG files (Hugging Face audiofolder)"),
        segment_s: Optional[float] = typer.Option(None, "--segment-s", help="recordings longer than this are cut at quiet points and sent as several messages (1-30; default 30 for --jsc identity, 6 for a trained codec)"),
        out: Path = typer.Option(Path("eval"), "--out", help="writes OUT.json and OUT.png"),
        seed: int = _seed_option(),
        no_similarity: bool = typer.Option(False, "--no-similarity", help="skip the sentence-embedding similarity"),
        backend: str = typer.Option("torch", "--backend", help="decoder: torch, ct2 (CTranslate2 int8, the server's default) or ct2-float32"),
        threads: Optional[int] = _threads_option(),
    ):
        """WER, BLEU and similarity per channel and SNR, on the built-in test split or your recordings (--data); JSON + PNG."""
        _threads(threads)
        snr = list(snr) + _trailing_numbers(ctx.args, "--snr")
        from semedge.core.channel_spec import parse_channels
        from semedge.semcom.training import artifacts, evaluate

        chans = [str(c) for c in parse_channels(channel)]
        if n is not None and n < 1:
            raise UserError(f"--n {n} must be at least 1", "e.g. --n 50")
        utts = _eval_data(data, n, segment_s)
        rows = evaluate.evaluate_system(model, jsc, chans, snr, k=k, n=n or 200, split=split, seed=seed,
                                        with_similarity=not no_similarity, backend=backend, data=utts, max_segment_s=segment_s)
        out = Path(out)
        args = {"model": model, "jsc": jsc, "channels": chans, "snr": snr, "k": k, "n": rows[0]["n"] if rows else n}
        if data is not None:
            args.update(data=str(data), segment_s=rows[0].get("segment_s") if rows else segment_s)
        artifacts.write_json({"rows": rows, "args": args, "normalizer": rows[0].get("normalizer") if rows else None,
                              "interval": "bootstrap 95% over utterances (semcom.stats)"}, out.with_suffix(".json"))
        artifacts.plot_results(rows, out.with_suffix(".png"))
        _print_eval(rows, out)


# ------------------------------------------------------------------ rate


def _rate_candidates(candidates: str, lo: int, k: int) -> list[int]:
    """--candidates as sorted k' values (default: every 8 from `lo` to k), k always among them."""
    try:
        cands = sorted({int(c) for c in candidates.split(",") if c.strip()}) or sorted({*range(lo, k, 8), k})
    except ValueError:
        raise UserError(f"--candidates {candidates!r} must be whole numbers", "e.g. --candidates 16,32,48,64") from None
    if k not in cands:
        cands.append(k)
    bad = [c for c in cands if not 1 <= c <= k]
    if bad:
        raise UserError(f"--candidates {bad} are outside [1, {k}]", f"give k' between 1 and {k}")
    return cands


def _cut_k(cut: Optional[str], cands: list[int], k: int) -> Optional[int]:
    """--cut as a number of symbols; None for no cut or 'rule' (decided after measuring)."""
    if cut in (None, "rule"):
        return None
    try:
        cut_k = int(cut)
    except ValueError:
        raise UserError(f"--cut {cut!r} must be a number or 'rule'", "e.g. --cut 48 or --cut rule") from None
    if not 1 <= cut_k <= k:
        raise UserError(f"--cut {cut_k} is outside [1, {k}]", f"give 1..{k}")
    if cut_k not in cands:
        raise UserError(f"--cut {cut_k} was not among the measured k' {cands}", "add it to --candidates")
    return cut_k


def _print_rate_table(table: dict, snrs, cands: list[int], header: str) -> None:
    typer.echo(header)
    typer.echo("   SNR  " + "".join(f"k'={c:<6}" for c in cands))
    for s in snrs:
        typer.echo(f"{s:>6g}  " + "".join(f"{table[s][c]:<8.3f}" for c in cands))


def _write_rate_outputs(ck, table: dict, fit: dict, tolerance: float, out: Optional[Path],
                        cut: Optional[str], cut_k: Optional[int], cut_out: Optional[Path]) -> None:
    """Fit the policy; write the codec with it to `out`, and the codec cut to `cut` symbols to `cut_out`."""
    from semedge.semcom import rate as R
    from semedge.semcom.checkpoint import rewrite_checkpoint
    from semedge.semcom.jsc import cut as cut_codec

    k = ck.k
    policy = R.fit_policy(k, table, tolerance)
    typer.echo(f"rate policy, k={k} (--k auto): " + ", ".join(f"{s:g} dB -> {kk}" for s, kk in policy.table))
    written = []
    if out is not None:
        written.append((rewrite_checkpoint(ck, out, rate_policy=policy.to_dict(), rate_fit=fit), k))
    if cut is not None:
        new_k = fit["rule_k"] if cut == "rule" else cut_k
        small = R.fit_policy(new_k, R.restrict(table, new_k), tolerance)
        typer.echo(f"rate policy, cut to k={new_k}: " + ", ".join(f"{s:g} dB -> {kk}" for s, kk in small.table))
        written.append((rewrite_checkpoint(ck, cut_out, cut_codec(ck.codec, new_k), rate_policy=small.to_dict(), rate_fit=fit,
                                           cut_from={"k": k, "folder": ck.path.name, "files": ck.manifest.get("files")}), new_k))
    for path, kk in written:
        typer.echo(f"wrote {path} (k={kk})")
    if not written:
        typer.echo("nothing written (give --out, or --cut and --cut-out)")


def _register_rate(app: typer.Typer) -> None:
    @app.command("rate", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def rate_cmd(
        ctx: typer.Context,
        model: str = _model_option(),
        jsc: str = typer.Option("default", "--jsc", help="a nested codec (trained with --rate-min): folder or 'default'"),
        n: int = typer.Option(200, "--n", help="utterances to measure on"),
        split: str = typer.Option("val", "--split", help="measure on val (test stays for reporting)"),
        voices: Optional[str] = typer.Option(None, "--voices", help="voice families to measure on (default: those the codec trained on; docs/data.md)"),
        snr: List[float] = typer.Option([0, 5, 10, 20], "--snr", help="AWGN SNRs in dB (a clean row is always added)"),
        candidates: str = typer.Option("", "--candidates", help="k' values, comma-separated (default: every 8 from --rate-min to k)"),
        tolerance: float = typer.Option(0.02, "--tolerance", help="WER a smaller k' may lose (0.02 = 2 points)"),
        rule_snr: float = typer.Option(10.0, "--rule-snr", help="the k rule: smallest k' whose WER here is within tolerance of the clean WER"),
        out: Optional[Path] = typer.Option(None, "--out", help="write the codec here with the fitted policy (its own folder updates it)"),
        cut: Optional[str] = typer.Option(None, "--cut", help="also write a codec cut to this many symbols (a number, or 'rule') to --cut-out"),
        cut_out: Optional[Path] = typer.Option(None, "--cut-out", help="folder for the --cut codec (a new one)"),
        backend: str = typer.Option("ct2", "--backend", help="decoder: ct2 (the server's default), ct2-float32 or torch"),
        seed: int = _seed_option(),
        threads: Optional[int] = _threads_option(),
    ):
        """Measure WER per SNR x k' for a nested codec, fit its rate policy (--k auto), pick k by rule, optionally cut it."""
        import math

        _threads(threads)
        snrs = sorted({float(s) for s in list(snr) + _trailing_numbers(ctx.args, "--snr")} | {math.inf})
        if (cut is None) != (cut_out is None):
            raise UserError("--cut and --cut-out go together", "e.g. --cut rule --cut-out runs/codec-cut")

        from semedge.semcom import rate as R
        from semedge.semcom.checkpoint import device_encoder, load_for_inference
        from semedge.semcom.models import load_model
        from semedge.semcom.split import silence_encoding
        from semedge.semcom.training.data import speech_examples
        from semedge.semcom.training.evaluate import measure_rate_table

        base = load_model(model)
        rx, ck = load_for_inference(base, jsc)
        if ck is None:
            raise UserError(f"--jsc {jsc}: no trained codec to fit", "give a folder from semedge train --rate-min ...")
        k = ck.k
        cands = _rate_candidates(candidates, (ck.manifest.get("rate_training") or {}).get("rate_min") or k, k)
        cut_k = _cut_k(cut, cands, k)
        if cut_out is not None and cut_out.resolve() in (ck.path.resolve(), out.resolve() if out else None):
            raise UserError(f"--cut-out {cut_out} is the codec's own folder or --out", "give a new folder")
        fam = voices or (ck.manifest.get("train_config") or {}).get("voices", "espeak")
        examples = speech_examples(base, split, n, encoder=device_encoder(ck), family=tuple(fam.split("+")) if "+" in fam else fam)
        table = measure_rate_table(rx, ck.codec, examples, snrs, cands, seed=seed, silence=silence_encoding(base),
                                   backend=backend)
        _print_rate_table(table, snrs, cands, "WER, AWGN, " + f"{len(examples)} {split} utterances, backend {backend}")
        k_rule = R.rule_k(table, k, rule_snr, tolerance)
        typer.echo(f"rule (smallest k' within {100 * tolerance:g} points of the clean WER at {rule_snr:g} dB): k' = {k_rule}")
        fit = {"n": len(examples), "split": split, "voices": fam, "backend": backend, "channel": "awgn", "seed": seed, "tolerance": tolerance,
               "rule_snr": rule_snr, "rule_k": k_rule, "candidates": cands, "command": _command_line(),
               "wer": {f"{s:g}": {str(c): round(w, 4) for c, w in sorted(row.items())} for s, row in sorted(table.items())}}
        _write_rate_outputs(ck, table, fit, tolerance, out, cut, cut_k, cut_out)
