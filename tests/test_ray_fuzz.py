"""`serve --engine ray` with --auth beside the single-process server, both serving the same tiny package
with the same auth file: every malformed request of tests/test_server.py, raw-socket body limits,
auth refusals and a seeded mutation fuzz get the same status and detail from both hosts, never a 5xx,
and the Ray host still decodes afterwards. One local Ray cluster, one app start."""

from __future__ import annotations

import socket
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
import yaml

from semedge.runtime.auth import Gate, add_device
from semedge.runtime.client import send, to_npy
from semedge.runtime.package import Package
from semedge.runtime.runner import DeviceRunner
from semedge.runtime.server import ServerConfig, create_app, serve_in_thread
from test_server import _raw

LIMIT = 256 * 1024
MID = "x-semedge-message-id"


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """(local url, ray url, package id, symbols, tokens): one package, one auth file, two hosts."""
    ray = pytest.importorskip("ray")
    from conftest import tiny_whisper_package

    from semedge.runtime import ray_serve

    d = tmp_path_factory.mktemp("rayfuzz")
    loaded, _, path = tiny_whisper_package(d / "pkgs" / "tiny")
    pkg = Package.load(path)
    auth = d / "auth.yaml"
    tokens = {n: add_device(auth, n, scope) for n, scope in (("phone", [pkg.package_id]), ("other", ["bart-*"]),
                                                                ("any", ["*"]))}
    data = yaml.safe_load(auth.read_text())  # limits well above the fuzz's pace: 429s would depend on timing
    auth.write_text(yaml.safe_dump({**data, "limits": {"rate_per_s": 1000, "burst": 1000, "max_concurrent": 16}}))
    cfg = ServerConfig(max_new_tokens=4, backend="torch", max_body_bytes=LIMIT, max_batch=8, max_wait_ms=5)
    audio = (0.3 * np.sin(2 * np.pi * 300 * np.arange(8000) / 16000)).astype(np.float32)
    symbols = DeviceRunner(pkg).encode_audio(audio)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app([pkg], loader=lambda src: loaded, config=cfg, gate=Gate.from_file(auth))
    ray.init(num_cpus=1, include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        ray_url = ray_serve.start(path.parent, port=port, config=cfg, replicas=1, num_cpus=0.5, auth=auth)
        with serve_in_thread(app) as local_url:
            yield local_url, ray_url, pkg.package_id, symbols, tokens
    finally:
        ray_serve.stop()
        ray.shutdown()


def _both(hosts, body: bytes, package=None, token="phone", headers=None, method="POST", path="/v1/decode"):
    """The same request to both hosts: [(status, detail or text)] local, ray."""
    local, ray_url, pid, _, tokens = hosts
    h = dict(headers or {})
    if token:
        h["authorization"] = f"Bearer {tokens.get(token, token)}"
    params = {} if package is False else {"package": pid if package is None else package}
    out = []
    for url in (local, ray_url):
        r = httpx.request(method, f"{url}{path}", params=params, content=body, headers=h, timeout=300)
        out.append((r.status_code, r.json().get("detail") if "json" in r.headers.get("content-type", "") else r.text))
    return out


def _mutations(good: bytes, n: int, seed: int = 0):
    """Seeded corruptions of a valid .npy body: flipped bytes (header and data), cuts, splices, junk."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        b = bytearray(good)
        kind = i % 4
        if kind == 0:  # a few random bytes anywhere, mostly in the 128-byte header
            for _ in range(int(rng.integers(1, 4))):
                b[int(rng.integers(0, 128 if rng.random() < 0.7 else len(b)))] = int(rng.integers(0, 256))
        elif kind == 1:
            b = b[: int(rng.integers(0, len(b)))]
        elif kind == 2:
            b = b[:128] + bytes(rng.integers(0, 256, int(rng.integers(0, 4096)), dtype=np.uint8))
        else:
            b = bytes(rng.integers(0, 256, int(rng.integers(0, 512)), dtype=np.uint8))
        yield f"mutation {i} (kind {kind})", bytes(b)


@pytest.mark.slow  # a Ray cluster + Serve deployment: ~40 s on an idle 2-core host, minutes on a busy one
def test_ray_host_answers_malformed_requests_as_the_local_server(hosts):
    from test_server import BAD

    local, ray_url, pid, symbols, tokens = hosts
    cases = [(f"body {name}", dict(body=make(symbols))) for name, (make, _) in sorted(BAD.items())]
    cases += [("unknown package", dict(body=to_npy(symbols), package="nope", token="any")),
              ("unknown package, scoped token", dict(body=to_npy(symbols), package="nope")),
              ("no package", dict(body=to_npy(symbols), package=False)),
              ("package id too long", dict(body=b"", package="p" * 201)),
              ("bad message id", dict(body=to_npy(symbols), headers={MID: "bad id!"})),
              ("k' over k", dict(body=to_npy(np.ones((3, 17), np.float32)))),
              ("GET decode", dict(body=b"", method="GET")),
              ("no token", dict(body=to_npy(symbols), token=None)),
              ("forged token", dict(body=to_npy(symbols), token="sek_forged")),
              ("not bearer", dict(body=to_npy(symbols), token=None, headers={"authorization": "Basic dTpw"})),
              ("out of scope", dict(body=to_npy(symbols), token="other")),
              ("healthz without token", dict(body=b"", token=None, method="GET", path="/healthz")),
              ("metrics without token", dict(body=b"", token=None, method="GET", path="/metrics"))]
    cases += [(name, dict(body=body)) for name, body in _mutations(to_npy(symbols), 24)]
    seen = set()
    for name, kw in cases:
        (ls, ld), (rs, rd) = _both(hosts, **kw)
        assert ls == rs and ls < 500 and ld == rd, (name, ls, ld, rs, rd)
        seen.add(ls)
    assert {401, 403, 404, 405, 422} <= seen, seen
    # body limits on raw sockets: a Content-Length over the limit, a chunked body growing past it
    u = urlparse(ray_url)
    auth = f"Authorization: Bearer {tokens['phone']}\r\n"
    head = (f"POST /v1/decode?package={pid} HTTP/1.1\r\nHost: {u.netloc}\r\n{auth}"
            f"Content-Type: application/x-npy\r\nContent-Length: {100 * LIMIT}\r\n\r\n").encode()
    chunk = b"\x00" * (64 * 1024)
    chunked = (f"POST /v1/decode?package={pid} HTTP/1.1\r\nHost: {u.netloc}\r\n{auth}Transfer-Encoding: chunked\r\n\r\n"
               ).encode() + b"".join(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" for _ in range(6))
    for req in (head + b"\x93NUMPY", chunked):
        first = [_raw(url, req, timeout=120).split(b"\r\n")[0] for url in (local, ray_url)]
        assert first[0] == first[1] and first[0].startswith(b"HTTP/1.1 413"), first
    # still serving, the same answer as the local host; the scoped /healthz and /metrics with a token
    ok = [send(url, pid, symbols, token=tokens["phone"], timeout=300, retries=2) for url in (local, ray_url)]
    assert ok[0]["text"] == ok[1]["text"] and ok[1]["package"] == pid
    for url in (local, ray_url):
        h = httpx.get(f"{url}/healthz", headers={"authorization": f"Bearer {tokens['other']}"}, timeout=60)
        assert h.status_code == 200 and h.json()["packages"] == {}  # only what that device may use
    m = httpx.get(f"{ray_url}/metrics", headers={"authorization": f"Bearer {tokens['phone']}"}, timeout=60).text
    assert all(f'semedge_requests_total{{package="{pid}",status="{c}"}}' in m for c in (401, 403, 422))


def test_ray_serve_with_a_bad_auth_file_fails_before_ray(tmp_path):
    """A bad --auth file is refused with exit 2 before any Ray cluster starts."""
    from test_cli_contract import run
    from test_trust import make_package

    pkg = make_package(tmp_path / "pkg")
    bad = tmp_path / "auth.yaml"
    bad.write_text(yaml.safe_dump({"devices": {"p": {"token_sha256": "plaintext-token", "packages": ["*"]}}}))
    r = run("serve", "--engine", "ray", "--packages", str(pkg), "--auth", str(bad), "--port", "0")
    assert r.returncode == 2 and "token_sha256 is not 64 lowercase hex" in r.stderr.strip().splitlines()[-1], r.stderr
