"""SIGTERM drains the real `semedge serve`: every request it accepted gets its answer, exit 0."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

SCRIPT = Path(sys.executable).parent / "semedge"
CLIENTS = 8
WAIT_S = 2.0


def _package(folder: Path) -> Path:
    """The tiny Whisper package of the server tests, without graph optimisation (faster)."""
    import torch

    from semedge.export.package import build_package
    from semedge.semcom.jsc import JSCCodec, JSCConfig
    from semedge.semcom.models import tiny_model
    from semedge.semcom.split import build_split

    loaded = tiny_model("whisper")
    torch.manual_seed(1)
    return build_package(build_split(loaded, JSCCodec(JSCConfig(d_model=64, k=16, hidden=64))), folder, optimize=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(pkg: Path, port: int, log) -> subprocess.Popen:
    # every message waits WAIT_S in the queue for company (a batch has room for more than CLIENTS):
    # accepted messages are in flight most of the time
    cmd = [str(SCRIPT), "serve", "--packages", str(pkg), "--port", str(port), "--backend", "torch",
           "--max-batch", "32", "--max-wait-ms", str(WAIT_S * 1000), "--max-new-tokens", "4", "--log-level", "warning"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, "semedge serve exited during start-up"
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    pytest.fail(f"semedge serve did not answer /healthz within {timeout} s")


def _client(url: str, pid: str, body: bytes, tally: dict, lock: threading.Lock) -> None:
    """Send one message at a time until the server stops taking connections."""
    with httpx.Client(timeout=30) as c:
        while True:
            try:
                r = c.post(f"{url}/v1/decode", params={"package": pid}, content=body)
            except httpx.TransportError:  # refused, or closed before the request was read: not accepted
                return
            with lock:
                key = "ok" if r.status_code == 200 and len(r.json()["text"]) == 1 else f"http {r.status_code}"
                tally[key] = tally.get(key, 0) + 1


def test_sigterm_answers_every_accepted_request_then_exits_0(tmp_path):
    from semedge.runtime.client import to_npy
    from semedge.runtime.package import Package

    pid = Package.load(_package(tmp_path / "tiny")).package_id
    port, log_path = _free_port(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    rng = np.random.default_rng(0)
    body = to_npy(rng.standard_normal((20, 16)).astype(np.float32))
    with open(log_path, "wb") as log:
        proc = _start(tmp_path / "tiny", port, log)
        try:
            _wait_healthy(url, proc)
            tally, lock = {}, threading.Lock()
            threads = [threading.Thread(target=_client, args=(url, pid, body, tally, lock)) for _ in range(CLIENTS)]
            for t in threads:
                t.start()
            while tally.get("ok", 0) < CLIENTS:  # the first round answered
                time.sleep(0.01)
            time.sleep(WAIT_S / 4)  # the second round sent, and waiting in the server's queue
            proc.send_signal(signal.SIGTERM)
            for t in threads:
                t.join(30)
            rc = proc.wait(30)
        finally:
            proc.kill() if proc.poll() is None else None
    out = log_path.read_text()
    m = re.search(r"stopped: (\d+) in flight at the signal; (\d+) requests accepted, (\d+) answered, (\d+) cut off", out)
    assert rc == 0 and m, out
    in_flight, accepted, answered, cut = map(int, m.groups())
    assert tally == {"ok": accepted}, (tally, out)  # every accepted request answered 200, none lost
    assert answered == accepted and cut == 0
    assert in_flight >= 1, out  # the signal came mid-flight
