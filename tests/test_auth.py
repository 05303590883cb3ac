"""Authenticated devices (runtime/auth.py): the auth file, the Gate's 401/403/429, and the real
server over HTTPS with a self-signed certificate pinned by the client (--ca)."""

from __future__ import annotations

import os
import stat
import time

import httpx
import numpy as np
import pytest
import yaml

from semedge.core.errors import UserError
from semedge.runtime.auth import (AuthError, Device, Gate, Limits, add_device, load_auth, parse_auth, token_hash,
                                  write_self_signed)

from test_cli_contract import clean, run

H = "a" * 64


def _dev(**kw) -> dict:
    return {"token_sha256": H, "packages": ["*"], **kw}


@pytest.mark.parametrize("data, words", [
    (None, "no `devices:`"),
    ({"devices": {}}, "no `devices:`"),
    ({"devices": {"p": {"token_sha256": "abc", "packages": ["*"]}}}, "devices.p.token_sha256"),
    ({"devices": {"p": {"token_sha256": H, "packages": []}}}, "devices.p.packages"),
    ({"devices": {"p": _dev(colour="red")}}, "devices.p.colour"),
    ({"devices": {"p": _dev(rate_per_s=0)}}, "devices.p.rate_per_s"),
    ({"devices": {"p": _dev(burst=1.5)}}, "devices.p.burst"),
    ({"devices": {"p q": _dev()}}, "device name"),
    ({"devices": {"p": _dev(), "q": _dev()}}, "same token"),
    ({"devices": {"p": _dev()}, "extra": 1}, "'extra'"),
])
def test_bad_auth_file_names_the_field(data, words):
    with pytest.raises(UserError, match=words.replace("(", r"\(")):
        parse_auth(data, "auth.yaml")


def test_limits_default_and_override():
    devs = parse_auth({"limits": {"rate_per_s": 5}, "devices": {"p": _dev(max_concurrent=2)}})
    assert devs["p"].limits == Limits(rate_per_s=5.0, burst=40, max_concurrent=2)


def test_add_device_stores_only_the_hash(tmp_path):
    path = tmp_path / "auth.yaml"
    token = add_device(path, "phone-1", ["whisper-*"])
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and token not in path.read_text()
    add_device(path, "watch", ["*"])
    devs = load_auth(path)
    assert devs["phone-1"].token_sha256 == token_hash(token) and devs["phone-1"].packages == ("whisper-*",)
    with pytest.raises(UserError, match="already in"):
        add_device(path, "watch", ["*"])


def test_gate_401_403_429():
    gate = Gate({"p": Device("p", token_hash("t1"), ("whisper-*",), Limits(rate_per_s=1000, burst=1000, max_concurrent=1)),
                 "slow": Device("slow", token_hash("t2"), ("*",), Limits(rate_per_s=0.5, burst=1, max_concurrent=9))})
    for header in (None, "Basic t1", "Bearer ", "Bearer nope"):
        with pytest.raises(AuthError) as e:
            gate.admit(header, "whisper-1")
        assert e.value.status == 401 and "WWW-Authenticate" in e.value.headers
    with pytest.raises(AuthError) as e:
        gate.admit("Bearer t1", "bart-1")
    assert e.value.status == 403 and "may not use package 'bart-1'" in e.value.detail
    with gate.admit("Bearer t1", "whisper-1"):  # its one concurrency slot
        with pytest.raises(AuthError) as e:
            gate.admit("Bearer t1", "whisper-2")
        assert e.value.status == 429 and e.value.headers["Retry-After"] == "1"
    gate.admit("Bearer t1", "whisper-1").__exit__(None, None, None)  # the slot is free again
    gate.admit("bearer t2", "x").__exit__(None, None, None)  # burst of 1, then 0.5/s
    with pytest.raises(AuthError) as e:
        gate.admit("Bearer t2", "x")
    assert e.value.status == 429 and int(e.value.headers["Retry-After"]) in (1, 2)


# ----------------------------------------------------------------------------- the CLI


def test_cli_auth_add_prints_the_token_once(tmp_path):
    path = tmp_path / "auth.yaml"
    r = run("auth", "add", "phone-1", "--auth", str(path), "--packages", "whisper-base-*,tiny-*")
    clean(r)
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert token.startswith("sek_") and load_auth(path)["phone-1"].token_sha256 == token_hash(token)
    r = run("auth", "add", "phone-1", "--auth", str(path))
    assert r.returncode == 2 and r.stderr.startswith("error: device phone-1 is already in"), r.stderr


def test_cli_serve_with_a_bad_auth_file_fails_at_start(tmp_path):
    from test_trust import make_package

    pkg = make_package(tmp_path / "pkg")
    bad = tmp_path / "auth.yaml"
    bad.write_text(yaml.safe_dump({"devices": {"p": {"token_sha256": "plaintext-token", "packages": ["*"]}}}))
    r = run("serve", "--packages", str(pkg), "--auth", str(bad), "--port", "0")
    clean(r)
    assert r.returncode == 2 and "token_sha256 is not 64 lowercase hex" in r.stderr.strip().splitlines()[-1], r.stderr
    r = run("serve", "--packages", str(pkg), "--ssl-certfile", str(bad), "--port", "0")
    assert r.returncode == 2 and "both --ssl-certfile and --ssl-keyfile" in r.stderr, r.stderr


# ----------------------------------------------------------------------------- the real server, HTTPS


def self_signed(folder):
    """(cert.pem, key.pem) for 127.0.0.1."""
    return write_self_signed(folder, "semedge test")


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """A signed tiny package served over HTTPS with auth: (url, package id, symbols, tokens, cert)."""
    import torch

    from semedge.export.package import build_package
    from semedge.runtime.package import Package
    from semedge.runtime.runner import DeviceRunner
    from semedge.runtime.server import ServerConfig, create_app, serve_in_thread
    from semedge.runtime.trust import new_keypair
    from semedge.semcom.jsc import JSCCodec, JSCConfig
    from semedge.semcom.models import tiny_model
    from semedge.semcom.split import build_split

    d = tmp_path_factory.mktemp("secured")
    key, pub, _ = new_keypair(d / "keys")
    loaded = tiny_model("whisper")
    torch.manual_seed(1)
    split = build_split(loaded, JSCCodec(JSCConfig(d_model=64, k=16, hidden=64)))
    pkg = Package.load(build_package(split, d / "tiny", optimize=False, sign_key=key), trust=pub)
    auth = d / "auth.yaml"
    tokens = {n: add_device(auth, n, scope) for n, scope in (("phone", ["tiny-*"]), ("other", ["bart-*"]), ("slow", ["*"]))}
    data = yaml.safe_load(auth.read_text())
    data["devices"]["slow"].update(rate_per_s=0.01, burst=1)  # one request, then one per 100 s
    auth.write_text(yaml.safe_dump(data))
    cert, tls_key = self_signed(d)
    app = create_app([pkg], loader=lambda src: loaded, gate=Gate.from_file(auth),
                     config=ServerConfig(max_new_tokens=4, backend="torch", max_wait_ms=1))
    audio = (0.3 * np.sin(2 * np.pi * 300 * np.arange(8000) / 16000)).astype(np.float32)
    symbols = DeviceRunner(pkg).encode_audio(audio)
    with serve_in_thread(app, ssl_certfile=str(cert), ssl_keyfile=str(tls_key)) as url:
        yield url, pkg.package_id, symbols, tokens, str(cert)


def test_https_with_token_and_pinned_ca(secured):
    from semedge.runtime.client import send

    url, pid, symbols, tokens, cert = secured
    assert url.startswith("https://")
    out = send(url, pid, symbols, token=tokens["phone"], ca=cert)
    assert out["package"] == pid and len(out["text"]) == 1


def test_refusals_are_json_with_the_right_status(secured):
    from semedge.runtime.client import ServerError, send, to_npy

    url, pid, symbols, tokens, cert = secured
    with httpx.Client(verify=cert, timeout=60) as c:
        r = c.post(f"{url}/v1/decode", params={"package": pid}, content=to_npy(symbols))
        assert r.status_code == 401 and "bearer token" in r.json()["detail"] and r.headers["www-authenticate"]
        r = c.get(f"{url}/healthz")
        assert r.status_code == 401
        r = c.get(f"{url}/healthz", headers={"authorization": f"Bearer {tokens['other']}"})
        assert r.status_code == 200 and r.json()["packages"] == {}  # only what that device may use
    with pytest.raises(ServerError) as e:
        send(url, pid, symbols, token=tokens["other"], ca=cert)
    assert e.value.status == 403 and "may not use" in e.value.detail
    with pytest.raises(ServerError) as e:
        send(url, pid, symbols, token="sek_forged", ca=cert)
    assert e.value.status == 401 and "--token" in e.value.fix


def test_tls_without_the_ca_is_refused_by_the_client(secured):
    from semedge.runtime.client import send

    url, pid, symbols, tokens, _ = secured
    with pytest.raises(UserError) as e:
        send(url, pid, symbols, token=tokens["phone"])
    assert "--ca" in e.value.fix


def test_rate_limit_answers_429_with_retry_after(secured):
    from semedge.runtime.client import ServerError, send

    url, pid, symbols, tokens, cert = secured
    send(url, pid, symbols, token=tokens["slow"], ca=cert)  # its burst of 1
    with httpx.Client(verify=cert, timeout=60, headers={"authorization": f"Bearer {tokens['slow']}"}) as c:
        from semedge.runtime.client import to_npy

        r = c.post(f"{url}/v1/decode", params={"package": pid}, content=to_npy(symbols))
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 99 and "over its rate" in r.json()["detail"]
    with pytest.raises(ServerError) as e:
        send(url, pid, symbols, token=tokens["slow"], ca=cert)
    assert e.value.status == 429
