"""Image reconstruction: a small CNN + JSC codec on the device, the JSC decoder + CNN decoder on the server.

Model: semcom/image_codec.py; data: semcom/image_data.py (photos shipped in scikit-image
and scikit-learn, 32 x 32 patches, split by photo); training: semcom/image_train.py
(`semedge train-image`); metrics: semcom/image_eval.py (PSNR, SSIM); baseline:
semcom/image_baseline.py (JPEG -> LDPC -> QAM at equal channel uses). The codec is its
own model: the task uses none of the seq2seq machinery (`features` is empty), and
its methods take the `ImageCodec` where the contract says `loaded` / `split`.

The shipped codec: semcom/assets/image-jsc (manifest.json names the command that built it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from semedge.core.errors import UserError
from semedge.semcom.tasks.base import ExportSpec, Task

_EXPORT = ExportSpec(
    inputs=("image",),
    dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}, "symbols": {0: "batch", 1: "tokens"}},
    computes="CNN encoder on RGB [batch, 3, H, W] in [0, 1] (H, W multiples of 4) + JSC encoder -> symbols [batch, H*W/16, k]",
)
DEFAULT_CODEC = Path(__file__).resolve().parent.parent / "assets" / "image-jsc"
MAX_PIXELS = 16_000_000  # the largest image `transmit_image` takes (memory of the CNN's feature maps)


def default_codec():
    """The shipped codec (ImageCodec, manifest)."""
    from semedge.semcom.image_codec import load_codec

    if not (DEFAULT_CODEC / "manifest.json").is_file():
        raise UserError(f"the shipped image codec is missing ({DEFAULT_CODEC})",
                        "reinstall semedge, or train one: semedge train-image --out DIR and pass --jsc DIR")
    return load_codec(DEFAULT_CODEC)


def load_image(path: str | Path):
    """uint8 RGB [H, W, 3] from an image file (any format Pillow reads; alpha dropped)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--image {path} does not exist", "pass an image file, e.g. --image photo.png")
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise UserError(f"{path} has {im.width}x{im.height} pixels (limit {MAX_PIXELS // 10**6} MP)",
                                "downscale it first")
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{path} is not an image Pillow can read ({e})", "pass a PNG or JPEG file") from None


def pad_image(img):
    """uint8 [H, W, 3] -> (float [3, H', W'] edge-padded to multiples of 4, (H, W))."""
    import numpy as np

    from semedge.semcom.image_codec import STRIDE
    from semedge.semcom.image_data import to_chw

    h, w = img.shape[:2]
    padded = np.pad(img, ((0, -h % STRIDE), (0, -w % STRIDE), (0, 0)), mode="edge")
    return to_chw(padded), (h, w)


@dataclass(frozen=True)
class ImageTask(Task):
    name: str = "image"
    modality: str = "image"
    export: ExportSpec = _EXPORT
    fills_silence: bool = False
    features: frozenset = field(default=frozenset())

    def examples(self, split: str, n: int | None = None, **options) -> list:
        """The split's 32 x 32 patches (float [3, 32, 32] in [0, 1]); each is its own reference."""
        from semedge.semcom.image_data import split_patches

        return list(split_patches(split, n, **options)[0])

    def make_device_half(self, encoder, jsc_encoder):
        from semedge.semcom.image_codec import ImageDeviceHalf

        return ImageDeviceHalf(encoder, jsc_encoder)

    def device_encode(self, split, raw: Sequence, frames: str = "content", window: str = "fit") -> list:
        """`split`: the ImageCodec. Each image [3, H, W] -> its symbols [H*W/16, k]."""
        import numpy as np
        import torch

        with torch.no_grad():
            return [split.device_half(torch.from_numpy(np.asarray(x, dtype=np.float32))[None])[0] for x in raw]

    def calibration_inputs(self, loaded, n: int = 2) -> dict:
        """n validation patches, {"image": [n, 3, 32, 32]} float32."""
        import numpy as np

        from semedge.semcom.image_data import split_patches

        return {"image": np.ascontiguousarray(split_patches("val", n)[0], dtype=np.float32)}

    def write_frontend(self, loaded, root: Path) -> dict:
        """No files: the device feeds RGB pixels scaled to [0, 1]."""
        return {"type": "rgb", "layout": "NCHW", "dtype": "float32", "range": [0.0, 1.0], "multiple_of": 4}

    def max_message_tokens(self, loaded, cap: int) -> int:
        return int(cap)

    def score(self, refs: Sequence, hyps: Sequence, **options) -> dict:
        """Mean PSNR (dB) and SSIM over images [3, H, W] in [0, 1]."""
        import numpy as np

        from semedge.semcom.image_eval import score_images

        s = score_images(np.asarray(refs), np.asarray(hyps))
        return {"psnr": float(np.mean(s["psnr"])), "ssim": float(np.mean(s["ssim"]))}

    def export_onnx(self, codec, path: str | Path, opset: int = 17) -> Path:
        """The device half to one .onnx file (names and dynamic axes from `export`), written atomically."""
        import warnings

        import torch

        from semedge.core.files import atomic_path

        module = codec.device_half.eval()
        sample = torch.from_numpy(self.calibration_inputs(codec, 1)["image"])
        with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings
            torch.onnx.export(module, (sample,), str(tmp), input_names=list(self.export.inputs),
                              output_names=[self.export.output], dynamic_axes=self.export.dynamic_axes,
                              opset_version=opset, dynamo=False, do_constant_folding=True)
        return Path(path)


IMAGE = ImageTask()


def transmit_image(path: str | Path, channel: str = "awgn", snr_db: float = 10.0, seed: int = 0,
                   codec_dir: str | Path | None = None, out: str | Path | None = None) -> dict:
    """One image through device half -> channel -> server half; writes the reconstruction
    (default: beside the input, `<stem>.semedge.png`); returns the metrics and what was sent."""
    import numpy as np
    from PIL import Image

    from semedge.core.files import atomic_path
    from semedge.semcom.image_codec import load_codec  # imports torch
    from semedge.semcom.image_data import to_hwc_uint8
    from semedge.semcom.image_eval import channel_uses, psnr, run_codec, ssim

    img = load_image(path)  # bad input fails before the model loads
    codec, manifest = default_codec() if codec_dir is None else load_codec(codec_dir)
    x, (h, w) = pad_image(img)
    rec = run_codec(codec, x[None], channel, snr_db, seed)[0][:, :h, :w]  # [3, H, W]
    out = Path(out) if out is not None else Path(path).with_name(f"{Path(path).stem}.semedge.png")
    with atomic_path(out) as tmp:
        Image.fromarray(to_hwc_uint8(rec)).save(tmp, format="PNG")
    ref = img.transpose(2, 0, 1).astype(np.float32) / 255.0
    uses = channel_uses(codec, *x.shape[1:])
    return {"psnr": psnr(ref, rec), "ssim": ssim(ref, rec), "output": str(out), "channel": channel,
            "snr_db": snr_db if math.isfinite(snr_db) else "inf", "height": h, "width": w,
            "symbols_sent": 2 * uses, "channel_uses": uses, "channel_uses_per_pixel": uses / (h * w),
            "codec": str(codec_dir or DEFAULT_CODEC), "k": codec.cfg.k, "task": "image"}
