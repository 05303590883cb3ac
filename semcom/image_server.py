"""The image task's server half behind `semedge serve`: received symbols -> PNG.

An image package (export/image_package.py) ships its own CNN decoder (IMAGE_DECODER,
safetensors) beside the JSC decoder; the server loads one decoder per distinct sha256,
shared by every package built on it, and one JSC decoder per package.

A message is one image: symbols [T, k'] with T = ceil(H/4) * ceil(W/4) (the device pads
H and W up to multiples of 4, runtime.runner.DeviceRunner.encode_image); the request
names H and W, and the answer is the reconstruction cropped to H x W, as a PNG (8-bit
RGB, lossless) in base64. Each image is decoded on its own, so an answer does not depend
on what else was in its batch.
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np

from semedge.core.errors import UserError

IMAGE_DECODER = "server/image_decoder.safetensors"  # the ConvDecoder's weights (export/image_package.py)
IMAGE_FORMAT = "png"  # how the answer carries each reconstruction (base64 of the PNG file)


def grid_of(height: int, width: int) -> tuple[int, int]:
    """Feature-map cells (rows, columns) of an H x W image: one token per 4 x 4 pixels, padded up."""
    from semedge.semcom.image_codec import STRIDE

    return math.ceil(height / STRIDE), math.ceil(width / STRIDE)


def load_image_decoder(path, config: dict):
    """The ConvDecoder of `config` (ImageCodecConfig fields) with the weights in `path` (safetensors)."""
    from safetensors.torch import load_file

    from semedge.semcom.image_codec import ConvDecoder, ImageCodecConfig

    dec = ConvDecoder(ImageCodecConfig.from_dict(config))
    try:
        dec.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as e:
        raise UserError(f"{path} does not fit the image decoder of {config} ({e})",
                        "re-export the package (semedge export-image)") from None
    return dec.eval()


def png_base64(rgb: np.ndarray) -> str:
    """uint8 [H, W, 3] -> base64 of its PNG file."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_images(half, messages: list[np.ndarray], sizes: list[tuple[int, int]]) -> list[str]:
    """One batch through an ImageServerHalf, image by image, on the calling thread:
    symbols [T, k'] + (H, W) -> base64 PNG of the H x W reconstruction."""
    import torch

    from semedge.semcom.image_data import to_hwc_uint8

    out = []
    with torch.inference_mode():
        for y, (h, w) in zip(messages, sizes):
            rows, cols = grid_of(h, w)
            rec = half(torch.from_numpy(y)[None], rows, cols)[0, :, :h, :w]  # [3, H, W]
            out.append(png_base64(to_hwc_uint8(rec.numpy())))
    return out

