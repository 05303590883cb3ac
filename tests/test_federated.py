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


# Flower apps on engine local's in-process grid: the ServerApp logic and ClientApp routing, no Ray -----

def recording_grid(n: int, fail: tuple[int, ...] = (), fail_step: int = 1):
    """engine local's grid, logging every message's record names; a client whose partition is in
    `fail` dies (its reply is an error, as Flower reports a failed ClientApp) on local step `fail_step`."""
    from flwr.app import Error, Message

    from semedge.semcom.federated.local_grid import LocalGrid

    class RecordingGrid(LocalGrid):
        def deliver(self, m):
            mtype, ctx = m.metadata.message_type, self.contexts[m.metadata.dst_node_id]
            self.log.append((mtype, "down", sorted(m.content.keys()), []))
            if ctx.node_config["partition-id"] in fail and mtype == "train.step" and int(m.content["config"]["step"]) == fail_step:
                return Message(Error(code=0, reason="client killed"), reply_to=m)
            r = super().deliver(m)
            if not r.has_error():
                up = sorted(r.content["uplink"].keys()) if "uplink" in r.content else []
                self.log.append((mtype, "up", sorted(r.content.keys()), up))
            return r

    grid = RecordingGrid(n)
    grid.log = []  # (message type, direction, record names, uplink keys)
    return grid


def _fed_cfg(**kw):
    from semedge.semcom.federated.config import FederateConfig

    base = dict(model="tiny:whisper:0", clients=2, rounds=1, local_steps=2, n_train=2, n_test=1, batch_size=2,
                non_iid="speeds", personal_steps=1, eval_snrs=("inf",), lr=1e-2, lora_lr=1e-2, server_lr=1e-2)
    return FederateConfig(**{**base, **kw}).validate()


@pytest.fixture(scope="module")
def one_round(tmp_path_factory):
    """One federated round (2 clients x 2 local steps) on a tiny model, through the Flower apps."""
    from semedge.semcom.federated import flower_server as F
    from semedge.semcom.federated.server import SplitServer

    cfg = _fed_cfg()
    grid = recording_grid(2)
    start = SplitServer(cfg)
    res = F.run_server(grid, cfg, tmp_path_factory.mktemp("fed"))
    return cfg, grid, start, res


def test_one_round_changes_only_the_device_lora_the_jsc_encoder_and_the_server_jsc_decoder(one_round):
    from semedge.semcom.checkpoint import load_checkpoint

    cfg, grid, start, res = one_round
    ck = load_checkpoint(res["checkpoint"], start.loaded)
    before = start.codec.state_dict()
    after = ck.codec.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"encoder.proj.weight", "encoder.proj.bias", "decoder.net.0.weight", "decoder.net.0.bias",
                       "decoder.net.2.weight", "decoder.net.2.bias", "decoder.net.4.weight", "decoder.net.4.bias"}
    assert ck.lora is not None and ck.lora.targets == ("encoder.self_attn",)
    assert ck.adapters and all(".encoder." in k and "lora_" in k for k in ck.adapters)
    assert any(float(v.abs().sum()) > 0 for k, v in ck.adapters.items() if "lora_B" in k)  # B starts at 0: it moved
    assert ck.manifest["federated"]["clients"] == 2
    from semedge.semcom.checkpoint import apply_checkpoint

    rx = apply_checkpoint(start.loaded, ck)  # a normal checkpoint: the receiver model carries the encoder LoRA
    assert any("encoder" in n and "lora_A" in n for n, _ in rx.model.named_parameters())
    assert set(res["wer"]) == {"start", "global", "personal"} and set(res["wer"]["global"]) == {"0", "1"}
    assert res["rounds"][0]["aggregated"] == 2


def test_messages_carry_only_what_the_accounting_says(one_round):
    cfg, grid, start, res = one_round
    allowed_up = {"train": {"uplink", "info"}, "train.step": {"uplink"}, "evaluate": {"uplink", "info"}}
    for mtype, direction, names, up in grid.log:
        if direction == "up" and mtype in allowed_up:
            finals = {"arrays", "metrics"} if mtype == "train.step" else set()
            assert set(names) in (allowed_up[mtype], finals, {"metrics"}), (mtype, names)
            if "uplink" in names and mtype.startswith("train"):
                assert up == sorted(S.UPLINK_KEYS)
        if direction == "down" and mtype == "train.step":
            assert names == ["config", "downlink"]
    r1 = res["accounting"]["phases"]["train"][0]["clients"]
    for c in r1.values():
        assert c["up"]["activations"] == c["down"]["grads"] > 0  # dL/dy has y's shape
        assert c["up"]["params"] > 0 and c["down"]["params"] >= c["up"]["params"]  # down also carries mean/std
        assert set(c["up"]) <= {"activations", "labels", "params", "metrics"}


def test_a_client_that_dies_mid_round_drops_out_and_the_round_completes(tmp_path):
    from semedge.semcom.federated import flower_server as F

    cfg = _fed_cfg(personal_steps=0)
    res = F.run_server(recording_grid(2, fail=(1,), fail_step=0), cfg, tmp_path)
    assert res["rounds"][0]["sampled"] == 2 and res["rounds"][0]["aggregated"] == 1
    failed = res["rounds"][0]["failed"]
    assert [(f["partition"], f["phase"], f["reason"]) for f in failed] == [(1, "train", "client killed")]
    assert res["failures"] == failed
    assert (tmp_path / "federated.json").exists()


def test_a_round_below_the_quorum_keeps_the_global_device_model(tmp_path):
    from semedge.semcom.checkpoint import load_checkpoint
    from semedge.semcom.federated import flower_server as F
    from semedge.semcom.federated.server import SplitServer

    cfg = _fed_cfg(personal_steps=0, min_clients=2)
    start = SplitServer(cfg)
    res = F.run_server(recording_grid(2, fail=(1,), fail_step=0), cfg, tmp_path)
    assert res["rounds"][0]["aggregated"] == 0 and len(res["rounds"][0]["failed"]) == 1
    after = load_checkpoint(res["checkpoint"], start.loaded).codec.state_dict()
    assert torch.equal(after["encoder.proj.weight"], start.codec.state_dict()["encoder.proj.weight"])


def test_bad_options_name_the_option():
    for kw, opt in [(dict(fraction=0.0), "--fraction"), (dict(non_iid="accents"), "--non-iid"),
                    (dict(clients=0), "--clients"), (dict(lora="r=4,targets=decoder.self_attn"), "--lora")]:
        with pytest.raises(UserError, match=opt):
            _fed_cfg(**kw)


def test_cli_bad_option_exits_2_naming_it():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "semedge.cli", "federate", "--non-iid", "accents"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--non-iid" in r.stderr, r.stderr[-500:]


@pytest.mark.slow
def test_flower_simulation_engine_two_clients_one_round(tmp_path):
    """The real engine: Flower's simulation runtime with Ray actors (Ray needs its node up within 30 s)."""
    from semedge.semcom.federated.flower_server import run_simulation

    res = run_simulation(_fed_cfg(personal_steps=0), tmp_path, actors=1)
    assert res["rounds"][0]["aggregated"] == 2 and set(res["wer"]["global"]) == {"0", "1"}
    assert (tmp_path / "checkpoint" / "manifest.json").exists()
