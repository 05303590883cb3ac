"""Trainer, checkpoints, rate policy and the conventional baseline, on tiny random models."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from semedge.core.errors import UserError
from semedge.semcom.checkpoint import apply_checkpoint, load_checkpoint, load_default_codec
from semedge.semcom.models import tiny_model
from semedge.semcom.rate import RatePolicy, fit_policy
from semedge.semcom.training import artifacts, evaluate
from semedge.semcom.training.config import LoRASpec, TrainConfig
from semedge.semcom.training.data import Example, target_ids, text_examples
from semedge.semcom.training.evaluate import transmit_examples
from semedge.semcom.training.forward import decoder_logits
from semedge.semcom.training.trainer import Trainer

TEXTS = ["the cat sat on the mat", "a quick brown fox", "hello world again", "one two three four"]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("whisper", seed=0)


def _examples(loaded, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Example(f"e{i}", torch.randn(12 + 3 * i, loaded.d_model, generator=g), target_ids(loaded, t), t)
            for i, t in enumerate(TEXTS)]


def _cfg(**kw):
    base = dict(model="tiny", k=8, hidden=64, steps=24, batch_size=4, lr=3e-3, lora_lr=2e-2, mse_warmup_steps=0,
                n_val=0, lora=LoRASpec(r=4), snr_low=10, snr_high=20)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """One short run shared by the tests below: LoRA + rate training, checkpoint written."""
    out = tmp_path_factory.mktemp("train") / "ck"
    tr = Trainer(_cfg(steps=14, rate_min=2), loaded=tiny, examples=_examples(tiny), progress=False)
    res = tr.fit(out=out)
    return tr, res, out


def test_training_lowers_loss(trained):
    tr, res, out = trained
    first, last = np.mean(res.losses[:3]), np.mean(res.losses[-3:])
    assert math.isfinite(last)
    assert last < first - 0.15, (first, last)
    assert (out / "manifest.json").exists() and res.steps == 14


def test_fast_cross_attention_matches_full_window(trained):
    tr = trained[0]  # LoRA weights have moved away from zero
    b, _ = tr.batch(0)
    states = torch.where(b["mask"].unsqueeze(-1), b["h"], tr.silence[: b["h"].shape[1]].unsqueeze(0))
    with torch.no_grad():
        fast = decoder_logits(tr.model, states, b["dec_in"], None, tr.silence, tr.sil_kv, fast=True)
        full = decoder_logits(tr.model, states, b["dec_in"], None, tr.silence, None, fast=False)
    assert torch.allclose(fast, full, atol=1e-4)


def test_checkpoint_roundtrip_identical_outputs(tiny, trained, tmp_path):
    ex = _examples(tiny)
    tr = trained[0]
    path = tr.save(tmp_path / "ck", metrics={"note": 1})
    ck = load_checkpoint(path, tiny, k=8)
    man = json.loads((path / "manifest.json").read_text())
    assert man["model"]["weight_hash"] == tiny.weight_hash and man["jsc"]["k"] == 8
    assert man["snr_range_db"] == [10, 20] and man["metrics"] == {"note": 1} and "git_commit" in man
    rx = apply_checkpoint(tiny, ck)
    lt, ct = tr.receiver()
    h = ex[0].h.unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(ct.encoder(h), ck.codec.encoder(h))
        assert torch.equal(ct.encoder(h, k_keep=3), ck.codec.encoder(h, k_keep=3))
        y = ct.encoder(h)
        assert torch.equal(ct.decoder(y), ck.codec.decoder(y))
        b, _ = tr.batch(0)
        states = torch.where(b["mask"].unsqueeze(-1), b["h"], tr.silence[: b["h"].shape[1]].unsqueeze(0))
        a = decoder_logits(lt.model, states, b["dec_in"], None, tr.silence, None, fast=False)
        c = decoder_logits(rx.model, states, b["dec_in"], None, tr.silence, None, fast=False)
    assert torch.equal(a, c)
    h1, _ = transmit_examples(lt, ct, ex[:2], "awgn", 5.0, seed=3, max_new_tokens=4)
    h2, _ = transmit_examples(rx, ck.codec, ex[:2], "awgn", 5.0, seed=3, max_new_tokens=4)
    assert h1 == h2


def test_resume_continues_from_checkpoint(tiny, tmp_path):
    ex = _examples(tiny)
    tr = Trainer(_cfg(steps=2, lora=None), loaded=tiny, examples=ex, progress=False)
    tr.fit(out=tmp_path / "ck")
    tr2 = Trainer(_cfg(steps=3, lora=None), loaded=tiny, examples=ex, progress=False)
    assert tr2.resume(tmp_path / "ck") and tr2.step == 2
    assert torch.equal(tr2.codec.encoder.proj.weight, tr.codec.encoder.proj.weight)
    tr2.fit(out=tmp_path / "ck")
    assert tr2.step == 3
    tr3 = Trainer(_cfg(steps=3, k=16, lora=None), loaded=tiny, examples=ex, progress=False)
    with pytest.raises(UserError, match="different settings"):
        tr3.resume(tmp_path / "ck")


def test_wrong_checkpoint_is_a_clear_error(tiny, trained, tmp_path):
    path = trained[2]
    other = tiny_model("whisper", seed=1)
    with pytest.raises(UserError, match="was trained on"):
        load_checkpoint(path, other)
    with pytest.raises(UserError, match="k=8"):
        load_checkpoint(path, tiny, k=16)
    bart = tiny_model("bart")
    bart_like = type(bart)(**{**bart.__dict__, "d_model": 128})
    with pytest.raises(UserError, match="d_model"):
        load_checkpoint(path, bart_like)
    with pytest.raises(UserError, match="no manifest.json"):
        load_checkpoint(tmp_path)
    bad = tmp_path / "bad"
    path = trained[0].save(tmp_path / "ck")
    shutil.copytree(path, bad)
    data = bytearray((bad / "codec.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bad / "codec.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match="hash"):
        load_checkpoint(bad, tiny)
    assert load_default_codec(tiny) is None  # no shipped codec for a random model


def test_nan_stops_with_message_and_keeps_last_good(tiny, tmp_path, monkeypatch):
    tr = Trainer(_cfg(steps=4, save_every=2, lora=None), loaded=tiny, examples=_examples(tiny), progress=False)
    real = tr.train_step
    monkeypatch.setattr(tr, "train_step", lambda s: float("nan") if s == 3 else real(s))
    with pytest.raises(UserError, match="NaN") as e:
        tr.fit(out=tmp_path / "ck")
    assert "last good checkpoint" in str(e.value)
    assert load_checkpoint(tmp_path / "ck", tiny).manifest["step"] == 2


def test_text_model_trains(tmp_path):
    bart = tiny_model("bart")
    ex = text_examples(bart, TEXTS)
    tr = Trainer(_cfg(steps=2, lora=None), loaded=bart, examples=ex, progress=False)
    res = tr.fit()
    assert all(math.isfinite(x) for x in res.losses)


def test_qlora_trains_on_nf4_base(tiny):
    pytest.importorskip("bitsandbytes")
    tr = Trainer(_cfg(steps=2, qlora=True), loaded=tiny, examples=_examples(tiny), progress=False)
    assert any(type(m).__name__ == "Linear4bit" for m in tr.model.modules())
    res = tr.fit()
    assert all(math.isfinite(x) for x in res.losses)


def test_lora_spec_parsing_and_errors():
    s = LoRASpec.parse("r=4,alpha=8,targets=decoder.encoder_attn,proj=q_proj")
    assert (s.r, s.alpha, s.targets, s.projections) == (4, 8, ("decoder.encoder_attn",), ("q_proj",))
    with pytest.raises(UserError):
        LoRASpec.parse("r=x")
    with pytest.raises(UserError):
        LoRASpec.parse("targets=middle.attn")
    with pytest.raises(UserError):
        _cfg(qlora=True, lora=None).validate()


def test_rate_policy_fit_and_choose():
    table = {0.0: {16: 0.9, 32: 0.6, 64: 0.5}, 10.0: {16: 0.5, 32: 0.31, 64: 0.30}, 20.0: {16: 0.29, 32: 0.3, 64: 0.3}}
    pol = fit_policy(64, table, tolerance=0.02)
    assert pol.table == [(0.0, 64), (10.0, 32), (20.0, 16)]
    assert pol.choose(-5) == 64 and pol.choose(5) == 64 and pol.choose(12) == 32 and pol.choose(math.inf) == 16
    assert RatePolicy.from_dict(pol.to_dict()).table == pol.table
    # monotone: a low SNR never sends fewer symbols than a higher one
    pol2 = fit_policy(64, {0.0: {16: 0.1, 64: 0.1}, 10.0: {16: 0.9, 64: 0.1}})
    assert pol2.choose(0) == 64


def test_conventional_link_bits():
    pytest.importorskip("sionna.phy")
    from semedge.semcom.baseline import BaselineConfig, transmit_bits

    cfg = BaselineConfig(block_bits=256)
    bits = np.random.default_rng(0).integers(0, 2, 600).astype(np.uint8)
    g = torch.Generator().manual_seed(0)
    rx, uses = transmit_bits(bits, cfg, "awgn", 10.0, g)
    assert np.array_equal(rx, bits) and uses == cfg.channel_uses(600) == 3 * 512 // 2
    rx, _ = transmit_bits(bits, cfg, "awgn", -5.0, g)
    assert (rx != bits).mean() > 0.05


def test_conventional_link_receiver_backend(tiny):
    from semedge.semcom.baseline import ConventionalLink

    with pytest.raises(UserError, match="backend"):
        ConventionalLink(tiny, backend="onnx")


def test_codec2_roundtrip():
    if shutil.which("c2enc") is None:
        pytest.skip("codec2 not installed")
    from semedge.semcom.baseline import codec2_decode, codec2_encode

    t = np.arange(16000) / 16000
    audio = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    bits = codec2_encode(audio, "1600")
    assert len(bits) == 200  # 1600 b/s for 1 s
    out = codec2_decode(bits, "1600")
    assert abs(len(out) - 16000) <= 640 and np.abs(out).max() > 0.01


def test_eval_takes_snrs_after_one_flag(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from semedge.cli import app

    seen = {}

    def fake(model, jsc, chans, snrs, **kw):  # noqa: ARG001
        seen["snrs"] = list(snrs)
        return [{"system": "s", "channel": "awgn", "snr_db": s, "wer": 0.1, "bleu": 1.0, "channel_uses": 1.0, "n": 10} for s in snrs]

    monkeypatch.setattr(evaluate, "evaluate_system", fake)
    monkeypatch.setattr(artifacts, "plot_results", lambda rows, path: None)
    r = CliRunner().invoke(app, ["eval", "--jsc", "x", "--channel", "awgn", "--snr", "-5", "0", "5.5", "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    assert seen["snrs"] == [-5.0, 0.0, 5.5]
    r = CliRunner().invoke(app, ["eval", "--jsc", "x", "--snr", "-5", "ten", "--out", str(tmp_path / "e")])
    assert isinstance(r.exception, UserError) and "ten" in str(r.exception)  # semedge.cli.main prints it, exit 2


def test_rate_cut_needs_a_folder():
    from typer.testing import CliRunner

    from semedge.cli import app

    r = CliRunner().invoke(app, ["rate", "--cut", "rule"])
    assert isinstance(r.exception, UserError) and "--cut-out" in str(r.exception)


def test_teacher_kl_recipe_lowers_the_kl_and_is_zero_for_the_teacher(tiny):
    """--kl-weight: the unsplit model is the teacher; an identity-perfect codec would score 0."""
    ex = _examples(tiny)
    tr = Trainer(_cfg(steps=30, lora=None, kl_weight=1.0, ce_weight=0.0), loaded=tiny, examples=ex, progress=False)
    b, g = tr.batch(0)
    sel = b["tgt"] != -100
    with torch.no_grad():
        a = tr._logits(tr.loaded.model, b["h"], b, sel)
        same = torch.nn.functional.kl_div(a.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="batchmean")
    assert float(same) == pytest.approx(0.0, abs=1e-6)
    res = tr.fit()
    first, last = np.mean(res.losses[:3]), np.mean(res.losses[-3:])
    assert last < first * 0.8, (first, last)


def test_loss_weights_are_validated():
    with pytest.raises(UserError, match="--kl-weight"):
        _cfg(kl_weight=0.0, ce_weight=0.0).validate()
    with pytest.raises(UserError, match="--augment"):
        _cfg(augment=1.5).validate()


def test_train_on_an_audiofolder(tiny, tmp_path, monkeypatch):
    """--data DIR: the user's recordings (any rate) become training and validation examples."""
    import soundfile as sf

    from semedge.semcom.tasks.speech import synthesize

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    d = tmp_path / "data"
    d.mkdir()
    rows = ["file_name,transcription"]
    for i, t in enumerate(TEXTS * 3):
        sf.write(d / f"c{i}.wav", synthesize(t)[::2], 8000)  # 8 kHz mono, as a phone records
        rows.append(f"c{i}.wav,{t}")
    (d / "metadata.csv").write_text("\n".join(rows) + "\n")
    tr = Trainer(_cfg(steps=2, lora=None, data=str(d), n_val=4), loaded=tiny, progress=False)
    assert len(tr.examples) + len(tr.val_examples) == 12 and tr.val_examples
    assert {e.text for e in tr.examples} <= set(TEXTS)
    assert math.isfinite(tr.fit().losses[-1])
