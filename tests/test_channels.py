"""Channels: spec parsing, SNR convention, fading statistics, MMSE equalisation,
and agreement between the torch layers and the numpy link."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats

from semedge.runtime import link
from semedge.semcom import channels as tch
from semedge.core.channel_spec import ChannelSpec, noise_std, parse_channel, parse_channels, parse_snr
from semedge.core.errors import UserError

SPECS = ["none", "awgn", "rayleigh", "rayleigh-fast", "rician", "rician:K=10", "rician-fast:K=2"]


def measured_snr_db(x, x_hat):
    """Scale-invariant SNR of x_hat = a*x + e: a^2 * P_x / P_e (immune to the MMSE shrink)."""
    x, x_hat = np.asarray(x, np.float64).ravel(), np.asarray(x_hat, np.float64).ravel()
    a = x_hat @ x / (x @ x)
    err = x_hat - a * x
    return 10 * math.log10(a * a * (x @ x) / (err @ err))


def k_from_moments(h):
    """Moment estimate of the Rician K from E|h|^2 and E|h|^4 (exact for Rician h)."""
    p = np.abs(np.asarray(h).ravel()) ** 2
    m2, m4 = p.mean(), (p * p).mean()
    r = math.sqrt(max(2 * m2 * m2 - m4, 0.0)) / m2  # = nu^2 / Omega
    return r / (1 - r)


# ---------------------------------------------------------------- spec parsing

@pytest.mark.parametrize("text, kind, fast, k", [
    ("none", "none", False, 0.0), ("awgn", "awgn", False, 0.0), ("AWGN ", "awgn", False, 0.0),
    ("rayleigh", "rayleigh", False, 0.0), ("rayleigh-fast", "rayleigh", True, 0.0),
    ("rician", "rician", False, 4.0), ("rician:K=10", "rician", False, 10.0),
    ("rician-fast:K=2", "rician", True, 2.0), ("rician:k=0.5", "rician", False, 0.5),
])
def test_parse_channel(text, kind, fast, k):
    spec = parse_channel(text)
    assert spec == ChannelSpec(kind, fast=fast, k_factor=k)
    assert parse_channel(str(spec)) == spec  # canonical string round-trips


def test_parse_channels_list():
    assert parse_channels("awgn, rayleigh,rician-fast:K=2") == [
        ChannelSpec("awgn"), ChannelSpec("rayleigh"), ChannelSpec("rician", True, 2.0)]
    with pytest.raises(UserError, match="empty entry"):
        parse_channels("awgn,,rayleigh")
    with pytest.raises(UserError):
        parse_channels("")


@pytest.mark.parametrize("bad", ["foo", "", "awgn-fast", "none-fast", "rayleigh:K=3", "rician:Q=2",
                                 "rician:K", "rician:K=-1", "rician:K=inf", "rician:K=abc", "awgn:K=1", 3])
def test_bad_specs_raise(bad):
    with pytest.raises(UserError) as e:
        parse_channel(bad)
    assert e.value.fix  # every error says how to fix it
    if bad in ("foo", "awgn-fast", "rayleigh:K=3"):
        assert "rician-fast:K=<K>" in e.value.fix  # names the accepted forms


def test_parse_snr_and_noise_std():
    assert parse_snr(10) == 10.0 and parse_snr("-5.5") == -5.5 and parse_snr(np.float32(3)) == 3.0
    assert parse_snr("inf") == math.inf and parse_snr(math.inf) == math.inf
    for bad in ["loud", None, float("nan"), "-inf", True, [3]]:
        with pytest.raises(UserError, match="SNR must be a number in dB"):
            parse_snr(bad)
    assert noise_std(20) == pytest.approx(0.1) and noise_std(0) == 1.0 and noise_std("inf") == 0.0


def test_channel_uses():
    assert [link.channel_uses(n) for n in (0, 1, 2, 5, 6)] == [0, 1, 1, 3, 3]
    assert tch.channel_uses(7) == 4
    with pytest.raises(UserError):
        link.channel_uses(-1)


def test_make_channel_types():
    assert isinstance(tch.make_channel("none"), tch.NoChannel)
    assert isinstance(tch.make_channel("awgn"), tch.AWGN)
    r = tch.make_channel("rayleigh-fast")
    assert isinstance(r, tch.Rayleigh) and r.spec.fast
    c = tch.make_channel(ChannelSpec("rician", k_factor=7.0))
    assert isinstance(c, tch.Rician) and c.spec.k_factor == 7.0 and not c.spec.fast
    assert tch.Rician(2, fast=True).spec == parse_channel("rician-fast:K=2")


# ---------------------------------------------------------------- SNR convention

@pytest.mark.parametrize("snr_db", [-5.0, 0.0, 10.0, 20.0])
def test_awgn_measured_snr(snr_db):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((10, 100_000)).astype(np.float32)  # 10^6 unit-power symbols
    x_np = link.transmit(x, "awgn", snr_db, rng)
    g = torch.Generator().manual_seed(1)
    x_t = tch.AWGN()(torch.from_numpy(x), snr_db, generator=g).numpy()
    for x_hat in (x_np, x_t):
        assert abs(measured_snr_db(x, x_hat) - snr_db) < 0.1


def test_awgn_is_y_over_one_plus_sigma2():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 8))
    noise = link.draw_noise(3, 4, rng)
    s2 = 10 ** (-7 / 10)
    y = x + math.sqrt(s2) * np.stack([noise.real, noise.imag], -1).reshape(3, 8)
    np.testing.assert_allclose(link.apply_channel(x, None, noise, 7.0), y / (1 + s2), rtol=1e-12)
    np.testing.assert_allclose(link.transmit(x, "awgn", 7.0, np.random.default_rng(5)).std(), 1 / math.sqrt(1 + s2),
                               rtol=0.2)


def test_fading_snr_is_average_over_h():
    """y = h*s + n before equalisation: E|h s|^2 / E|n|^2 equals the SNR setting."""
    rng = np.random.default_rng(3)
    h = link.draw_fading("rayleigh-fast", 1, 500_000, rng)
    noise = link.draw_noise(1, 500_000, rng)
    s2 = 10 ** (-10 / 10)
    x = rng.standard_normal((1, 1_000_000))
    s = x[:, 0::2] + 1j * x[:, 1::2]
    ratio = np.mean(np.abs(h * s) ** 2) / np.mean(np.abs(math.sqrt(s2) * noise) ** 2)
    assert abs(10 * math.log10(ratio) - 10.0) < 0.1


# ---------------------------------------------------------------- fading statistics

def _draws(spec, n, seed=0):
    """n gains from each implementation (fast fading: one message of n uses)."""
    h_np = link.draw_fading(spec, 1, n, np.random.default_rng(seed))
    h_t = tch.draw_fading(spec, 1, n, torch.Generator().manual_seed(seed), dtype=torch.float64).numpy()
    return h_np, h_t


def test_rayleigh_envelope():
    for h in _draws("rayleigh-fast", 200_000):
        r = np.abs(h).ravel()
        assert r.mean() == pytest.approx(math.sqrt(math.pi) / 2, rel=0.01)
        assert (r ** 2).mean() == pytest.approx(1.0, rel=0.015)
        assert stats.kstest(r, "rayleigh", args=(0, 1 / math.sqrt(2))).pvalue > 1e-3
        # the KS test can fail: a 5% wrong scale is rejected
        assert stats.kstest(r, "rayleigh", args=(0, 1.05 / math.sqrt(2))).pvalue < 1e-6


@pytest.mark.parametrize("k", [2.0, 5.0, 10.0])
def test_rician_k_from_moments(k):
    for h in _draws(f"rician-fast:K={k}", 1_000_000, seed=int(k)):
        assert (np.abs(h) ** 2).mean() == pytest.approx(1.0, rel=0.01)
        assert k_from_moments(h) == pytest.approx(k, rel=0.10)
    # block Rician: one draw per message, same distribution
    h_blk = link.draw_fading(f"rician:K={k}", 200_000, 9, np.random.default_rng(7))
    assert h_blk.shape == (200_000, 1)
    assert k_from_moments(h_blk) == pytest.approx(k, rel=0.10)


def test_block_vs_fast():
    for spec in ["rayleigh", "rician:K=3"]:
        h_np = link.draw_fading(spec, 6, 50, np.random.default_rng(0))
        h_t = tch.draw_fading(spec, 6, 50, torch.Generator().manual_seed(0))
        for h in (h_np, h_t.numpy()):
            assert h.shape == (6, 1)  # one h per message, broadcast over its uses
            assert len(np.unique(h)) == 6  # and a new one per message
    for spec in ["rayleigh-fast", "rician-fast:K=3"]:
        h_np = link.draw_fading(spec, 6, 50, np.random.default_rng(0))
        h_t = tch.draw_fading(spec, 6, 50, torch.Generator().manual_seed(0))
        for h in (h_np, h_t.numpy()):
            assert h.shape == (6, 50) and len(np.unique(h)) == 300
    # the channel output for block fading: the same h over a whole message
    x = np.ones((2, 40))
    h = link.draw_fading("rayleigh", 2, 20, np.random.default_rng(1))
    x_hat = link.apply_channel(x, h, None, 10.0)  # no noise added: x_hat = |h|^2/(|h|^2+s2) * s
    assert np.allclose(x_hat, x_hat[:, :1]) and not np.allclose(x_hat[0], x_hat[1])


def test_layers_use_documented_draw_order():
    """forward = apply_channel(draw_fading, then draw_noise) from the same generator / rng."""
    x = torch.randn(3, 5, 7, dtype=torch.float64)
    for spec in SPECS[1:]:
        layer = tch.make_channel(spec)
        out = layer(x, 4.0, generator=torch.Generator().manual_seed(11))
        g = torch.Generator().manual_seed(11)
        h = tch.draw_fading(spec, 3, 18, g, dtype=torch.float64) if layer.spec.fading else None
        noise = tch.draw_noise(3, 18, g, dtype=torch.float64)
        assert torch.equal(out, tch.apply_channel(x, h, noise, 4.0))
        rng = np.random.default_rng(11)
        h = link.draw_fading(spec, 3, 18, rng)
        noise = link.draw_noise(3, 18, rng)
        np.testing.assert_array_equal(link.transmit(x.numpy(), spec, 4.0, np.random.default_rng(11)),
                                      link.apply_channel(x.numpy(), h, noise, 4.0))


def test_seeded_and_per_message_snr():
    x = torch.randn(4, 10, 16)
    layer = tch.make_channel("rayleigh")
    a = layer(x, 5.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, layer(x, 5.0, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(a, layer(x, 5.0, generator=torch.Generator().manual_seed(1)))
    snr = torch.tensor([-10.0, 30.0, float("inf"), 0.0])
    out = tch.AWGN()(x, snr, generator=torch.Generator().manual_seed(0))
    err = (out - x).pow(2).mean(dim=(1, 2))
    assert err[1] < 0.01 < err[3] < err[0] and err[2] == 0
    snr_np = link.transmit(x.numpy(), "awgn", snr.numpy(), np.random.default_rng(0))
    err_np = ((snr_np - x.numpy()) ** 2).mean(axis=(1, 2))
    assert err_np[1] < 0.01 < err_np[3] < err_np[0] and err_np[2] == 0
    s = tch.sample_snr(64, 0, 20, torch.Generator().manual_seed(0))
    assert s.shape == (64,) and 0 <= s.min() < s.max() <= 20
    s1 = tch.sample_snr(8, 0, 20, per_message=False)
    assert torch.all(s1 == s1[0])


# ---------------------------------------------------------------- torch == numpy, equalisation

@pytest.mark.parametrize("shape", [(4, 3, 5), (2, 8), (3,)])
@pytest.mark.parametrize("equalizer", ["mmse", "zf"])
def test_torch_matches_numpy(shape, equalizer):
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape)
    n_uses = link.channel_uses(x[0].size)
    snr = np.array([-3.0, 0.0, 12.0, np.inf])[: shape[0]]
    for spec in ["awgn", "rayleigh", "rayleigh-fast", "rician-fast:K=2"]:
        h = link.draw_fading(spec, shape[0], n_uses, rng)
        noise = link.draw_noise(shape[0], n_uses, rng)
        ref = link.apply_channel(x, h, noise, snr, equalizer)
        got = tch.apply_channel(torch.from_numpy(x), torch.from_numpy(h), torch.from_numpy(noise),
                                torch.from_numpy(snr), equalizer)
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12, atol=1e-12)
        got32 = tch.apply_channel(torch.from_numpy(x).float(), torch.from_numpy(h), torch.from_numpy(noise),
                                  5.0, equalizer)
        ref32 = link.apply_channel(x.astype(np.float32), h, noise, 5.0, equalizer)
        assert got32.dtype == torch.float32 and ref32.dtype == np.float32
        np.testing.assert_allclose(got32.numpy(), ref32, rtol=1e-4, atol=1e-4)


def test_odd_count_pads_one_zero():
    x = np.arange(1.0, 6.0)[None]  # 5 real symbols -> 3 uses, last = 5 + j0
    h = np.array([[1j, 2.0, -1.0]])
    noise = np.array([[0.0, 0.0, 1j]])
    out = link.apply_channel(x, h, noise, 0.0)  # s2 = 1
    s_hat = np.conj(h) * (h * np.array([[1 + 2j, 3 + 4j, 5]]) + noise) / (np.abs(h) ** 2 + 1)
    np.testing.assert_allclose(out, np.stack([s_hat.real, s_hat.imag], -1).reshape(1, 6)[:, :5])


def test_mmse_equalisation():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((200, 1000))
    h = link.draw_fading("rayleigh-fast", 200, 500, rng)
    noise = link.draw_noise(200, 500, rng)
    mse = {}
    for eq in ("mmse", "zf"):
        mse[eq] = np.mean((link.apply_channel(x, h, noise, 0.0, eq) - x) ** 2)
    assert mse["mmse"] == pytest.approx(0.596, rel=0.02)  # E[s2/(|h|^2+s2)] = e*E1(1) at 0 dB
    assert mse["mmse"] < mse["zf"] / 5
    errs = [np.mean((link.apply_channel(x, h, noise, snr) - x) ** 2) for snr in (0, 10, 20, 40, 60)]
    assert all(a > b for a, b in zip(errs, errs[1:])) and errs[-1] < 1e-4  # x_hat -> x
    xt = torch.from_numpy(x)
    assert torch.mean((tch.apply_channel(xt, torch.from_numpy(h), torch.from_numpy(noise), 60.0) - xt) ** 2) < 1e-4


@pytest.mark.parametrize("spec", SPECS)
def test_inf_snr_is_exact(spec):
    x = torch.randn(3, 4, 5)
    assert torch.equal(tch.make_channel(spec)(x, "inf", generator=torch.Generator().manual_seed(0)), x)
    assert torch.equal(tch.make_channel(spec)(x, torch.full((3,), math.inf)), x)
    xn = x.numpy()
    assert np.array_equal(link.transmit(xn, spec, math.inf, np.random.default_rng(0)), xn)


@pytest.mark.parametrize("spec", SPECS)
def test_gradient_flows(spec):
    x = torch.randn(2, 6, 3, requires_grad=True)
    out = tch.make_channel(spec)(x, 3.0, generator=torch.Generator().manual_seed(0))
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    x.grad = None
    tch.AWGN()(x, 3.0).sum().backward()  # d x_hat / d x = 1/(1+s2) for AWGN
    torch.testing.assert_close(x.grad, torch.full_like(x, 1 / (1 + 10 ** -0.3)))


def test_gradcheck_fading():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    h = tch.draw_fading("rician-fast:K=2", 2, 3, g, dtype=torch.float64)
    noise = tch.draw_noise(2, 3, g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: tch.apply_channel(v, h, noise, 2.0), (x,))


def test_bad_inputs_raise():
    x = torch.randn(3, 4)
    layer = tch.make_channel("awgn")
    for bad in ["loud", float("nan"), torch.zeros(2), torch.tensor([0.0, float("nan"), 1.0])]:
        with pytest.raises(UserError):
            layer(x, bad)
    with pytest.raises(UserError):
        link.transmit(x.numpy(), "awgn", np.zeros(2), np.random.default_rng(0))
    with pytest.raises(UserError, match="noise has shape"):
        link.apply_channel(x.numpy(), None, np.zeros((3, 5), complex), 0.0)
    with pytest.raises(UserError, match="noise has shape"):
        tch.apply_channel(x, None, torch.zeros(3, 1, dtype=torch.complex64), 0.0)
    with pytest.raises(UserError):
        layer(torch.zeros(3, 4, dtype=torch.long), 0.0)
    with pytest.raises(UserError):
        link.transmit(x.numpy(), "awgn", 0.0, rng=42)
    with pytest.raises(UserError):
        link.transmit(x.numpy(), "rayleigh:K=1", 0.0, np.random.default_rng(0))
    with pytest.raises(UserError):
        tch.apply_channel(x, None, None, 0.0, equalizer="ml")


def test_link_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from semedge.runtime import link\n"
        "y = link.transmit(np.ones((2, 3, 5), np.float32), 'rician-fast:K=2', 10.0, np.random.default_rng(0))\n"
        "assert y.shape == (2, 3, 5) and y.dtype == np.float32\n"
        "assert sys.modules['torch'] is None\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_registries_cover_the_declared_kinds():
    """One class per channel name in each implementation; the names come from core."""
    from semedge.core.channel_spec import KINDS

    assert tuple(link.CHANNELS) == KINDS and tuple(tch.CHANNELS) == KINDS
    for spec in SPECS:
        assert link.make_channel(spec).spec == parse_channel(spec)
        assert tch.make_channel(spec).spec == parse_channel(spec)
