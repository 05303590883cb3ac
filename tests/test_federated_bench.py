"""benchmarks/federated.py's arms on tiny models: the centralised arm takes the federated run's split steps on the
union of the clients' data; per-message power; checkpoints scored as a receiver loads them; paired summaries."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from semedge.core.errors import UserError
from semedge.semcom.federated.config import FederateConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(model="tiny:whisper:0", n_train=2, n_test=1, batch_size=2, eval_snrs=("inf",), personal_steps=0,
            evaluate=False, lr=1e-2, lora_lr=1e-2, server_lr=1e-2, engine="local")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_federated", ROOT / "benchmarks" / "federated.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _configs(*argv):
    b = _bench()
    return b.configs(_args(b, argv))


def _args(b, argv):
    import argparse

    a = argparse.Namespace(quick=True, model="tiny:whisper:0", jsc="default", lr=1e-2, engine="local",
                           clients=None, rounds=None, local_steps=None, batch_size=None, n_train=None, n_test=None)
    for k, v in zip(argv[::2], argv[1::2]):
        setattr(a, k, v)
    return a


def test_the_centralised_config_takes_as_many_split_steps_and_examples_as_the_federated_one():
    fed, cen = _configs("clients", 4, "rounds", 3, "local_steps", 5)
    assert (cen.clients, cen.pool, cen.rounds) == (1, 4, 3)
    assert cen.rounds * cen.local_steps == fed.clients * fed.rounds * fed.local_steps == 60
    assert cen.batch_size == fed.batch_size and cen.jsc == fed.jsc and cen.n_train == fed.n_train
    assert (cen.lr, cen.lora_lr, cen.server_lr) == (fed.lr, fed.lora_lr, fed.server_lr)


def test_a_pool_needs_exactly_one_client():
    with pytest.raises(UserError, match="pool"):
        FederateConfig(clients=2, pool=2).validate()


def test_the_arms_run_the_same_number_of_split_steps_on_tiny_whisper(tmp_path):
    from semedge.semcom.federated.local_grid import run_local

    fed = FederateConfig(clients=2, rounds=2, local_steps=1, non_iid="speeds", **TINY).validate()
    cen = FederateConfig(clients=1, pool=2, rounds=2, local_steps=2, non_iid="speeds", **TINY).validate()
    rf, rc = run_local(fed, tmp_path / "fed"), run_local(cen, tmp_path / "cen")

    def client_steps(res):  # split steps summed over the clients that took them
        return sum(len(r["loss_per_step"]) * r["aggregated"] for r in res["rounds"])

    assert client_steps(rf) == client_steps(rc) == 4
    assert rf["wer"] == {} and rc["clients"] == {"0": "pool of 2"}
    assert Path(rc["checkpoint"]).is_dir()


def test_the_pooled_client_holds_the_union_of_the_clients_training_data(tmp_path):
    from semedge.semcom.federated.client import base_model
    from semedge.semcom.federated.data import client_data

    loaded = base_model("tiny:whisper:0")
    fed = FederateConfig(clients=2, non_iid="speeds", **TINY).validate()
    cen = FederateConfig(clients=1, pool=2, non_iid="speeds", **TINY).validate()
    parts = [client_data(loaded, fed, i, "train") for i in range(2)]
    pool = client_data(loaded, cen, 0, "train")
    assert pool.texts == parts[0].texts + parts[1].texts
    for a, b in zip(pool.mels, parts[0].mels + parts[1].mels):
        torch.testing.assert_close(a, b)


def test_a_message_power_codec_scales_each_message_over_its_own_frames():
    from semedge.semcom.federated import split_step as S
    from semedge.semcom.jsc import JSCCodec, JSCConfig
    from semedge.semcom.models import tiny_model

    torch.manual_seed(0)
    loaded = tiny_model("whisper", seed=0)
    codec = JSCCodec(JSCConfig(d_model=64, k=16, hidden=64, power="message", skip=True))
    dev = S.DeviceHalf(loaded, codec)
    h = torch.randn(2, 7, 64)
    x = dev.encode(h, [7, 3])
    torch.testing.assert_close(x[1, :3], codec.encoder(h[1:2, :3])[0])  # as if sent alone
    assert float(x[1, :3].detach().pow(2).mean()) == pytest.approx(1.0, rel=1e-4)
    assert float(x[1, 3:].abs().sum()) == 0.0


def test_a_checkpoint_is_scored_with_the_device_model_it_was_trained_to(tmp_path):
    """arm_halves reads the encoder LoRA + JSC encoder back from the checkpoint: the symbols it sends equal the
    global device half's."""
    from semedge.semcom.federated import client as C
    from semedge.semcom.federated.evaluate import arm_halves, encoder_features, received
    from semedge.semcom.federated.local_grid import run_local
    from semedge.semcom.federated.server import SplitServer
    from semedge.semcom.channels import make_channel
    from semedge.semcom.checkpoint import load_checkpoint
    from semedge.semcom.training.adapters import load_adapter_state

    cfg = FederateConfig(clients=1, rounds=1, local_steps=2, non_iid="speeds", **TINY).validate()
    res = run_local(cfg, tmp_path / "fed")
    srv = SplitServer(cfg)
    rt = C.runtime(cfg, srv.jsc_config)
    data = rt.client(0, "test")
    enc, codec = arm_halves(srv.loaded, res["checkpoint"])
    got = received(codec, encoder_features(enc, data), make_channel("awgn"), float("inf"), 0)

    ck = load_checkpoint(res["checkpoint"], srv.loaded)
    assert any("encoder" in k and "lora_B" in k and float(v.abs().sum()) > 0 for k, v in ck.adapters.items())
    rt.load({"jsc.proj.weight": ck.codec.encoder.proj.weight.detach().numpy(),
             "jsc.proj.bias": ck.codec.encoder.proj.bias.detach().numpy()})
    load_adapter_state(rt.half, ck.adapters)  # the device half, set to the checkpoint's weights by hand
    with torch.no_grad():
        h, _ = rt.half.features(data.batch([0]))
        want = rt.half.encode(h, data.frames[:1])[0]
    torch.testing.assert_close(got[0], want, rtol=1e-4, atol=1e-5)


def test_summarise_pairs_each_arm_with_the_start_and_pools_the_clients():
    from semedge.semcom.federated.evaluate import summarise

    start = {0: {"inf": [(2, 10), (1, 5)]}, 1: {"inf": [(0, 4)]}}
    better = {0: {"inf": [(1, 10), (0, 5)]}, 1: {"inf": [(0, 4)]}}
    s = summarise({"start": start, "federated": better, "centralised": start}, references=("start", "centralised"))
    assert s["start"]["all"]["inf"]["wer"]["value"] == pytest.approx(3 / 19)
    assert s["federated"]["all"]["inf"]["wer"]["n"] == 3
    assert s["federated"]["0"]["inf"]["vs_start"]["delta"] == pytest.approx(1 / 15 - 3 / 15)
    assert s["centralised"]["all"]["inf"]["vs_start"]["delta"] == 0.0
    assert "vs_start" not in s["start"]["0"]["inf"] and "vs_centralised" in s["federated"]["1"]["inf"]
    assert np.isfinite(s["federated"]["all"]["inf"]["vs_centralised"]["delta"])


@pytest.mark.parametrize("update,steps", [("mean", 1), ("each", 2)])
def test_the_server_steps_once_per_local_step_or_once_per_client(update, steps):
    from semedge.semcom.federated import client as C
    from semedge.semcom.federated.server import SplitServer

    cfg = FederateConfig(clients=2, non_iid="speeds", server_update=update, **TINY).validate()
    srv = SplitServer(cfg)
    rt = C.runtime(cfg, srv.jsc_config)
    ups = {part: C.begin(rt, part, 1, srv.global_arrays, False)[1] for part in range(2)}
    downs, losses = srv.step(ups)
    assert set(downs) == set(losses) == {0, 1}
    p = next(iter(srv.side.jsc.parameters()))
    assert int(srv.opt.state[p]["step"]) == steps


def test_an_unknown_server_update_names_the_field():
    with pytest.raises(UserError, match="server_update"):
        FederateConfig(server_update="sum").validate()
