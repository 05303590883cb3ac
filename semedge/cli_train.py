"""`semedge train` and `semedge eval`: train a JSC codec (+ LoRA/QLoRA) through the channel; measure it."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from semedge.semcom.errors import UserError


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


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        model: str = typer.Option("whisper-base", "--model", help="built-in name or local checkpoint"),
        k: int = typer.Option(64, "--k", help="real channel symbols per token"),
        encoder: Optional[str] = typer.Option(None, "--encoder", help="run another model's encoder on the device (e.g. whisper-tiny.en: a 4-layer, 384-wide student feeding --model's decoder through the JSC)"),
        channel: str = typer.Option("awgn", "--channel", help="comma-separated channels, one drawn per batch"),
        snr_range: tuple[float, float] = typer.Option((-5.0, 20.0), "--snr-range", help="training SNR range in dB (uniform)"),
        lora: Optional[str] = typer.Option(None, "--lora", help="LoRA adapters: r=8,alpha=16,targets=decoder.self_attn+decoder.encoder_attn,proj=q_proj+v_proj ('default' for these)"),
        qlora: bool = typer.Option(False, "--qlora", help="LoRA over a frozen nf4 (bitsandbytes) base"),
        steps: int = typer.Option(400, "--steps"),
        batch_size: int = typer.Option(8, "--batch-size"),
        lr: float = typer.Option(1e-3, "--lr", help="JSC codec learning rate"),
        lora_lr: float = typer.Option(3e-4, "--lora-lr"),
        hidden: int = typer.Option(1024, "--hidden", help="JSC decoder MLP width"),
        tail_frames: Optional[int] = typer.Option(None, "--tail-frames", help="speech: silence frames after the content the server decoder attends to (default: the whole 30 s window; 300 decodes ~2x faster)"),
        mse_warmup: int = typer.Option(150, "--mse-warmup", help="feature-MSE-only steps first (cheap warm start)"),
        feature_loss: float = typer.Option(0.0, "--feature-loss", help="weight of feature MSE added to cross-entropy"),
        rate_min: Optional[int] = typer.Option(None, "--rate-min", help="train truncation to k' in [rate-min, k] (rate adaptation)"),
        n_train: int = typer.Option(240, "--n-train", help="training utterances"),
        n_val: int = typer.Option(16, "--n-val", help="validation utterances (WER at the end)"),
        seed: int = typer.Option(0, "--seed"),
        out: Path = typer.Option(..., "--out", help="checkpoint folder"),
        resume: bool = typer.Option(False, "--resume", help="continue from --out"),
        save_every: int = typer.Option(50, "--save-every", help="steps between checkpoints"),
        max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="stop and save after this much time"),
        val_snr: List[float] = typer.Option([10.0], "--val-snr", help="SNRs (dB, AWGN) for the final validation WER"),
        fp16: bool = typer.Option(False, "--fp16", help="store weights as float16 (shipped assets)"),
        threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (1 is fastest on a busy machine)"),
        fit_rate: bool = typer.Option(False, "--fit-rate", help="measure WER per SNR x k' on the validation set and store a rate policy (--k auto)"),
        rate_snr: List[float] = typer.Option([0.0, 5.0, 10.0, 20.0], "--rate-snr", help="SNRs (dB, AWGN) for --fit-rate"),
        ship: Optional[Path] = typer.Option(None, "--ship", help="also write a float16 copy without optimizer state here (e.g. semcom/assets/whisper-base-jsc)"),
    ):
        """Train a JSC codec with the channel in the loop (decoder cross-entropy), optionally with LoRA/QLoRA."""
        _threads(threads)
        from semedge.semcom.channel_spec import parse_channels
        from semedge.semcom.train import LoRASpec, TrainConfig, Trainer, fit_rate_policy, validate

        chans = tuple(str(c) for c in parse_channels(channel))
        cfg = TrainConfig(model=model, encoder=encoder, k=k, hidden=hidden, tail_frames=tail_frames, channels=chans, snr_low=snr_range[0], snr_high=snr_range[1],
                          steps=steps, batch_size=batch_size, lr=lr, lora_lr=lora_lr, mse_warmup_steps=mse_warmup,
                          feature_loss=feature_loss, rate_min=rate_min, lora=LoRASpec.parse(lora) if lora is not None else None,
                          qlora=qlora, n_train=n_train, n_val=n_val, seed=seed, eval_every=save_every, max_minutes=max_minutes)
        tr = Trainer(cfg)
        if resume and tr.resume(out):
            typer.echo(f"resuming from {out} at step {tr.step}")
        elif (out / "manifest.json").exists() and not resume:
            raise UserError(f"{out} already holds a checkpoint", "pass --resume to continue it, or choose another --out")
        res = tr.fit(out, log=typer.echo)
        metrics = {"sec_per_step": round(res.sec_per_step, 3), "peak_rss_mb": round(res.peak_rss_mb, 1),
                   "train_seconds": round(res.seconds, 1), "steps_done": res.steps,
                   "model_mb": round(sum(t.numel() * t.element_size() for t in list(tr.model.parameters()) + list(tr.model.buffers())) / 2**20, 1),
                   "loss_first20": float(sum(res.losses[:20]) / max(1, len(res.losses[:20]))),
                   "loss_last20": float(sum(res.losses[-20:]) / max(1, len(res.losses[-20:])))}
        if tr.val_examples:
            metrics["val"] = validate(tr, val_snr)
        extra = {}
        if fit_rate:
            extra["rate_policy"] = fit_rate_policy(tr, rate_snr).to_dict()
        import shlex
        import sys

        extra["command"] = "semedge " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        tr.save(out, metrics=metrics, dtype="float16" if fp16 else "float32", extra=extra)
        if ship is not None:
            tr.save(ship, metrics=metrics, dtype="float16", with_trainer=False, extra=extra)
            typer.echo(f"shipped copy (float16) in {ship}")
        typer.echo(f"saved {out}  " + "  ".join(f"{k}={v}" for k, v in metrics.items()))

    @app.command("eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def eval_cmd(
        ctx: typer.Context,
        model: str = typer.Option("whisper-base", "--model"),
        jsc: str = typer.Option("default", "--jsc", help="checkpoint folder, 'default' (shipped) or 'identity'"),
        channel: str = typer.Option("awgn,rayleigh,rician", "--channel"),
        snr: List[float] = typer.Option([-5, 0, 5, 10, 15, 20], "--snr", help="SNRs in dB: --snr -5 0 5 10 (or repeat the option)"),
        k: Optional[str] = typer.Option(None, "--k", help="symbols per token to send (<= codec k), or 'auto' (rate policy)"),
        n: int = typer.Option(200, "--n", help="test utterances"),
        split: str = typer.Option("test", "--split"),
        out: Path = typer.Option(Path("eval"), "--out", help="writes OUT.json and OUT.png"),
        seed: int = typer.Option(0, "--seed"),
        no_similarity: bool = typer.Option(False, "--no-similarity", help="skip the sentence-embedding similarity"),
        backend: str = typer.Option("torch", "--backend", help="decoder: torch, ct2 (CTranslate2 int8, the server's default) or ct2-float32"),
        threads: Optional[int] = typer.Option(None, "--threads"),
    ):
        """WER, BLEU and similarity per channel and SNR; JSON + PNG (metric vs SNR)."""
        _threads(threads)
        snr = list(snr) + _trailing_numbers(ctx.args, "--snr")
        from semedge.semcom.channel_spec import parse_channels
        from semedge.semcom.train import evaluate_system, plot_results, write_json

        chans = [str(c) for c in parse_channels(channel)]
        rows = evaluate_system(model, jsc, chans, snr, k=k, n=n, split=split, seed=seed, with_similarity=not no_similarity,
                               backend=backend)
        out = Path(out)
        write_json({"rows": rows, "args": {"model": model, "jsc": jsc, "channels": chans, "snr": snr, "k": k, "n": n}},
                   out.with_suffix(".json"))
        plot_results(rows, out.with_suffix(".png"))
        for r in rows:
            typer.echo(f"{r['system']:>14} {r['channel']:>9} {r['snr_db']:>6g} dB  WER {r['wer']:.3f}  BLEU {r['bleu']:.1f}  "
                       f"sim {r.get('similarity', float('nan')):.3f}  uses {r['channel_uses']:.0f}")
        typer.echo(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
