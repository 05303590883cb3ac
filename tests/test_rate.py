"""Rate adaptation: cutting a nested codec, the k rule, and rewriting a checkpoint."""

import math
from types import SimpleNamespace

import pytest
import torch

from semedge.semcom import rate as R
from semedge.semcom.checkpoint import load_checkpoint, rewrite_checkpoint, save_checkpoint
from semedge.core.errors import UserError
from semedge.semcom.jsc import JSCCodec, JSCConfig, cut, init_pca


def _codec(k=16, d=32, skip=False):
    torch.manual_seed(0)
    c = JSCCodec(JSCConfig(d_model=d, k=k, hidden=64, skip=skip))
    c.set_stats(torch.randn(50, d) * 3 + 1)
    return c.eval()


def test_cut_is_exactly_truncation():
    c = _codec()
    h = torch.randn(2, 7, 32)
    small = cut(c, 6)
    assert small.cfg.k == 6 and small.encoder.proj.weight.shape == (6, 32) and small.decoder.net[0].weight.shape[1] == 6
    with torch.no_grad():
        x_full = c.encoder(h, k_keep=6)[..., :6]
        x_cut = small.encoder(h)
        # The same arithmetic up to float rounding: BLAS may sum a 6-row and a 16-row matmul in another order.
        assert torch.allclose(x_full, x_cut, rtol=0, atol=2e-6)
        y = x_cut + 0.1 * torch.randn_like(x_cut)
        assert torch.allclose(c.decoder(y), small.decoder(y), atol=1e-6)
    with pytest.raises(UserError):
        cut(c, 17)
    with pytest.raises(UserError):
        cut(JSCCodec(JSCConfig(d_model=8, k=8, identity=True)), 4)


def test_cut_keeps_the_skip_path():
    c = _codec(skip=True)
    small = cut(c, 6)
    assert small.decoder.skip.weight.shape == (32, 6)
    y = torch.randn(2, 7, 6)
    with torch.no_grad():
        assert torch.allclose(c.decoder(y), small.decoder(y), atol=1e-6)


def test_pca_start_rebuilds_low_rank_features():
    torch.manual_seed(1)
    basis = torch.randn(4, 32)
    h = (torch.randn(500, 4) @ basis) * 0.1 + 2.0
    c = JSCCodec(JSCConfig(d_model=32, k=4, hidden=64, skip=True))
    c.set_stats(h)
    evals = init_pca(c, h)
    assert evals[4:].sum() < 1e-3 * evals[:4].sum()  # rank 4
    with torch.no_grad():
        rebuilt = c.decoder(c.encoder(h))
    rel = (rebuilt - h).pow(2).sum() / (h - h.mean(0)).pow(2).sum()
    assert rel < 0.5  # the direction is exact; only each token's norm is lost to power normalisation
    with torch.no_grad():  # a random start rebuilds nothing
        plain = JSCCodec(JSCConfig(d_model=32, k=4, hidden=64))
        plain.set_stats(h)
        rel_plain = (plain.decoder(plain.encoder(h)) - h).pow(2).sum() / (h - h.mean(0)).pow(2).sum()
    assert rel_plain > 0.9
    with pytest.raises(UserError):
        init_pca(plain, h)


def test_pca_start_for_another_encoder_maps_to_the_target():
    torch.manual_seed(2)
    latent = torch.randn(800, 4)
    h = latent @ torch.randn(4, 16) + 1.0  # the device encoder's features (d_in 16)
    target = latent @ torch.randn(4, 32) - 0.5  # the server model's features of the same tokens
    c = JSCCodec(JSCConfig(d_model=32, k=6, hidden=64, skip=True, d_in=16))
    c.set_stats(h, target)
    with pytest.raises(UserError, match="server model's features"):
        init_pca(c, h)
    init_pca(c, h, target)
    with torch.no_grad():
        rebuilt = c.decoder(c.encoder(h))
    rel = (rebuilt - target).pow(2).sum() / (target - target.mean(0)).pow(2).sum()
    assert rel < 0.3  # a random start: about 1.3


def test_rule_and_restrict():
    table = {math.inf: {16: 0.50, 32: 0.41, 48: 0.40, 64: 0.40},
             10.0: {16: 0.60, 32: 0.45, 48: 0.415, 64: 0.41},
             0.0: {16: 0.9, 32: 0.7, 48: 0.6, 64: 0.55}}
    assert R.rule_k(table, 64, 10.0, 0.02) == 48
    assert R.rule_k(table, 64, 10.0, 0.05) == 32
    assert R.rule_k(table, 64, 0.0, 0.02) == 64  # nothing qualifies: the full k
    with pytest.raises(UserError):
        R.rule_k(table, 64, 5.0)
    small = R.restrict(table, 48)
    assert all(max(row) == 48 for row in small.values())
    pol = R.fit_policy(48, small)
    assert all(math.isfinite(s) for s, _ in pol.table) and "inf" in pol.measured
    assert pol.choose(0) == 48 and pol.choose(10) == 48


def test_rewrite_checkpoint_cut(tmp_path):
    loaded = SimpleNamespace(source="tiny", weight_hash="ab" * 32, d_model=32, kind="speech")
    c = _codec()
    src = save_checkpoint(tmp_path / "src", loaded, c, adapters={"w": torch.ones(3)}, info={"command": "x"})
    ck = load_checkpoint(src)
    out = rewrite_checkpoint(ck, tmp_path / "cut", cut(c, 8), cut_from={"k": 16})
    ck2 = load_checkpoint(out)
    assert ck2.k == 8 and ck2.manifest["cut_from"] == {"k": 16} and ck2.manifest["command"] == "x"
    assert torch.equal(ck2.adapters["w"], torch.ones(3))
    assert torch.equal(ck2.codec.encoder.proj.weight, c.encoder.proj.weight[:8])
    # in place: only the manifest fields change; file hashes stay valid
    rewrite_checkpoint(ck2, out, rate_policy=R.fit_policy(8, {10.0: {4: 0.3, 8: 0.3}}).to_dict())
    assert load_checkpoint(out).rate_policy.choose(10) == 4
