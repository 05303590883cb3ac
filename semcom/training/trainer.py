"""The Trainer: one `semedge train` run, from examples to a checkpoint.

The loss is the large decoder's cross-entropy on the reference transcript (text models:
on the input text itself), computed on what the JSC decoder rebuilds from the channel
output, plus optional feature MSE and KL to the unsplit model (the teacher). Per batch
the trainer draws a channel (when several are given), one SNR per message (uniform in
dB) and, with rate training on, a kept-symbol count k' (the first k' of k symbols are
sent), so the leading symbols learn to carry the most.

Speech: the encoder is frozen (its outputs come from the feature cache); LoRA on it is
refused.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from semedge.core.errors import UserError
from semedge.semcom.training import run_state
from semedge.semcom.training.adapters import prepare_model
from semedge.semcom.training.config import TrainConfig
from semedge.semcom.training.data import Example, collate, device_encoder_model, prefix_length, run_examples, speech_examples
from semedge.semcom.training.forward import channel_pass, decoder_logits, frozen_silence_kv, is_whisper
from semedge.semcom.training.schedule import warmup_cosine

LR_WARMUP_STEPS = 20  # linear learning-rate warm-up, then cosine down to LR_FLOOR x the base rate
LR_FLOOR = 0.1
CALIBRATION_EXAMPLES = 200  # examples whose features set the codec's mean / std


@dataclass
class TrainResult:
    path: Path
    steps: int
    losses: list[float]
    seconds: float
    sec_per_step: float
    peak_rss_mb: float
    metrics: dict = field(default_factory=dict)


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def feature_mse(h_hat: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Mean squared error of rebuilt features h_hat [B, m, d] vs ref, per dimension in units of std, over mask [B, m]."""
    m = mask.unsqueeze(-1).float()
    return (((h_hat - ref) / std) ** 2 * m).sum() / (m.sum() * ref.shape[-1])


def teacher_kl(logits: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions [N, V] softened by temperature t (not scaled by t^2)."""
    return nn.functional.kl_div(nn.functional.log_softmax(logits / t, -1), nn.functional.log_softmax(teacher / t, -1),
                                log_target=True, reduction="batchmean")


class Trainer:
    """Holds the model copy, codec, data and optimizer for one `semedge train` run."""

    def __init__(self, cfg: TrainConfig, loaded=None, examples: list[Example] | None = None,
                 val_examples: list[Example] | None = None, progress: bool = True, encoder=None):
        from semedge.semcom.channels import make_channel

        cfg.validate()
        self.cfg = cfg
        self.progress = progress
        if loaded is None:
            from semedge.semcom.models import load_source

            loaded = load_source(cfg.model)  # tiny:ARCH too (tests)
        self.loaded = loaded
        self.encoder = encoder or (device_encoder_model(cfg.encoder, loaded) if cfg.encoder else None)
        self.channels = [make_channel(c) for c in cfg.channels]
        if cfg.lora is not None and cfg.lora.touches_encoder:
            raise UserError("LoRA on the encoder is not supported by this trainer yet (encoder outputs are cached)",
                            "use targets on the decoder, e.g. targets=decoder.self_attn+decoder.encoder_attn")
        self.model = prepare_model(loaded, cfg.lora, cfg.qlora)
        if cfg.qlora:  # bitsandbytes repacks nf4 weights for inference-only kernels in eval mode on CPU
            for m in self.model.modules():
                if type(m).__name__ == "Linear4bit":
                    m.train()
        self.examples, self.val_examples = self._data(examples, val_examples)
        torch.manual_seed(cfg.seed)
        self.codec = self._codec()
        self.silence = None
        if loaded.task.fills_silence:
            from semedge.semcom.split import silence_encoding

            self.silence = silence_encoding(loaded)  # [1500, d]
        self.sil_kv = frozen_silence_kv(self.model, self.silence) if loaded.task.fills_silence and is_whisper(self.model) else None
        self.prefix_len = prefix_length(loaded)
        self.pad_id = loaded.model.config.pad_token_id if loaded.model.config.pad_token_id is not None else 0
        self.opt = self._optimizer()
        self.step = 0
        self.losses: list[float] = []

    def _data(self, examples, val_examples) -> tuple[list[Example], list[Example]]:
        """(train, val) Examples: the given ones, else those the config names; val from the built-in val split."""
        cfg, loaded = self.cfg, self.loaded
        if examples is None:
            examples, val_examples = run_examples(cfg, loaded, self.encoder, self.progress)
        if val_examples is None and loaded.task.supports("train") and cfg.n_val:
            val_examples = speech_examples(loaded, "val", cfg.n_val, progress=self.progress, encoder=self.encoder,
                                           family=cfg.voice_family())
        return examples, val_examples or []

    def _codec(self):
        """A fresh JSC codec, standardised on the first training examples' features."""
        from semedge.semcom.jsc import JSCCodec, JSCConfig

        cfg, loaded = self.cfg, self.loaded
        codec = JSCCodec(JSCConfig(d_model=loaded.d_model, k=cfg.k, hidden=cfg.hidden, skip=cfg.init == "pca", power=cfg.power,
                                   tail_frames=cfg.tail_frames if loaded.task.fills_silence else None,
                                   d_in=None if self.encoder is None else self.encoder.d_model))
        calib = self.examples[:CALIBRATION_EXAMPLES]
        codec.set_stats(torch.cat([e.h.float() for e in calib], 0),
                        None if calib[0].target is None else torch.cat([e.target.float() for e in calib], 0))
        if cfg.init == "pca":
            from semedge.semcom.jsc import init_pca

            target = None if calib[0].target is None else torch.cat([e.target.float() for e in calib], 0)
            init_pca(codec, torch.cat([e.h.float() for e in calib], 0), target)
        return codec

    def _optimizer(self):
        """AdamW over the codec (lr) and the LoRA weights (lora_lr); `base_lr` is what the schedule scales."""
        cfg = self.cfg
        codec_params = [p for p in self.codec.parameters() if p.requires_grad]
        self.lora_params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": codec_params, "lr": cfg.lr, "base_lr": cfg.lr}]
        if self.lora_params:
            groups.append({"params": self.lora_params, "lr": cfg.lora_lr, "base_lr": cfg.lora_lr})
        return torch.optim.AdamW(groups, weight_decay=0.0)

    # one optimisation step -------------------------------------------------
    def batch(self, step: int) -> tuple[dict, torch.Generator]:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        idx = torch.randint(len(self.examples), (min(self.cfg.batch_size, len(self.examples)),), generator=g).tolist()
        return collate([self.examples[i] for i in idx], self.pad_id, self.prefix_len), g

    def _draw_link(self, n: int, g: torch.Generator):
        """(channel, SNR per message [n], kept symbols per message [n] or None) for one batch."""
        from semedge.semcom.channels import sample_snr

        cfg = self.cfg
        ch = self.channels[int(torch.randint(len(self.channels), (1,), generator=g))]
        snr = sample_snr(n, cfg.snr_low, cfg.snr_high, generator=g)
        k_keep = None
        if cfg.rate_min is not None and cfg.rate_min < cfg.k:
            kk = torch.randint(cfg.rate_min, cfg.k + 1, (n,), generator=g)
            full = torch.rand(n, generator=g) >= cfg.rate_prob
            k_keep = torch.where(full, torch.full_like(kk, cfg.k), kk)
        return ch, snr, k_keep

    def loss(self, b: dict, g: torch.Generator, mse_only: bool = False) -> torch.Tensor:
        cfg = self.cfg
        ch, snr, k_keep = self._draw_link(b["h"].shape[0], g)
        h_hat, _ = channel_pass(self.codec, b["h"], b["mask"], ch, snr, k_keep, generator=g)
        ref = b.get("target", b["h"])  # what the decoder should rebuild
        mse = feature_mse(h_hat, ref, b["mask"], self.codec.decoder.std)
        if mse_only:
            return mse
        sel = b["tgt"] != -100
        logits = self._logits(self.model, h_hat, b, sel)
        loss = cfg.feature_loss * mse if cfg.feature_loss else 0.0
        if cfg.ce_weight:
            loss = loss + cfg.ce_weight * nn.functional.cross_entropy(logits, b["tgt"][sel])
        if cfg.kl_weight:
            with torch.no_grad():  # the unsplit model on the same audio: what the codec should deliver
                teacher = self._logits(self.loaded.model, ref, b, sel)
            t = cfg.temperature
            loss = loss + cfg.kl_weight * t * t * teacher_kl(logits, teacher, t)
        return loss

    def _logits(self, model, h: torch.Tensor, b: dict, sel: torch.Tensor) -> torch.Tensor:
        """Decoder logits [N, V] at the scored positions `sel`, for features h [B, m, d] (silence-filled past each message)."""
        if not self.loaded.task.fills_silence:  # masked padding
            logits = decoder_logits(model, h, b["dec_in"], b["mask"].long(), None)
            return logits[sel]
        states = torch.where(b["mask"].unsqueeze(-1), h, self.silence[: h.shape[1]].unsqueeze(0))
        sil, sil_kv = self.silence, self.sil_kv
        if self.cfg.tail_frames is not None:  # the context the server will decode with (the batch's longest)
            from semedge.semcom.split import context_length

            end = context_length(states.shape[1], self.cfg.tail_frames)
            sil = sil[:end]
            sil_kv = None if sil_kv is None else [tuple(t[:, :end] for t in kv) for kv in sil_kv]
        return decoder_logits(model, states, b["dec_in"], None, sil, sil_kv, select=sel)

    def train_step(self, step: int) -> float:
        """One optimiser step; NaN (and no update) when the loss or the gradient is not finite."""
        cfg = self.cfg
        self.codec.train()
        for grp in self.opt.param_groups:
            grp["lr"] = grp["base_lr"] * warmup_cosine(step, cfg.steps, LR_WARMUP_STEPS, LR_FLOOR)
        b, g = self.batch(step)
        loss = self.loss(b, g, mse_only=step < cfg.mse_warmup_steps)
        if not torch.isfinite(loss):
            return float("nan")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for grp in self.opt.param_groups for p in grp["params"]]
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if not torch.isfinite(gn):
            return float("nan")
        self.opt.step()
        return loss.item()

    # checkpoints (run_state) -----------------------------------------------
    def info(self, metrics: dict | None = None) -> dict:
        return run_state.run_info(self, metrics)

    def save(self, path, metrics: dict | None = None, with_trainer: bool = True, dtype: str = "float32",
             extra: dict | None = None) -> Path:
        return run_state.save_run(self, path, metrics, with_trainer, dtype, extra)

    def resume(self, path) -> bool:
        """Continue from a checkpoint folder written by the same configuration. False if there is none."""
        return run_state.resume_run(self, path)

    # the loop --------------------------------------------------------------
    def fit(self, out=None, log=print) -> TrainResult:
        """Train from self.step to cfg.steps (or cfg.max_minutes), saving to `out` every cfg.save_every steps and at the end."""
        cfg = self.cfg
        t0 = time.perf_counter()
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        last_good = None
        timed = []
        for step in range(self.step, cfg.steps):
            ts = time.perf_counter()
            loss = self.train_step(step)
            if not math.isfinite(loss):
                if bar is not None:
                    bar.close()
                where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written"
                raise UserError(f"training loss became NaN/inf at step {step} ({where})",
                                "lower --lr (e.g. by 3x) and resume with --resume, or narrow --snr-range")
            if step >= cfg.mse_warmup_steps:
                timed.append(time.perf_counter() - ts)
            self.losses.append(loss)
            self.step = step + 1
            if bar is not None:
                bar.set_postfix(loss=f"{np.mean(self.losses[-20:]):.3f}", phase="mse" if step < cfg.mse_warmup_steps else "ce")
                bar.update(1)
            if out is not None and cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                last_good = self.save(out)
            if cfg.max_minutes is not None and time.perf_counter() - t0 > 60 * cfg.max_minutes:
                log(f"time limit of {cfg.max_minutes:g} min reached at step {self.step}/{cfg.steps}; saving")
                break
        if bar is not None:
            bar.close()
        secs = time.perf_counter() - t0
        path = self.save(out) if out is not None else None
        return TrainResult(path, self.step, self.losses, secs, float(np.mean(timed)) if timed else float("nan"), peak_rss_mb())

    def receiver(self):
        """(LoadedModel with the trained adapters, codec) for evaluation."""
        self.codec.eval()
        return dataclasses.replace(self.loaded, model=self.model), self.codec
