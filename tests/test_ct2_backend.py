"""The CTranslate2 decoder backend, LoRA adapters in packages, and the trained decoder context (tail_frames)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from semedge.semcom.checkpoint import apply_checkpoint, load_checkpoint
from semedge.semcom.ct2_backend import CT2Whisper, convert, merged_copy
from semedge.semcom.models import tiny_model
from semedge.semcom.split import ENC_FRAMES, ServerHalf, build_split
from semedge.semcom.training.config import LoRASpec, TrainConfig
from semedge.semcom.training.data import Example, target_ids
from semedge.semcom.training.forward import decoder_logits
from semedge.semcom.training.trainer import Trainer

TEXTS = ["the cat sat on the mat", "a quick brown fox", "hello world again", "one two three four"]
MAX_NEW = 10


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny Whisper, a codec + decoder LoRA trained a few steps with a 20-frame silence tail."""
    loaded = tiny_model("whisper", seed=3)
    g = torch.Generator().manual_seed(0)
    ex = [Example(f"e{i}", torch.randn(12 + 3 * i, loaded.d_model, generator=g), target_ids(loaded, t), t)
          for i, t in enumerate(TEXTS)]
    cfg = TrainConfig(model="tiny", k=8, hidden=64, steps=8, batch_size=4, lr=3e-3, lora_lr=5e-2, mse_warmup_steps=0,
                      n_val=0, lora=LoRASpec(r=4), snr_low=10, snr_high=20, tail_frames=20)
    tr = Trainer(cfg, loaded=loaded, examples=ex, progress=False)
    path = tr.fit(out=tmp_path_factory.mktemp("ct2") / "ck").path
    ck = load_checkpoint(path, loaded, k=8)
    rx = apply_checkpoint(loaded, ck)
    with torch.no_grad():
        msgs = [ck.codec.encoder(e.h.unsqueeze(0))[0] for e in ex]
    return loaded, rx, ck, path, msgs


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _half(rx, ck, loaded):
    return ServerHalf(rx, ck.codec.decoder, build_split(loaded).server.silence).eval()


def test_tail_frames_is_trained_and_shortens_the_context(trained):
    loaded, rx, ck, _, msgs = trained
    assert ck.codec.cfg.tail_frames == 20
    half = _half(rx, ck, loaded)
    assert half.context_frames([12, 21]) == 41 and half.context_frames([3, 5]) == 40  # at least 2 x tail
    h, _ = half.encoder_states(msgs[:2])
    assert h.shape[1] == 40  # max(longer message 15 + tail 20, 2 x tail)
    assert torch.equal(h[0, 12:], half.silence[12:40])  # silence fill past the shorter message
    # a message decodes the same alone and batched with messages of other lengths (grouped by context)
    alone = [half.transcribe([m], 6)[0] for m in msgs]
    assert half.transcribe(msgs, 6) == alone
    full = ServerHalf(rx, type(ck.codec.decoder)(ck.codec.cfg.__class__(d_model=64, k=8, hidden=64)), half.silence)
    assert full.context_frames([12]) == ENC_FRAMES


def test_merged_copy_equals_the_lora_model(trained):
    loaded, rx, _, _, _ = trained
    lora_layers = [m for m in rx.model.modules() if hasattr(m, "lora_A")]
    assert lora_layers and any(float(m.lora_B["default"].weight.detach().abs().max()) > 0 for m in lora_layers)
    merged = merged_copy(rx.model)
    assert not any(hasattr(m, "lora_A") for m in merged.modules())
    states = torch.randn(2, 40, loaded.d_model)
    dec_in = torch.tensor([[50258, 50259, 50359, 50363]] * 2) % rx.model.config.vocab_size
    with torch.no_grad():
        a = decoder_logits(rx.model, states, dec_in, None, None)
        b = decoder_logits(merged, states, dec_in, None, None)
    assert torch.allclose(a, b, atol=1e-5)
    # the merged weights differ from the base: the adapters are really in there
    with torch.no_grad():
        c = decoder_logits(loaded.model, states, dec_in, None, None)
    assert not torch.allclose(a, c, atol=1e-3)


def test_ct2_float32_decodes_like_torch(trained):
    loaded, rx, ck, _, msgs = trained
    half = _half(rx, ck, loaded)
    ref = [half.generate([m], MAX_NEW)[0].tolist() for m in msgs]
    half.ct2 = CT2Whisper(rx, "float32", threads=1)
    assert half.backend == "ct2-float32"
    got = [half.generate([m], MAX_NEW)[0] for m in msgs]
    special = set(rx.tokenizer.all_special_ids)
    ref = [[t for t in r if t not in special] for r in ref]
    got = [[t for t in g if t not in special] for g in got]
    # the same greedy path (CTranslate2 may stop earlier: the random tiny model emits timestamp tokens it drops)
    assert all(len(g) >= 3 and r[: len(g)] == g for r, g in zip(ref, got)), (ref, got)


def test_ct2_int8_runs_and_the_conversion_is_cached(trained):
    loaded, rx, ck, _, msgs = trained
    p1 = convert(rx, "int8")
    mtime = (p1 / "model.bin").stat().st_mtime_ns
    assert convert(rx, "int8") == p1 and (p1 / "model.bin").stat().st_mtime_ns == mtime
    assert convert(loaded, "int8") != p1  # other weights, other folder
    half = _half(rx, ck, loaded)
    half.ct2 = CT2Whisper(rx, "int8", threads=1)
    out = half.transcribe(msgs[:2], MAX_NEW)
    assert len(out) == 2 and all(isinstance(t, str) for t in out)


def test_ct2_refuses_text_models():
    from semedge.core.errors import UserError

    with pytest.raises(UserError, match="Whisper"):
        convert(tiny_model("bart"), "int8")
    with pytest.raises(UserError, match="compute type"):
        convert(tiny_model("whisper"), "int3")


def test_package_carries_adapters_and_the_server_applies_them(trained, tmp_path):
    from semedge.export.package import ADAPTERS, build_package
    from semedge.runtime.client import send
    from semedge.runtime.package import Package
    from semedge.runtime.server import Registry, ServerConfig, create_app, serve_in_thread

    loaded, rx, ck, path, msgs = trained
    split = build_split(rx, ck.codec)
    pkg = Package.load(build_package(split, tmp_path / "tiny-lora"))
    assert not pkg.has(ADAPTERS)  # no checkpoint given: nothing to carry
    pkg = Package.load(build_package(split, tmp_path / "tiny-lora", jsc_ckpt=path))
    assert pkg.has(ADAPTERS) and ADAPTERS in pkg.manifest["files"]
    reg = Registry([pkg], loader=lambda src: loaded, config=ServerConfig(backend="torch"))
    half = reg.served[pkg.package_id].half
    ref = _half(rx, ck, loaded)
    assert half.transcribe(msgs, MAX_NEW) == ref.transcribe(msgs, MAX_NEW)
    reg.close()
    # over HTTP with the CTranslate2 backend (float32): the same text as in process
    app = create_app([pkg], loader=lambda src: loaded,
                     config=ServerConfig(backend="ct2", compute_type="float32", max_new_tokens=MAX_NEW, workers=2))
    ref.ct2 = CT2Whisper(rx, "float32", threads=1)
    with serve_in_thread(app) as url:
        for m in msgs[:2]:
            assert send(url, pkg.package_id, m.numpy())["text"] == ref.transcribe([m], MAX_NEW)
