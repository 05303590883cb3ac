"""Image task: data split, codec export parity on ONNX Runtime, training, metrics, the JPEG baseline, transmit."""

import numpy as np
import pytest
import torch

from semedge.core.errors import UserError
from semedge.semcom.image_codec import ImageCodec, ImageCodecConfig, load_codec, save_codec
from semedge.semcom.image_data import PHOTOS, photos, split_patches
from semedge.semcom.tasks.image import DEFAULT_CODEC, IMAGE, transmit_image
from semedge.semcom.tasks.registry import get_task

TINY = ImageCodecConfig(k=8, d=16, width=16, hidden=32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_registered_and_split_by_photo():
    assert get_task("image") is IMAGE and IMAGE.modality == "image"
    names = [p.name for p in PHOTOS]
    assert len(names) == len(set(names))
    assert {p.split for p in PHOTOS} == {"train", "val", "test"}
    # the stereo pair shows one scene: both halves in one split
    assert {p.split for p in PHOTOS if p.name.startswith("motorcycle")} == {"train"}
    x, src = split_patches("test")
    assert x.shape[1:] == (3, 32, 32) and x.dtype == np.float32 and len(x) >= 200
    assert set(src) == {p.name for p in photos("test")} and 0.0 <= x.min() and x.max() <= 1.0


def test_channel_uses_per_pixel():
    codec = ImageCodec(TINY)
    y = codec.device_half(torch.rand(2, 3, 32, 48))
    assert y.shape == (2, 8 * 12, 8)  # one token per 4 x 4 pixels
    assert torch.allclose(y.pow(2).mean(-1), torch.ones(2, 96), atol=1e-4)  # unit power per token
    assert TINY.uses_per_pixel() == 8 / 32
    with pytest.raises(UserError, match="multiple of 4"):
        codec(torch.rand(1, 3, 30, 32), torch.nn.Identity(), 10.0)


def test_export_parity_on_onnxruntime(tmp_path):
    from semedge.export.onnx import check_parity, describe_io

    torch.manual_seed(0)
    codec = ImageCodec(TINY).eval()
    path = IMAGE.export_onnx(codec, tmp_path / "device.onnx")
    ins, outs = describe_io(path)
    assert [i["name"] for i in ins] == ["image"] and [o["name"] for o in outs] == ["symbols"]
    calib = [IMAGE.calibration_inputs(codec, 2), {"image": np.random.default_rng(0).random((1, 3, 48, 64), dtype=np.float32)}]
    rep = check_parity(path, codec.device_half, calib)  # raises beyond fp32 tolerance
    assert rep.ok and rep.n_inputs == 3


def test_shipped_codec_exports_with_parity(tmp_path):
    from semedge.export.onnx import check_parity

    codec, manifest = load_codec(DEFAULT_CODEC)
    assert manifest["task"] == "image" and "semedge train-image" in manifest["command"]
    path = IMAGE.export_onnx(codec, tmp_path / "device.onnx")
    assert check_parity(path, codec.device_half, IMAGE.calibration_inputs(codec, 4)).ok


def test_tiny_training_lowers_the_loss():
    from semedge.semcom.image_train import ImageTrainConfig, train_image_codec

    res = train_image_codec(ImageTrainConfig(codec=TINY, steps=30, batch_size=8, lr=5e-3, warmup=5, n_val=8))
    s = res.summary()
    assert s["steps_done"] == 30 and s["loss_last"] < 0.8 * s["loss_first"]


def test_save_load_round_trip_and_tamper(tmp_path):
    codec = ImageCodec(TINY)
    save_codec(codec, tmp_path / "c", {"command": "test"})
    back, manifest = load_codec(tmp_path / "c")
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(back.device_half(x), codec.eval().device_half(x))
    (tmp_path / "c" / "codec.safetensors").write_bytes(b"x" * 10)
    with pytest.raises(UserError, match="sha256"):
        load_codec(tmp_path / "c")


def test_psnr_ssim_on_a_known_pair():
    from semedge.semcom.image_eval import PSNR_CAP, psnr, ssim

    ref = np.full((3, 32, 32), 0.5, dtype=np.float32)
    assert psnr(ref, ref + 0.1) == pytest.approx(20.0, abs=1e-4)  # MSE 0.01 on a peak of 1
    assert psnr(ref, ref) == PSNR_CAP and ssim(ref, ref) == pytest.approx(1.0)
    # constant images a, b: only SSIM's luminance term is left, (2ab + C1) / (a^2 + b^2 + C1), C1 = (0.01 * 1)^2
    assert ssim(ref, ref + 0.1) == pytest.approx((2 * 0.5 * 0.6 + 1e-4) / (0.25 + 0.36 + 1e-4), abs=1e-4)


def test_jpeg_fits_the_budget_and_decodes():
    from semedge.semcom.image_baseline import JpegLinkConfig, _payload, jpeg_decode, jpeg_fit
    from semedge.semcom.image_data import to_hwc_uint8

    cfg = JpegLinkConfig(uses=512, bits_per_symbol=2, rate=0.5)
    assert cfg.info_bits == 512 and cfg.link().channel_uses(cfg.info_bits) == 512
    img = to_hwc_uint8(split_patches("test", 3)[0][1])
    q, payload = jpeg_fit(img, cfg.info_bits // 8)
    assert len(payload) <= 64 and payload[0] == q
    assert q == 95 or len(_payload(img, q + 1)) > 64  # the highest quality that fits
    out = jpeg_decode(payload.ljust(64, b"\0"), 32, 32)  # zero padding after the scan is ignored
    assert out.shape == (32, 32, 3) and np.abs(out.astype(int) - img.astype(int)).mean() < 20
    assert jpeg_decode(b"\xff" + payload[1:], 32, 32) is None  # a broken quality byte decodes to nothing
    with pytest.raises(UserError, match="whole number of bytes"):
        JpegLinkConfig(uses=511, bits_per_symbol=2, rate=0.5)


def test_jpeg_link_clean_at_high_snr_and_cliff_at_low():
    from semedge.semcom.image_baseline import JpegLinkConfig, send_patches

    x = split_patches("test", 8)[0]
    cfg = JpegLinkConfig(uses=512, bits_per_symbol=2, rate=0.5)
    good, st = send_patches(x, cfg, "awgn", 15.0)
    assert st["decoded"] == 1.0 and st["ber"] == 0.0
    bad, st_bad = send_patches(x, cfg, "awgn", -5.0)
    assert st_bad["ber"] > 0.05 and np.abs(bad - x).mean() > np.abs(good - x).mean()


def test_transmit_image_writes_the_reconstruction(tmp_path):
    from PIL import Image

    from semedge.semcom.image_data import load_photo

    src = tmp_path / "photo.png"
    Image.fromarray(np.ascontiguousarray(load_photo("coffee")[:50, :70])).save(src)  # 50 x 70: padded to 52 x 72
    out = transmit_image(src, "awgn", 20.0)
    rec = np.asarray(Image.open(out["output"]))
    assert out["output"] == str(tmp_path / "photo.semedge.png") and rec.shape == (50, 70, 3)
    assert out["psnr"] > 15 and 0 < out["ssim"] <= 1
    assert out["channel_uses"] == 13 * 18 * IMAGE_K() // 2
    with pytest.raises(UserError, match="does not exist"):
        transmit_image(tmp_path / "missing.png")


def IMAGE_K() -> int:
    return load_codec(DEFAULT_CODEC)[0].cfg.k


def _semedge_transmit(*args):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "semedge.cli", "transmit", *args], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)


def test_cli_transmit_image_bad_input_is_one_line(tmp_path):
    r = _semedge_transmit("--task", "image", "--image", str(tmp_path / "missing.png"))
    assert r.returncode == 2 and "missing.png" in r.stderr and "Traceback" not in r.stderr
    assert len([line for line in r.stderr.splitlines() if line.strip()]) == 1


@pytest.mark.slow
def test_cli_transmit_image_json(tmp_path):
    import json

    from PIL import Image

    from semedge.semcom.image_data import load_photo

    src = tmp_path / "p.png"
    Image.fromarray(np.ascontiguousarray(load_photo("chelsea")[:64, :64])).save(src)
    r = _semedge_transmit("--task", "image", "--image", str(src), "--snr", "5", "--channel", "rayleigh", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"psnr", "ssim", "output", "channel_uses_per_pixel"} <= set(out) and (tmp_path / "p.semedge.png").is_file()
    assert out["channel_uses_per_pixel"] == 0.5 and out["channel"] == "rayleigh"
