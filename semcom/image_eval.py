"""Image metrics (scikit-image PSNR and SSIM, per image) and the codec through the channel.

PSNR and SSIM compare float RGB in [0, 1] (data_range 1); SSIM is scikit-image's
structural_similarity with its default 7 x 7 window over the three channels. PSNR of
an exact copy is capped at PSNR_CAP dB so means stay finite.
"""

from __future__ import annotations

import numpy as np

PSNR_CAP = 100.0


def _hwc(x: np.ndarray) -> np.ndarray:
    """[3, H, W] -> [H, W, 3] float64."""
    return np.asarray(x, dtype=np.float64).transpose(1, 2, 0)


def psnr(ref: np.ndarray, rec: np.ndarray) -> float:
    """PSNR (dB) of one image [3, H, W] in [0, 1]."""
    from skimage.metrics import peak_signal_noise_ratio

    a, b = _hwc(ref), _hwc(np.clip(rec, 0.0, 1.0))
    if np.array_equal(a, b):
        return PSNR_CAP
    return float(min(PSNR_CAP, peak_signal_noise_ratio(a, b, data_range=1.0)))


def ssim(ref: np.ndarray, rec: np.ndarray) -> float:
    """SSIM of one image [3, H, W] in [0, 1] (scikit-image, channel_axis last)."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(_hwc(ref), _hwc(np.clip(rec, 0.0, 1.0)), data_range=1.0, channel_axis=-1))


def score_images(refs: np.ndarray, recs: np.ndarray) -> dict:
    """{"psnr": [N], "ssim": [N]} per image for refs, recs [N, 3, H, W]."""
    return {"psnr": [psnr(a, b) for a, b in zip(refs, recs)], "ssim": [ssim(a, b) for a, b in zip(refs, recs)]}


def run_codec(codec, patches: np.ndarray, channel: str, snr_db, seed: int = 0, batch: int = 256) -> np.ndarray:
    """The codec through `channel` at `snr_db`: patches [N, 3, H, W] -> reconstructions [N, 3, H, W]."""
    import torch

    from semedge.semcom.channels import make_channel

    layer = make_channel(channel)
    gen = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for i in range(0, len(patches), batch):
            x = torch.from_numpy(np.ascontiguousarray(patches[i : i + batch], dtype=np.float32))
            out.append(codec(x, layer, snr_db, gen).numpy())
    return np.concatenate(out)


def channel_uses(codec, height: int, width: int) -> int:
    """Complex channel uses for one H x W image: ceil(tokens * k / 2)."""
    from semedge.semcom.image_codec import STRIDE

    return ((height // STRIDE) * (width // STRIDE) * codec.cfg.k + 1) // 2
