"""Importance-aware rate over the real device -> server path: a layout message (k_t per frame + the
stream) decodes over a socket as run_link(rate=) does in process on the same symbols and noise; bad
layouts are 422s naming the field; plain .npy clients work unchanged; `device run --k importance`."""

from __future__ import annotations

import io
import json
import math

import httpx
import numpy as np
import pytest
import torch

from semedge.runtime.client import LAYOUT_TYPE, NPY_TYPE, ServerError, _body, send, to_layout, to_npy
from semedge.runtime.link import apply_channel, channel_uses
from semedge.runtime.package import Package
from semedge.runtime.runner import DeviceRunner, layout_message, package_rate
from semedge.runtime.server import ServerConfig, create_app, serve_in_thread
from semedge.semcom.importance import ImportanceRate, unpack

MAX_NEW = 12
LADDER = [8, 16, 24, 32]
BUDGET = 24
SNR = 5.0

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _audio() -> np.ndarray:
    """1.2 s: a loud two-tone stretch, then near silence (frames of unequal importance)."""
    t = np.arange(19200) / 16000
    x = 0.3 * np.sin(2 * np.pi * 300 * t) + 0.2 * np.sin(2 * np.pi * 1250 * t)
    x[9600:] *= 0.01
    return x.astype(np.float32)


def _nested_package(root, loaded):
    """(split, package path): a tiny Whisper with a nested k=32 codec (rate_min 8), exported with its checkpoint."""
    from semedge.export.package import build_package
    from semedge.semcom.checkpoint import save_checkpoint
    from semedge.semcom.jsc import JSCCodec, JSCConfig
    from semedge.semcom.split import build_split

    torch.manual_seed(3)
    # a short silence tail and a wide output scale: the random tiny decoder's text then depends on the
    # symbols (with the defaults it answers the same text for any input, and parity would prove nothing)
    codec = JSCCodec(JSCConfig(d_model=64, k=32, hidden=64, skip=True, power="message", tail_frames=4)).eval()
    codec.decoder.std.fill_(50.0)
    ck = save_checkpoint(root / "codec", loaded, codec, info={"rate_training": {"rate_min": 8, "rate_prob": 0.5}})
    split = build_split(loaded, codec)
    return split, build_package(split, root / "nested", jsc_ckpt=ck)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(split, nested Package, flat Package, url): both served by one real server on a loopback socket."""
    from conftest import tiny_whisper_package

    root = tmp_path_factory.mktemp("imp-http")
    loaded, _, flat_path = tiny_whisper_package(root / "flat")  # k=16, not nested
    split, nested_path = _nested_package(root, loaded)
    nested, flat = Package.load(nested_path), Package.load(flat_path)
    cfg = ServerConfig(max_batch=4, max_wait_ms=5, max_new_tokens=MAX_NEW, backend="torch")
    with serve_in_thread(create_app([nested, flat], loader=lambda src: loaded, config=cfg)) as url:
        yield split, nested, flat, url


@pytest.fixture(scope="module")
def message(served):
    """The device's layout message for _audio() at BUDGET, from the package's ONNX device half."""
    _, nested, _, _ = served
    code = DeviceRunner(nested).encode_audio(_audio())
    return code, layout_message(code, package_rate(nested, BUDGET, SNR), SNR, nested.power)


def test_package_says_whether_its_codec_is_nested(served):
    _, nested, flat, url = served
    assert nested.ladder == tuple(LADDER) and nested.manifest["jsc"]["ladder"] == LADDER
    assert flat.ladder is None and "ladder" not in flat.manifest["jsc"]
    health = httpx.get(f"{url}/healthz", timeout=10).json()["packages"]
    assert health[nested.package_id]["ladder"] == LADDER and health[flat.package_id]["ladder"] == []


def test_layout_message_decodes_like_run_link(served, message):
    """Same symbols (the device half), same layout, same noise (run_link's torch draws, applied by the
    numpy link on the device): the server's text is run_link(rate=)'s."""
    from semedge.semcom.channels import make_channel
    from semedge.semcom.system import device_encode, run_link, send_layout

    split, nested, _, url = served
    _, msg = message
    rate = ImportanceRate(tuple(LADDER), BUDGET)
    res = run_link(split, [_audio()], "awgn", SNR, rate=rate, seed=0, max_new_tokens=MAX_NEW)
    lay = res.extra["layouts"][0]
    assert msg.k.tolist() == lay["k"] and msg.header == lay["header"] > 0
    assert len(set(lay["k"])) > 1  # a real per-frame layout, not the uniform fallback
    assert msg.symbols == res.symbols_sent[0] <= len(msg.k) * BUDGET
    gen = torch.Generator().manual_seed(0)  # run_link's first draw, for its first message
    z = torch.randn(1, channel_uses(msg.stream.size), 2, generator=gen).double().numpy()
    rx = apply_channel(msg.stream[None], None, z[..., 0] + 1j * z[..., 1], SNR)[0].astype(np.float32)
    x = device_encode(split, [_audio()])[0]  # what run_link sent, decoded by the in-process receiver
    y_in, _ = send_layout(x, rate, make_channel("awgn"), SNR, torch.Generator().manual_seed(0), nested.power)
    assert np.abs(unpack(rx, msg.k, 32) - y_in.numpy()).max() < 1e-4
    out = send(url, nested.package_id, rx, layout=msg.k, task="speech")
    assert out["text"] == res.hyps and out["tokens"] == len(msg.k)
    flipped = send(url, nested.package_id, rx, layout=msg.k[::-1].copy())  # the text depends on the unpacking
    assert flipped["text"] != out["text"]


def test_layout_is_the_zero_filled_frames(served, message):
    """A layout message and the plain [T, k] array zero above each k_t decode alike; a layout with one
    k' for every frame goes as the plain [T, k'] array."""
    _, nested, _, url = served
    _, msg = message
    full = unpack(msg.stream, msg.k, 32)
    assert not full[msg.k == 8, 8:].any()
    a = send(url, nested.package_id, msg.stream, layout=msg.k)
    b = send(url, nested.package_id, full)
    assert a["text"] == b["text"]
    body, ctype = _body(msg.stream[: 16 * 5], np.full(5, 16), "float32")
    assert ctype == NPY_TYPE and np.load(io.BytesIO(body)).shape == (5, 16)
    _, ctype = _body(msg.stream, msg.k, "float32")
    assert ctype == f"{LAYOUT_TYPE}; version=1"


def _post(url, pid, body, ctype=f"{LAYOUT_TYPE}; version=1"):
    return httpx.post(f"{url}/v1/decode", params={"package": pid}, content=body,
                      headers={"content-type": ctype}, timeout=60)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _bad(msg, nested, flat):
    """case -> (package id, body, content type, words the 422 must hold)."""
    off = msg.k.copy()
    off[2] = 10
    ok = to_layout(msg.k, msg.stream)
    return {
        "k off the ladder": (nested.package_id, to_layout(off, np.zeros(int(off.sum()), np.float32)), None,
                             ["k[2]=10", "ladder", "[8, 16, 24, 32]", "jsc.ladder"]),
        "stream too short": (nested.package_id, _npy(msg.k.astype(np.int32)) + to_npy(msg.stream[:-1]), None,
                             ["stream", f"k sums to {int(msg.k.sum())}", "frame order"]),
        "not nested": (flat.package_id, ok, None, ["not a nested codec", "jsc.ladder", "--rate-min", "plain .npy"]),
        "unknown version": (nested.package_id, ok, f"{LAYOUT_TYPE}; version=2", ["version='2'", "version=1"]),
        "k as floats": (nested.package_id, _npy(msg.k.astype(np.float32)) + to_npy(msg.stream), None, ["part 1 (k)", "float32",
                                                                                        "integers"]),
        "trailing bytes": (nested.package_id, ok + b"xx", None, ["after its two arrays"]),
    }


@pytest.mark.parametrize("case", ["k off the ladder", "stream too short", "not nested", "unknown version",
                                  "k as floats", "trailing bytes"])
def test_bad_layout_is_a_422_naming_the_field(served, message, case):
    _, nested, flat, url = served
    code, msg = message
    pid, body, ctype, words = _bad(msg, nested, flat)[case]
    r = _post(url, pid, body, *([ctype] if ctype else []))
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert all(w in detail for w in words), detail
    assert "text" in send(url, nested.package_id, msg.stream, layout=msg.k)  # still serving


def test_client_refusal_is_a_server_error(served, message):
    _, _, flat, url = served
    _, msg = message
    with pytest.raises(ServerError) as e:
        send(url, flat.package_id, msg.stream, layout=msg.k)
    assert e.value.status == 422 and "not a nested codec" in e.value.detail


def test_old_format_clients_work_unchanged(served, message):
    """A plain .npy body, with the old content type or none, decodes as the in-process receiver does."""
    split, nested, flat, url = served
    code, _ = message
    for pid, x in ((nested.package_id, code[:, :16]), (flat.package_id, DeviceRunner(flat).encode_audio(_audio()))):
        for headers in ({"content-type": NPY_TYPE}, {}):
            r = httpx.post(f"{url}/v1/decode", params={"package": pid}, content=to_npy(x), headers=headers, timeout=60)
            assert r.status_code == 200, r.text
            if pid == nested.package_id:
                ref = split.server.transcribe([torch.from_numpy(np.ascontiguousarray(x))], max_new_tokens=MAX_NEW)
                assert r.json()["text"] == ref


def test_device_run_importance_cli(served, tmp_path, capsys):
    import soundfile as sf

    from semedge.cli import main

    _, nested, flat, url = served
    sf.write(tmp_path / "a.wav", _audio(), 16000)
    args = ["device", "run", str(nested.path), "--wav", str(tmp_path / "a.wav"), "--server", url, "--snr", "5",
            "--seed", "0", "--json"]
    assert main([*args, "--k", f"importance:{BUDGET}"]) == 0
    out = json.loads(capsys.readouterr().out)
    rate, n = out["rate"], out["tokens"]
    assert rate["ladder"] == LADDER and rate["budget_symbols"] == n * BUDGET
    sent = sum(map(sum, rate["k_per_frame"])) + rate["header_symbols"]
    assert rate["header_symbols"] == n * 2 * 4 and sent <= n * BUDGET
    assert out["channel_uses"] == math.ceil(sent / 2) and sum(v > 0 for v in rate["frames_per_level"].values()) > 1
    assert isinstance(out["text"], str)
    capsys.readouterr()
    for bad, words in (([*args, "--k", "importance:40"], "between 8 and 32"),
                       ([*args, "--k", "importance"], "rate policy"),
                       ([*args[:2], str(flat.path), *args[3:], "--k", "importance:12"], "nested")):
        assert main(bad) == 2
        assert words in capsys.readouterr().err


def test_semedge_serve_process_decodes_layouts(served, message, tmp_path):
    """The `semedge serve` command (its own process) answers a layout message as the in-thread server does,
    refuses a bad one with 422, and keeps serving."""
    import os
    import socket
    import subprocess
    import sys
    import time

    _, nested, _, url = served
    _, msg = message
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "semedge.cli", "serve", "--packages", str(nested.path), "--port", str(port),
           "--backend", "torch", "--threads", "1", "--max-new-tokens", str(MAX_NEW), "--log-level", "warning"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            there = f"http://127.0.0.1:{port}"
            t0 = time.monotonic()
            while True:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                try:
                    if httpx.get(f"{there}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    assert time.monotonic() - t0 < 300, "semedge serve did not start"
                    time.sleep(0.2)
            want = send(url, nested.package_id, msg.stream, layout=msg.k)["text"]
            assert send(there, nested.package_id, msg.stream, layout=msg.k)["text"] == want
            off = msg.k.copy()
            off[0] = 5
            r = _post(there, nested.package_id, to_layout(off, np.zeros(int(off.sum()), np.float32)))
            assert r.status_code == 422 and "k[0]=5" in r.json()["detail"]
            assert send(there, nested.package_id, msg.stream, layout=msg.k)["text"] == want
        finally:
            proc.terminate()
            proc.wait(60)
