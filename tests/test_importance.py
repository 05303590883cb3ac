"""Importance-aware rate (semcom/importance.py): budget with the header counted, where the symbols
go, the per-frame layout's decode, and `semedge transmit --k importance` across a process boundary."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from semedge.core.errors import UserError
from semedge.semcom import importance as imp
from semedge.semcom.jsc import JSCCodec, JSCConfig, cut

LEVELS = (16, 32, 48, 64)


def _code(t=40, k=64, seed=0):
    """A code whose symbol power falls with the index (as a nested codec's does)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((t, k)) / np.sqrt(1 + np.arange(k) / 8)).astype(np.float32)


@pytest.mark.parametrize("snr", [math.inf, 10.0, 0.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_budget_respected_including_header(snr, seed):
    code = _code(t=37, seed=seed)
    rate = imp.ImportanceRate(LEVELS, 32)
    lay = rate.layout(code, snr)
    assert lay.header == imp.header_symbols(37, 4) == 37 * 2 * 4  # 2 bits per frame, BPSK at rate 1/4
    assert set(lay.k.tolist()) <= set(LEVELS) and len(lay.k) == 37
    assert lay.symbols == lay.k.sum() + lay.header <= 37 * 32
    assert lay.symbols > 37 * 32 - 16  # the budget is spent, to within one ladder step
    assert len(imp.normalize_stream(code, lay.k)) == lay.k.sum()


def test_no_room_for_a_header_sends_uniform():
    code = _code(t=10)
    for budget in (16, 20, 64):  # at the floor, too close to it to pay the header, at the top
        lay = imp.ImportanceRate(LEVELS, budget).layout(code, 5.0)
        assert lay.uniform and lay.header == 0 and (lay.k == budget).all()
    with pytest.raises(UserError, match="budget"):
        imp.ImportanceRate(LEVELS, 80)
    with pytest.raises(UserError, match="ladder ends at 64"):
        imp.ImportanceRate(LEVELS, 32).layout(_code(k=48), 5.0)


def test_more_symbols_to_important_frames():
    code = np.tile(1 / np.sqrt(1 + np.arange(64) / 8), (30, 1)).astype(np.float32)
    code[:, 16:] *= np.linspace(0.2, 3.0, 30)[:, None].astype(np.float32)  # later frames: more above the floor
    lay = imp.ImportanceRate(LEVELS, 32).layout(code, 10.0)
    score = imp.frame_importance(code, 16)
    assert (np.diff(lay.k) >= 0).all()  # k_t never falls as importance rises
    assert lay.k[-5:].mean() > 32 > lay.k[:5].mean()
    assert np.corrcoef(score, lay.k)[0, 1] > 0.8


def test_low_snr_discounts_weak_symbols():
    code = _code()
    clean, noisy = imp.symbol_gain(code, 32, math.inf), imp.symbol_gain(code, 32, 0.0)
    assert np.isclose(clean[:, :32].mean(), 1.0)  # unit mean power over what the uniform policy sends
    assert (noisy <= clean).all()
    weak = clean < 0.1
    assert (noisy[weak] / clean[weak]).max() < 0.1 < (noisy[~weak] / clean[~weak]).max()


def test_allocate_spends_on_the_best_steps():
    gains = np.array([[1.0, 0.1, 0.1], [5.0, 4.0, 0.2], [0.5, 0.4, 0.3]])
    assert imp.allocate(gains, LEVELS, 48).tolist() == [32, 48, 16]  # steps 5, 4, 1 (per 16 symbols)
    assert imp.allocate(gains, LEVELS, 0).tolist() == [16, 16, 16]


def test_pack_unpack_and_power():
    code = _code(t=6)
    k = np.array([16, 64, 32, 16, 48, 16])
    s = imp.pack(code, k)
    y = imp.unpack(s, k, 64)
    for t, kt in enumerate(k):
        assert np.array_equal(y[t, :kt], code[t, :kt]) and not y[t, kt:].any()
    assert np.isclose(np.mean(imp.normalize_stream(code, k) ** 2), 1.0, atol=1e-5)
    per_frame = imp.normalize_stream(code, k, per="token")
    assert np.isclose(np.mean(per_frame[:16] ** 2), 1.0, atol=1e-5)
    with pytest.raises(UserError, match="stream has"):
        imp.unpack(s[:-1], k, 64)


def test_layout_decode_equals_zero_fill_and_the_cut_codec():
    torch.manual_seed(0)
    codec = JSCCodec(JSCConfig(d_model=24, k=64, hidden=32, skip=True, power="message")).eval()
    h = torch.randn(1, 20, 24)
    with torch.no_grad():
        x = codec.encoder(h)[0]
    k = imp.ImportanceRate(LEVELS, 40).layout(x.numpy(), 5.0).k
    assert len(set(k.tolist())) > 1
    stream = imp.normalize_stream(x.numpy(), k)
    by_hand = torch.zeros(20, 64)
    pos = 0
    for t, kt in enumerate(k):
        by_hand[t, :kt] = torch.from_numpy(stream[pos : pos + kt])
        pos += kt
    with torch.no_grad():
        out = codec.decoder(torch.from_numpy(imp.unpack(stream, k, 64)))
        assert torch.equal(out, codec.decoder(by_hand))
        for t in (int(np.argmin(k)), int(np.argmax(k))):  # each frame decodes as the k_t-symbol cut of the codec
            sub = cut(codec, int(k[t])).decoder(by_hand[t : t + 1, : k[t]])
            assert torch.allclose(out[t], sub[0], atol=1e-5)


def test_send_layout_zeros_what_was_not_sent():
    from semedge.semcom.channels import make_channel
    from semedge.semcom.system import send_layout

    x = torch.from_numpy(_code(t=12))
    rate = imp.ImportanceRate(LEVELS, 32)
    y, lay = send_layout(x, rate, make_channel("awgn"), 5.0, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and lay.symbols <= 12 * 32
    for t, kt in enumerate(lay.k):
        assert not y[t, kt:].any() and y[t, :kt].abs().min() > 0
    clean, lay = send_layout(x, rate, make_channel("none"), math.inf, torch.Generator().manual_seed(0))
    sent = torch.cat([clean[t, :kt] for t, kt in enumerate(lay.k)])
    assert torch.isclose(sent.pow(2).mean(), torch.tensor(1.0), atol=1e-4)  # the uniform policy's average power


def test_parse_k():
    from semedge.cli_transmit import _parse_k

    assert _parse_k("importance") == "importance" and _parse_k("importance:256") == "importance:256"
    assert _parse_k("64") == 64
    for bad in ("importance:x", "importance:0", "imp"):
        with pytest.raises(UserError):
            _parse_k(bad)


# ---------------------------------------------------------------- the real CLI, in a subprocess


def _tiny_checkpoint(tmp_path, nested: bool):
    """(model dir, codec dir): a tiny random Whisper saved as a local checkpoint, and a codec for it."""
    from semedge.semcom.checkpoint import save_checkpoint
    from semedge.semcom.models import load_model, tiny_model

    tiny = tiny_model("whisper", seed=1)
    model_dir = tmp_path / "model"
    tiny.model.save_pretrained(model_dir, safe_serialization=True)
    tiny.tokenizer.save_pretrained(model_dir)
    loaded = load_model(str(model_dir))
    torch.manual_seed(0)
    codec = JSCCodec(JSCConfig(d_model=64, k=32, hidden=32, skip=True, power="message"))
    info = {"rate_training": {"rate_min": 8, "rate_prob": 0.5}} if nested else {}
    return model_dir, save_checkpoint(tmp_path / "codec", loaded, codec, info=info)


def _semedge(*args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "semedge.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def test_cli_importance_needs_a_nested_codec(tmp_path):
    model_dir, ck = _tiny_checkpoint(tmp_path, nested=False)
    r = _semedge("transmit", "--model", str(model_dir), "--jsc", str(ck), "--k", "importance", "--text", "hi", cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "nested" in lines[0] and "--rate-min" in lines[0]


def test_cli_importance_sends_a_layout_within_budget(tmp_path):
    model_dir, ck = _tiny_checkpoint(tmp_path, nested=True)
    r = _semedge("transmit", "--model", str(model_dir), "--jsc", str(ck), "--k", "importance:24", "--snr", "5",
                 "--text", "the boy threw the ball", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    rate, n = out["rate"], out["tokens_sent"]
    assert rate["ladder"] == [8, 16, 24, 32] and out["k"] == 24
    assert rate["header_symbols"] == n * 2 * 4
    assert out["symbols_sent"] == sum(map(sum, rate["k_per_frame"])) + rate["header_symbols"] <= n * 24
    r = _semedge("transmit", "--model", str(model_dir), "--jsc", str(ck), "--k", "importance:40", "--text", "hi", cwd=tmp_path)
    assert r.returncode == 2 and "between 8 and 32" in r.stderr
