"""A smaller model's encoder on the device, feeding the server model's decoder through the JSC (d_in != d_model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from semedge.core.errors import UserError
from semedge.semcom.checkpoint import load_checkpoint
from semedge.semcom.models import tiny_model
from semedge.semcom.split import build_split
from semedge.semcom.training.config import TrainConfig
from semedge.semcom.training.data import Example, target_ids
from semedge.semcom.training.trainer import Trainer

TEXTS = ["the cat sat on the mat", "a quick brown fox", "hello world again", "one two three four"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    teacher = tiny_model("whisper", seed=0)  # d_model 64: the server's decoder
    student = tiny_model("whisper", seed=7, d_model=32)  # the device's encoder
    g = torch.Generator().manual_seed(0)
    ex = []
    for i, t in enumerate(TEXTS):
        n = 10 + 2 * i
        ex.append(Example(f"e{i}", torch.randn(n, 32, generator=g), target_ids(teacher, t), t,
                          target=torch.randn(n, 64, generator=g) * 2 + 1))
    cfg = TrainConfig(model="tiny", encoder="tiny-student", k=8, hidden=64, steps=16, batch_size=4, lr=3e-3,
                      mse_warmup_steps=8, n_val=0, snr_low=10, snr_high=20, tail_frames=20)
    tr = Trainer(cfg, loaded=teacher, examples=ex, progress=False, encoder=student)
    res = tr.fit(out=tmp_path_factory.mktemp("student") / "ck")
    return teacher, student, ex, tr, res


def test_codec_maps_the_student_width_to_the_decoder_width(run):
    teacher, student, ex, tr, res = run
    c = tr.codec
    assert c.cfg.d_in == 32 and c.cfg.d_model == 64 and c.cfg.d_enc == 32
    assert tuple(c.encoder.proj.weight.shape) == (8, 32)
    assert c.encoder.mean.shape == (32,) and c.decoder.mean.shape == (64,)
    # the decoder's statistics are the teacher's features', not the student's
    t = torch.cat([e.target for e in ex])
    assert torch.allclose(c.decoder.mean, t.mean(0), atol=1e-5)
    with torch.no_grad():
        assert c.decoder(c.encoder(ex[0].h.unsqueeze(0))).shape == (1, ex[0].h.shape[0], 64)
    mse = res.losses[:8]  # feature-MSE warm-up against the teacher's features
    assert np.mean(mse[-3:]) < np.mean(mse[:3])


def test_checkpoint_records_the_device_encoder_and_split_needs_it(run):
    teacher, student, ex, tr, res = run
    man = json.loads((res.path / "manifest.json").read_text())
    assert man["device_encoder"] == {"source": student.source, "weight_hash": student.weight_hash, "d_model": 32}
    ck = load_checkpoint(res.path, teacher)
    assert ck.codec.cfg.d_in == 32
    with pytest.raises(UserError, match="device_encoder"):
        build_split(teacher, ck.codec)  # the server model's own encoder gives 64-wide features
    split = build_split(teacher, ck.codec, encoder=student)
    assert split.device_model is student
    x = torch.randn(1, 80, 3000)
    with torch.no_grad():
        y = split.device(x)
        assert y.shape == (1, 1500, 8)
        assert torch.equal(split.device.encoder(x).last_hidden_state, student.model.get_encoder()(x).last_hidden_state)


def test_student_package_exports_and_names_its_encoder(run, tmp_path):
    from semedge.export.package import build_package
    from semedge.runtime.package import Package

    teacher, student, ex, tr, res = run
    ck = load_checkpoint(res.path, teacher)
    split = build_split(teacher, ck.codec, encoder=student)
    pkg = Package.load(build_package(split, tmp_path / "student"))
    assert pkg.manifest["device_encoder"]["source"] == student.source
    assert pkg.manifest["model"]["source"] == teacher.source
    assert pkg.manifest["onnx"]["parity"]["cosine"] > 0.9999
