"""Idempotent retries on both hosts, and `serve --engine ray` on a real local Ray cluster."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import httpx
import numpy as np
import pytest

from semedge.runtime.client import send, to_npy
from semedge.runtime.decode_api import HTTPError, ReplayCache
from semedge.runtime.package import Package
from semedge.runtime.runner import DeviceRunner
from semedge.runtime.server import ServerConfig

MAX_NEW = 8
MID = "x-semedge-message-id"


def test_replay_cache_answers_repeats_and_refuses_reuse():
    async def go():
        c = ReplayCache(ttl_s=60)
        assert await c.lookup(("p", "a"), "h1") is None  # first: the caller decodes
        waiting = asyncio.create_task(c.lookup(("p", "a"), "h1"))  # a repeat while in flight waits
        await asyncio.sleep(0)
        c.done(("p", "a"), {"text": ["hi"]})
        assert await waiting == {"text": ["hi"]}
        assert await c.lookup(("p", "a"), "h1") == {"text": ["hi"]} and c.replays == 2
        with pytest.raises(HTTPError) as e:
            await c.lookup(("p", "a"), "h2")
        assert e.value.status == 409
        assert await c.lookup(("p", "b"), "h1") is None
        c.done(("p", "b"), None)  # a failed decode is not kept: the retry decodes
        assert await c.lookup(("p", "b"), "h1") is None

    asyncio.run(go())


def test_base_cli_does_not_import_ray():
    code = "import sys, semedge.cli, semedge.cli_runtime, semedge.runtime.server; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.fixture(scope="module")
def ray_served(tmp_path_factory):
    """The tiny package behind Ray Serve (1 decoder replica) on a 1-CPU local Ray cluster."""
    ray = pytest.importorskip("ray")
    from conftest import tiny_whisper_package

    from semedge.runtime import ray_serve

    loaded, split, path = tiny_whisper_package(tmp_path_factory.mktemp("pkgs") / "tiny")
    pkg = Package.load(path)
    t = np.arange(16000) / 16000
    symbols = DeviceRunner(pkg).encode_audio((0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32))
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=1, include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    cfg = ServerConfig(max_new_tokens=MAX_NEW, backend="torch", max_body_bytes=256 * 1024, max_batch=8, max_wait_ms=10)
    try:
        url = ray_serve.start(path.parent, port=port, config=cfg, replicas=1, num_cpus=0.5)
        yield split, pkg.package_id, url, symbols
    finally:
        ray_serve.stop()
        ray.shutdown()


@pytest.mark.slow  # a Ray cluster + Serve deployment: ~30 s on an idle 2-core host, minutes on a busy one
def test_ray_serve_same_api_codes_and_replays(ray_served):
    import torch

    split, pid, url, symbols = ray_served
    ref = split.server.transcribe([torch.from_numpy(symbols)], max_new_tokens=MAX_NEW)
    out = send(url, pid, symbols, timeout=300, retries=2, message_id="m-1")
    assert out["text"] == ref and out["package"] == pid and "replayed" not in out
    again = send(url, pid, symbols, timeout=300, message_id="m-1")
    assert again["replayed"] and again["text"] == ref
    post = lambda body, p=pid, **kw: httpx.post(f"{url}/v1/decode", params={"package": p}, content=body, timeout=300, **kw)
    assert post(to_npy(symbols[:, :4]), headers={MID: "m-1"}).status_code == 409  # same id, other body
    # the refusals of the single-process server (tests/test_server.py), same codes and reasons
    cases = [(b"garbage", 422, "not a .npy"), (to_npy(symbols.astype(np.float16))[:-3], 422, "bytes"),
             (to_npy(np.ones((1501, 16), np.float32)), 422, "tokens"), (to_npy(np.full_like(symbols, np.nan)), 422, "NaN"),
             (b"\x93NUMPY" + b"\x00" * (300 * 1024), 413, "limit")]
    for body, status, reason in cases:
        r = post(body)
        assert r.status_code == status and reason in r.json()["detail"], (status, r.text)
    assert post(b"", p="nope").status_code == 404
    assert post(to_npy(symbols), headers={MID: "bad id!"}).status_code == 422
    two = send(url, pid, np.stack([symbols, symbols]), timeout=300)
    assert two["text"] == ref * 2
    h = httpx.get(f"{url}/healthz", timeout=60).json()
    assert h["packages"][pid]["k"] == 16 and h["packages"][pid]["max_tokens"] == 1500
    m = httpx.get(f"{url}/metrics", timeout=60).text
    assert f'semedge_requests_total{{package="{pid}",status="200"}}' in m


def test_serve_cli_refuses_bad_ray_options(tmp_path):
    from semedge.cli import main

    assert main(["serve", "--packages", str(tmp_path), "--replicas", "2"]) == 2  # needs --engine ray
    assert main(["serve", "--packages", str(tmp_path), "--engine", "ray", "--autoscale", "3,1"]) == 2
    assert main(["serve", "--packages", str(tmp_path), "--engine", "spark"]) == 2
