"""Federated split fine-tuning (semcom/federated): the split step alone, then Flower runs, on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from semedge.core.errors import UserError
from semedge.core.frames import content_frames, window_frames
from semedge.semcom.channels import make_channel
from semedge.semcom.federated import split_step as S
from semedge.semcom.jsc import JSCCodec, JSCConfig
from semedge.semcom.models import tiny_model
from semedge.semcom.training.config import LoRASpec
from semedge.semcom.training.data import target_ids

TEXTS = ["the cat sat on the mat", "a quick brown fox jumps"]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("whisper", seed=0)


def _codec(seed=1):
    torch.manual_seed(seed)
    return JSCCodec(JSCConfig(d_model=64, k=16, hidden=64, tail_frames=20))


def _batch(loaded, seconds=(1.0, 1.4), seed=0) -> S.DeviceBatch:
    rng = np.random.default_rng(seed)
    audio = [(0.1 * rng.standard_normal(int(16000 * s))).astype(np.float32) for s in seconds]
    feats = loaded.feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
    mels = [feats[i, :, : window_frames(len(a))] for i, a in enumerate(audio)]
    return S.DeviceBatch(mels, [content_frames(len(a)) for a in audio], [target_ids(loaded, t) for t in TEXTS])


def _grads(mod) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in mod.named_parameters() if p.requires_grad}


def test_split_step_gradients_equal_the_unsplit_loss(tiny):
    codec, batch, ch = _codec(), _batch(tiny), make_channel("rayleigh")
    lora = LoRASpec(r=4, alpha=8, targets=("encoder.self_attn",))
    dev, srv = S.DeviceHalf(tiny, codec, lora), S.ServerSide(tiny, codec)
    for p in dev.trainable().values():  # LoRA's B starts at zero: give it weight so every path carries gradient
        torch.nn.init.normal_(p, std=0.05)
    y, mask = dev(batch, ch, 10.0, torch.Generator().manual_seed(3))
    loss = srv.loss(y, mask, batch.ids)
    loss.backward()
    want_dev, want_srv = _grads(dev), _grads(srv)
    dev.zero_grad(), srv.zero_grad()

    y, mask = dev(batch, ch, 10.0, torch.Generator().manual_seed(3))  # the same draws
    up = S.pack_uplink(y, mask, batch.ids)
    got_loss, down = srv.step(up)
    S.device_backward(y, mask, down)
    assert got_loss == pytest.approx(loss.item(), rel=1e-6)
    assert set(want_dev) == set(_grads(dev)) and any("lora_A" in n for n in want_dev) and "jsc.proj.weight" in want_dev
    for n, g in _grads(dev).items():
        torch.testing.assert_close(g, want_dev[n], rtol=1e-5, atol=1e-7, msg=n)
    for n, g in _grads(srv).items():
        torch.testing.assert_close(g, want_srv[n], rtol=1e-5, atol=1e-7, msg=n)
    assert not any(p.grad is not None for p in srv.model.parameters())  # the decoder stays frozen


def test_the_wire_carries_only_symbols_lengths_labels_and_gradients(tiny):
    codec, batch = _codec(), _batch(tiny)
    dev, srv = S.DeviceHalf(tiny, codec), S.ServerSide(tiny, codec)
    y, mask = dev(batch, make_channel("awgn"), 5.0)
    up = S.pack_uplink(y, mask, batch.ids)
    n = sum(batch.frames)
    assert set(up) == set(S.UPLINK_KEYS)
    assert up["symbols"].shape == (n, 16) and up["symbols"].dtype == np.float32
    assert up["lengths"].tolist() == batch.frames
    assert up["labels"].size == sum(len(s) for s in batch.ids)
    _, down = srv.step(up)
    assert set(down) == {"grad"} and down["grad"].shape == (n, 16)
    assert S.wire_bytes(up)["symbols"] == n * 16 * 4
    with pytest.raises(UserError, match="uplink"):
        srv.step({**up, "audio": np.zeros(3, np.float32)})


def test_device_lora_on_the_decoder_is_refused(tiny):
    with pytest.raises(UserError, match="--lora"):
        S.DeviceHalf(tiny, _codec(), LoRASpec(targets=("decoder.self_attn",)))
