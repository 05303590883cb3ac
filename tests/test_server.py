"""The real server on a loopback port: round trip, every refusal, health, metrics, batching."""

from __future__ import annotations

import asyncio
import io
import socket
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
import torch

from semedge.export.package import build_package
from semedge.runtime.client import ServerError, send, to_npy
from semedge.runtime.package import Package
from semedge.runtime.runner import DeviceRunner
from semedge.runtime.server import ServerConfig, create_app, serve_in_thread

MAX_NEW = 12
LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from conftest import tiny_whisper_package

    loaded, split, path = tiny_whisper_package(tmp_path_factory.mktemp("pkgs") / "tiny")
    pkg = Package.load(path)
    # torch backend: the answers are compared with the in-process torch decoder token for token
    cfg = ServerConfig(max_body_bytes=LIMIT, max_batch=8, max_wait_ms=10, max_new_tokens=MAX_NEW, backend="torch")
    app = create_app([pkg], loader=lambda src: loaded, config=cfg)
    t = np.arange(16000) / 16000
    audio = (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    symbols = DeviceRunner(pkg).encode_audio(audio)
    with serve_in_thread(app) as url:
        yield split, pkg.package_id, url, symbols, path


def _post(url, pid, body, **kw):
    return httpx.post(f"{url}/v1/decode", params={"package": pid}, content=body, timeout=60, **kw)


def _ok(split, pid, url, symbols):
    out = send(url, pid, symbols)
    ref = split.server.transcribe([torch.from_numpy(symbols)], max_new_tokens=MAX_NEW)
    assert out["text"] == ref
    return out


def test_round_trip_matches_in_process(served):
    split, pid, url, symbols, _ = served
    out = _ok(split, pid, url, symbols)
    assert out["package"] == pid and out["tokens"] == symbols.shape[0]
    assert set(out["timings_ms"]) == {"queue", "decode", "total"}
    assert out["timings_ms"]["total"] >= out["timings_ms"]["decode"] > 0
    # float16 on the wire and a [batch, tokens, k] body
    out16 = send(url, pid, symbols, dtype="float16")
    ref16 = split.server.transcribe([torch.from_numpy(symbols.astype(np.float16).astype(np.float32))], max_new_tokens=MAX_NEW)
    assert out16["text"] == ref16
    two = send(url, pid, np.stack([symbols, symbols[:, ::-1]]))
    assert len(two["text"]) == 2 and two["text"][0] == out["text"][0]
    # rate adaptation: fewer symbols per token than k
    assert len(send(url, pid, symbols[:, :8])["text"]) == 1


def _pickle_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


BAD = {
    "1-D": (lambda s: to_npy(s[0]), "shape"),
    "4-D": (lambda s: to_npy(s[None, None]), "shape"),
    "int32": (lambda s: _npy(s.astype(np.int32)), "dtype"),
    "float64": (lambda s: _npy(s.astype(np.float64)), "dtype"),
    "k too big": (lambda s: to_npy(np.concatenate([s, s], -1)), "k=16"),
    "too many tokens": (lambda s: to_npy(np.ones((1501, 16), np.float32)), "tokens"),
    "zero tokens": (lambda s: to_npy(np.ones((0, 16), np.float32)), "tokens"),
    "NaN": (lambda s: to_npy(np.where(np.arange(s.size).reshape(s.shape) == 7, np.nan, s)), "NaN"),
    "inf": (lambda s: to_npy(np.full_like(s, np.inf)), "NaN or inf"),
    "pickle": (lambda s: _pickle_npy(), "dtype"),
    "garbage": (lambda s: b"hello, not an array", "not a .npy"),
    "raw pickle": (lambda s: b"\x80\x04\x95" + b"\x00" * 40, "not a .npy"),
    "truncated": (lambda s: to_npy(s)[:-10], "bytes"),
    "empty": (lambda s: b"", "not a .npy"),
}


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_body_gets_422_and_server_keeps_serving(served, case):
    split, pid, url, symbols, _ = served
    make, reason = BAD[case]
    r = _post(url, pid, make(symbols))
    assert r.status_code == 422, r.text
    assert reason in r.json()["detail"]
    with pytest.raises(ServerError) as e:
        send(url, pid, np.ones((3, 17), np.float32))
    assert e.value.status == 422
    _ok(split, pid, url, symbols)


def test_unknown_package_404(served):
    split, pid, url, symbols, _ = served
    r = _post(url, "nope-00000000", to_npy(symbols))
    assert r.status_code == 404 and pid in r.json()["detail"]
    with pytest.raises(ServerError) as e:
        send(url, "nope", symbols)
    assert e.value.status == 404
    _ok(split, pid, url, symbols)


def _raw(url: str, request: bytes, timeout: float = 30) -> bytes:
    """The first response head the server writes for raw request bytes."""
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_oversize_body_413_without_reading_it(served):
    split, pid, url, symbols, _ = served
    u = urlparse(url)
    # Content-Length over the limit: refused before the body is sent
    head = (f"POST /v1/decode?package={pid} HTTP/1.1\r\nHost: {u.netloc}\r\n"
            f"Content-Type: application/x-npy\r\nContent-Length: {100 * LIMIT}\r\n\r\n").encode()
    assert _raw(url, head + b"\x93NUMPY").startswith(b"HTTP/1.1 413")
    # chunked body (no Content-Length) that grows past the limit: the streaming read stops at it
    chunk = b"\x00" * (64 * 1024)
    chunked = b"".join(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" for _ in range(6))
    head = (f"POST /v1/decode?package={pid} HTTP/1.1\r\nHost: {u.netloc}\r\n"
            f"Transfer-Encoding: chunked\r\n\r\n").encode()
    assert _raw(url, head + chunked).startswith(b"HTTP/1.1 413")
    _ok(split, pid, url, symbols)


def test_healthz_and_metrics(served):
    split, pid, url, symbols, _ = served
    h = httpx.get(f"{url}/healthz", timeout=10).json()
    assert h["status"] == "ok" and h["packages"][pid]["k"] == 16
    _post(url, "missing", b"")
    send(url, pid, symbols)
    m = httpx.get(f"{url}/metrics", timeout=10)
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    text = m.text
    assert f'semedge_requests_total{{package="{pid}",status="200"}}' in text
    assert 'semedge_requests_total{package="",status="404"}' in text
    assert f'semedge_decode_seconds_count{{package="{pid}"}}' in text
    assert "semedge_batch_size_total" in text


def test_concurrent_requests_are_batched(served):
    split, pid, url, symbols, _ = served
    ref = split.server.transcribe([torch.from_numpy(symbols)], max_new_tokens=MAX_NEW)
    body = to_npy(symbols)

    async def go():
        async with httpx.AsyncClient(timeout=60) as c:
            rs = await asyncio.gather(*(c.post(f"{url}/v1/decode", params={"package": pid}, content=body) for _ in range(12)))
        return [r.json() for r in rs]

    outs = asyncio.run(go())
    assert all(o["text"] == ref for o in outs)
    assert max(o["batch"] for o in outs) > 1
    text = httpx.get(f"{url}/metrics", timeout=10).text
    line = next(ln for ln in text.splitlines() if ln.startswith("semedge_batch_size_max "))
    assert int(line.split()[1]) > 1


def test_device_run_cli(served, tmp_path, capsys):
    import json
    import wave

    from semedge.cli import main

    split, pid, url, symbols, path = served
    t = np.arange(16000) / 16000
    pcm = np.round(0.3 * np.sin(2 * np.pi * 300 * t) * 32767).astype("<i2")
    with wave.open(str(tmp_path / "a.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000), w.writeframes(pcm.tobytes())
    rc = main(["device", "run", str(path), "--wav", str(tmp_path / "a.wav"), "--server", url,
               "--channel", "none", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["package"] == pid and out["tokens"] == 50 and out["symbols_per_token"] == 16
    assert isinstance(out["text"], str)
    rc = main(["device", "run", str(path), "--wav", str(tmp_path / "a.wav"), "--server", url, "--snr", "5",
               "--k-keep", "4", "--seed", "1", "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["symbols_per_token"] == 4
    assert main(["device", "run", str(path), "--text", "hi", "--server", url]) == 2  # speech package
    assert main(["device", "run", str(path), "--wav", str(tmp_path / "a.wav"), "--server", "http://127.0.0.1:9"]) == 2


@pytest.mark.slow
def test_semedge_serve_subprocess(served, tmp_path):
    import os
    import shutil
    import subprocess
    import sys
    import time

    split, pid, _url, symbols, path = served
    pkgs = tmp_path / "pkgs"
    shutil.copytree(path, pkgs / "tiny")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "semedge.cli", "serve", "--packages", str(pkgs), "--port", str(port),
                             "--max-new-tokens", str(MAX_NEW), "--log-level", "warning",
                             "--backend", "torch"],  # as the fixture: compared token for token with torch
                            env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            assert time.monotonic() - t0 < 120
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        _ok(split, pid, url, symbols)
    finally:
        proc.terminate()
        proc.wait(30)


def test_pruned_package_is_served_by_the_default_loader(tmp_path):
    """A pruned device half ships in a package whose server side names the unpruned model,
    so `semedge serve`'s own loader can load it; the answer matches the split in process."""
    from semedge.compress import prune
    from semedge.runtime.server import default_loader
    from semedge.semcom.jsc import JSCCodec, JSCConfig
    from semedge.semcom.models import tiny_model
    from semedge.semcom.split import build_split

    loaded = tiny_model("whisper")
    torch.manual_seed(2)
    split = build_split(loaded, JSCCodec(JSCConfig(d_model=64, k=16, hidden=64)))
    g = torch.Generator().manual_seed(3)
    sp = prune.apply(split, {"heads": 0.5, "ffn": 0.5}, torch.randn(2, 80, 3000, generator=g))
    pkg = Package.load(build_package(sp, tmp_path / "pruned"))
    assert pkg.model_source == loaded.source
    assert pkg.manifest["device_encoder"]["source"].startswith(loaded.source + "+prune")
    cfg = ServerConfig(max_new_tokens=MAX_NEW, backend="torch")
    t = np.arange(16000) / 16000
    symbols = DeviceRunner(pkg).encode_audio((0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32))
    with serve_in_thread(create_app([pkg], loader=default_loader, config=cfg)) as url:
        out = send(url, pkg.package_id, symbols)
    assert out["text"] == sp.server.transcribe([torch.from_numpy(symbols)], max_new_tokens=MAX_NEW)
