"""Image reconstruction codec: a small CNN + the project's JSC codec, trained through the channel.

Device half (`ImageDeviceHalf`, exported to ONNX):
    image [B, 3, H, W] in [0, 1] (H, W multiples of 4)
    -> conv encoder (two stride-2 convs): features [B, d, H/4, W/4]
    -> one token per feature-map cell, row-major: h [B, T = H*W/16, d]
    -> JSCEncoder (semcom.jsc): Linear d -> k + power normalisation per token -> x [B, T, k]
Channel: semcom.channels (x is real, unit mean power; k/2 complex uses per token).
Server half (`ImageServerHalf`): JSCDecoder (MLP k -> d per token) -> [B, d, H/4, W/4]
    -> conv decoder (two stride-2 transposed convs) -> image [B, 3, H, W] (sigmoid).

Channel uses per pixel = T * k / 2 / (H * W) = k / 32 (k = 16: 0.5, i.e. 1/6 of the 3HW
source values). Weights: safetensors + manifest.json (`save_codec` / `load_codec`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from semedge.core.errors import UserError
from semedge.semcom.jsc import JSCConfig, JSCDecoder, JSCEncoder

FORMAT = "semedge-image-codec/1"
WEIGHTS_FILE = "codec.safetensors"
MANIFEST_FILE = "manifest.json"
STRIDE = 4  # pixels per token side


@dataclass(frozen=True)
class ImageCodecConfig:
    k: int = 16  # real symbols per token (per 4 x 4 pixels)
    d: int = 64  # features per token
    width: int = 48  # conv channels
    hidden: int = 192  # JSC decoder MLP width

    def jsc(self) -> JSCConfig:
        return JSCConfig(d_model=self.d, k=self.k, hidden=self.hidden)

    def uses_per_pixel(self) -> float:
        """Complex channel uses per pixel."""
        return self.k / 2 / STRIDE**2

    @classmethod
    def from_dict(cls, d: dict) -> "ImageCodecConfig":
        allowed = {f.name for f in dataclasses.fields(cls)}
        if set(d) - allowed:
            raise UserError(f"image codec config has unknown fields {sorted(set(d) - allowed)}", f"allowed: {sorted(allowed)}")
        return cls(**d)


class ConvEncoder(nn.Module):
    """[B, 3, H, W] in [0, 1] -> [B, d, H/4, W/4]."""

    def __init__(self, cfg: ImageCodecConfig):
        super().__init__()
        w = cfg.width
        self.net = nn.Sequential(
            nn.Conv2d(3, w // 2, 5, stride=2, padding=2), nn.PReLU(w // 2),  # [B, w/2, H/2, W/2]
            nn.Conv2d(w // 2, w, 5, stride=2, padding=2), nn.PReLU(w),  # [B, w, H/4, W/4]
            nn.Conv2d(w, w, 3, padding=1), nn.PReLU(w),
            nn.Conv2d(w, cfg.d, 3, padding=1),  # [B, d, H/4, W/4]
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image - 0.5)


class ConvDecoder(nn.Module):
    """[B, d, H/4, W/4] -> [B, 3, H, W] in [0, 1]."""

    def __init__(self, cfg: ImageCodecConfig):
        super().__init__()
        w = cfg.width
        self.net = nn.Sequential(
            nn.Conv2d(cfg.d, w, 3, padding=1), nn.PReLU(w),
            nn.Conv2d(w, w, 3, padding=1), nn.PReLU(w),
            nn.ConvTranspose2d(w, w // 2, 5, stride=2, padding=2, output_padding=1), nn.PReLU(w // 2),  # [B, w/2, H/2, W/2]
            nn.ConvTranspose2d(w // 2, 3, 5, stride=2, padding=2, output_padding=1),  # [B, 3, H, W]
        )

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(f))


def to_tokens(f: torch.Tensor) -> torch.Tensor:
    """[B, d, h, w] -> [B, h*w, d] (row-major cells)."""
    return f.flatten(2).transpose(1, 2)


def from_tokens(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, h*w, d] -> [B, d, h, w]."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)


class ImageDeviceHalf(nn.Module):
    """image [B, 3, H, W] -> symbols [B, H*W/16, k]: what the device runs (ONNX)."""

    def __init__(self, encoder: ConvEncoder, jsc_encoder: JSCEncoder):
        super().__init__()
        self.encoder, self.jsc = encoder, jsc_encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.jsc(to_tokens(self.encoder(image)))


class ImageServerHalf(nn.Module):
    """received symbols [B, T, k] + the feature-map size (h, w), T = h*w -> image [B, 3, 4h, 4w]."""

    def __init__(self, jsc_decoder: JSCDecoder, decoder: ConvDecoder):
        super().__init__()
        self.jsc, self.decoder = jsc_decoder, decoder

    def forward(self, y: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.decoder(from_tokens(self.jsc(y), h, w))


class ImageCodec(nn.Module):
    """Both halves; `forward` runs device -> channel -> server (the training graph)."""

    def __init__(self, cfg: ImageCodecConfig = ImageCodecConfig()):
        super().__init__()
        self.cfg = cfg
        self.device_half = ImageDeviceHalf(ConvEncoder(cfg), JSCEncoder(cfg.jsc()))
        self.server_half = ImageServerHalf(JSCDecoder(cfg.jsc()), ConvDecoder(cfg))

    def forward(self, image: torch.Tensor, channel, snr_db, generator=None) -> torch.Tensor:
        """image [B, 3, H, W] -> reconstruction [B, 3, H, W] through `channel` (a semcom.channels layer)."""
        check_image(image)
        x = self.device_half(image)  # [B, T, k]
        y = channel(x, snr_db, generator=generator)
        return self.server_half(y, image.shape[2] // STRIDE, image.shape[3] // STRIDE)


def check_image(image: torch.Tensor) -> None:
    if image.dim() != 4 or image.shape[1] != 3:
        raise UserError(f"image batch has shape {tuple(image.shape)}, expected [batch, 3, H, W]", "pass RGB images, channels first")
    if image.shape[2] % STRIDE or image.shape[3] % STRIDE:
        raise UserError(f"image size {tuple(image.shape[2:])} is not a multiple of {STRIDE}",
                        f"crop or pad the image to multiples of {STRIDE} pixels (image_task.pad_image)")


def save_codec(codec: ImageCodec, folder: str | Path, info: dict) -> Path:
    """Write folder/codec.safetensors (float32) + manifest.json (config, sha256, `info`) atomically."""
    from safetensors.torch import save_file

    from semedge.core.files import atomic_dir, sha256_file

    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        state = {n: t.detach().float().contiguous() for n, t in codec.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE))
        manifest = {"format": FORMAT, "task": "image", "config": dataclasses.asdict(codec.cfg),
                    "uses_per_pixel": codec.cfg.uses_per_pixel(),
                    "files": {WEIGHTS_FILE: sha256_file(tmp / WEIGHTS_FILE)}, **info}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return folder


def load_codec(folder: str | Path) -> tuple[ImageCodec, dict]:
    """(codec in eval mode, manifest) from a folder written by save_codec; checks the hash."""
    from safetensors.torch import load_file

    from semedge.core.files import sha256_file

    folder = Path(folder)
    mpath = folder / MANIFEST_FILE
    if not mpath.is_file():
        raise UserError(f"{folder} has no {MANIFEST_FILE}", "pass a folder written by `semedge train-image --out`")
    manifest = json.loads(mpath.read_text())
    if manifest.get("format") != FORMAT:
        raise UserError(f"{folder} is not an image codec (format {manifest.get('format')!r})", f"expected {FORMAT}")
    if sha256_file(folder / WEIGHTS_FILE) != manifest["files"][WEIGHTS_FILE]:
        raise UserError(f"{folder / WEIGHTS_FILE} does not match its manifest's sha256", "rebuild it with the manifest's command")
    codec = ImageCodec(ImageCodecConfig.from_dict(manifest["config"]))
    codec.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return codec.eval(), manifest
