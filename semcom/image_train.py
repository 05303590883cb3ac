"""Train the image codec from scratch through the channel (MSE on pixels), on CPU.

Each step: a batch of random training crops (image_data.random_crops), one channel
drawn from `channels` for the batch, one SNR per patch uniform in [snr_low, snr_high]
dB (channels.sample_snr), loss = MSE between the patch and its reconstruction.
Adam with warm-up + cosine (training.schedule). Deterministic for a seed and thread count.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from semedge.core.errors import UserError
from semedge.semcom.image_codec import ImageCodec, ImageCodecConfig


@dataclass(frozen=True)
class ImageTrainConfig:
    codec: ImageCodecConfig = field(default_factory=ImageCodecConfig)
    steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 100
    channels: tuple[str, ...] = ("awgn", "rayleigh")
    snr_low: float = -5.0
    snr_high: float = 20.0
    patch: int = 32
    seed: int = 0
    max_minutes: float | None = None
    n_val: int = 64  # validation patches (val photo) for the loss printed at the end

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise UserError(f"steps={self.steps}, batch_size={self.batch_size}: both must be >= 1", "e.g. --steps 3000 --batch-size 32")
        if self.patch % 4:
            raise UserError(f"patch={self.patch} is not a multiple of 4", "use e.g. --patch 32")


@dataclass
class ImageTrainResult:
    codec: ImageCodec
    losses: list[float]
    val_mse: dict  # channel -> MSE on the validation patches at 10 dB
    seconds: float
    steps_done: int

    def summary(self) -> dict:
        n = max(1, min(50, len(self.losses) // 4))
        return {"loss_first": float(np.mean(self.losses[:n])), "loss_last": float(np.mean(self.losses[-n:])),
                "steps_done": self.steps_done, "train_seconds": round(self.seconds, 1),
                "sec_per_step": round(self.seconds / max(1, self.steps_done), 4), "val_mse_10db": self.val_mse}


def train_image_codec(cfg: ImageTrainConfig, log=None) -> ImageTrainResult:
    """Train a fresh codec for cfg.steps (or until cfg.max_minutes); returns it in eval mode."""
    from semedge.semcom.channels import make_channel, sample_snr
    from semedge.semcom.image_data import random_crops
    from semedge.semcom.training.schedule import warmup_cosine

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    codec = ImageCodec(cfg.codec).train()
    layers = [make_channel(c) for c in cfg.channels]
    opt = torch.optim.Adam(codec.parameters(), lr=cfg.lr)
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        for g in opt.param_groups:  # cosine over steps, or over time when --max-minutes ends the run first
            g["lr"] = cfg.lr * warmup_cosine(_progress(step, cfg, time.perf_counter() - t0), cfg.steps, cfg.warmup, floor=0.02)
        x = torch.from_numpy(random_crops(rng, cfg.batch_size, "train", cfg.patch))  # [B, 3, P, P]
        chan = layers[int(rng.integers(len(layers)))]
        snr = sample_snr(cfg.batch_size, cfg.snr_low, cfg.snr_high, gen)  # [B]
        loss = torch.nn.functional.mse_loss(codec(x, chan, snr, gen), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if log and (step + 1) % 100 == 0:
            log(f"step {step + 1}/{cfg.steps}  mse {np.mean(losses[-100:]):.5f}  {time.perf_counter() - t0:.0f} s")
        if _progress(step + 1, cfg, time.perf_counter() - t0) >= cfg.steps:
            break
    seconds = time.perf_counter() - t0
    codec.eval()
    return ImageTrainResult(codec, losses, validate(codec, cfg, layers), seconds, len(losses))


def _progress(step: int, cfg: ImageTrainConfig, seconds: float) -> int:
    """Schedule position in steps: the step, or the share of --max-minutes spent if that is further."""
    if cfg.max_minutes is None:
        return step
    return max(step, int(cfg.steps * seconds / (60 * cfg.max_minutes)))


@torch.no_grad()
def validate(codec: ImageCodec, cfg: ImageTrainConfig, layers, snr_db: float = 10.0) -> dict:
    """MSE per channel on the validation photo's patches at `snr_db`."""
    from semedge.semcom.image_data import split_patches

    x = torch.from_numpy(split_patches("val", cfg.n_val, cfg.patch)[0])
    gen = torch.Generator().manual_seed(1234)
    return {c.spec.kind: round(float(torch.nn.functional.mse_loss(codec(x, c, snr_db, gen), x)), 6) for c in layers}


def config_dict(cfg: ImageTrainConfig) -> dict:
    d = asdict(cfg)
    d["channels"] = list(cfg.channels)
    return d
