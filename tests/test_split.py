"""The split model: identity codec at infinite SNR reproduces the unsplit model."""

import math

import pytest
import torch

from semedge.semcom.jsc import JSCCodec, JSCConfig, normalize_power
from semedge.semcom.models import load_model, tiny_model
from semedge.semcom.split import build_split
from semedge.semcom.system import run_link, unsplit_outputs
from semedge.core.errors import UserError


def _identity_matches_unsplit(source: str, n: int) -> None:
    """Identity JSC, infinite SNR, full window sent: the split gives the unsplit model's transcripts."""
    from semedge.semcom.tasks.speech import load_split

    audio = [u.audio for u in load_split("test", n, progress=False)]
    split = build_split(load_model(source))
    ref = unsplit_outputs(split, audio, batch_size=10)
    got = run_link(split, audio, channel="awgn", snr_db=math.inf, frames="all", batch_size=10).hyps
    assert len(ref) == n
    assert sum(bool(r) for r in ref) >= n - 2  # real transcripts, not empty strings
    assert got == ref


def test_identity_split_equals_unsplit_quick():
    _identity_matches_unsplit("whisper-tiny.en", 12)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["whisper-tiny.en", "whisper-base"])
def test_identity_split_equals_unsplit_50(source):
    _identity_matches_unsplit(source, 50)


@pytest.mark.parametrize("arch", ["bart", "t5", "marian"])
def test_identity_split_equals_unsplit_text(arch):
    split = build_split(tiny_model(arch))
    texts = ["the boy threw the ball", "a stitch in time saves nine", "hello"]
    assert run_link(split, texts, channel="none", max_new_tokens=8).hyps == unsplit_outputs(split, texts, max_new_tokens=8)


def test_content_frames_plus_silence_fill_shape():
    loaded = tiny_model("whisper")
    split = build_split(loaded)
    y = torch.randn(37, split.k)
    h, mask = split.server.encoder_states([y])
    assert h.shape == (1, 1500, loaded.d_model)
    assert torch.equal(h[0, 37:], split.server.silence[37:])
    assert mask.all()


def test_learned_codec_power_and_rate_mask():
    codec = JSCCodec(JSCConfig(d_model=64, k=16))
    x = codec.encoder(torch.randn(2, 30, 64) * 5 + 3)
    assert x.shape == (2, 30, 16)
    assert torch.allclose(x.pow(2).mean(-1), torch.ones(2, 30), atol=1e-4)  # unit power per token
    xk = normalize_power(x, 4)
    assert torch.allclose(xk[..., :4].pow(2).mean(-1), torch.ones(2, 30), atol=1e-4)
    assert (xk[..., 4:] == 0).all()
    assert codec.decoder(xk[..., :4]).shape == (2, 30, 64)  # decoder zero-pads what was not sent


def test_per_message_power_keeps_token_norms_and_matches_training_pass():
    from semedge.semcom.training.forward import channel_pass

    codec = JSCCodec(JSCConfig(d_model=64, k=16, power="message"))
    h = torch.randn(2, 30, 64) * torch.linspace(0.2, 5, 30).view(1, 30, 1)
    x = codec.encoder(h)
    assert torch.allclose(x.pow(2).mean((1, 2)), torch.ones(2), atol=1e-4)  # unit power per message
    assert x[:, :5].pow(2).mean() < x[:, -5:].pow(2).mean()  # loud tokens stay louder
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[0, 20:] = False  # a shorter message padded in the batch
    for k_keep in (None, torch.tensor([16, 6])):
        _, xt = channel_pass(codec, h, mask, lambda y, s, generator=None: y, torch.zeros(2), k_keep)
        kk = None if k_keep is None else 16
        assert torch.allclose(xt[0, :20], codec.encoder(h[:1, :20], k_keep=kk)[0], atol=1e-5)
        assert (xt[0, 20:] == 0).all()
    assert torch.allclose(xt[1, :, :6], codec.encoder(h[1:], k_keep=6)[0, :, :6], atol=1e-5)
    with pytest.raises(UserError, match="power"):
        JSCConfig(d_model=64, k=16, power="symbol")


def test_codec_wrong_model_is_clear_error():
    from semedge.core.errors import UserError

    with pytest.raises(UserError, match="d_model"):
        build_split(tiny_model("whisper"), JSCCodec(JSCConfig(d_model=999, k=8)))


def test_cached_silence_kv_equals_plain_decoding():
    """The cross-attention cache built from message frames + precomputed silence rows
    decodes exactly as the plain path (full encoder states through the decoder)."""
    split = build_split(tiny_model("whisper"))
    half = split.server
    g = torch.Generator().manual_seed(3)
    msgs = [torch.randn(n, split.k, generator=g) for n in (1, 40, 1500, 7)]
    fast = half.generate(msgs, max_new_tokens=8)
    assert half._silence_cross_kv() is not None
    half._silence_cross_kv = lambda: None  # force the plain path
    assert torch.equal(half.generate(msgs, max_new_tokens=8), fast)


def test_device_half_window_full_equals_hf_encoder_and_fit_is_shorter():
    from semedge.core.frames import FIT_MARGIN, window_frames
    from semedge.semcom.system import device_encode

    loaded = tiny_model("whisper")
    split = build_split(loaded)
    x = torch.randn(2, 80, 3000)
    with torch.no_grad():
        ref = split.codec.encoder(loaded.model.get_encoder()(x).last_hidden_state)
        assert torch.equal(split.device(x), ref)  # the full window is the HF encoder, bit for bit
        assert split.device(x[:, :, :200]).shape == (2, 100, split.k)
    assert window_frames(16000, "fit") == 100 + FIT_MARGIN and window_frames(16000, "full") == 3000
    assert window_frames(16000 * 40, "fit") == 3000
    audio = [torch.randn(8000).numpy() * 0.1, torch.randn(24000).numpy() * 0.1]
    with torch.no_grad():
        fit = device_encode(split, audio)
        full = device_encode(split, audio, window="full")
        one = device_encode(split, audio[1:])
    assert [m.shape[0] for m in fit] == [25, 75] == [m.shape[0] for m in full]
    assert torch.equal(fit[1], one[0])  # a message does not depend on what it was batched with
    assert not torch.allclose(fit[0], full[0])  # the encoder saw a shorter window
