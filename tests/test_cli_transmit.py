"""`semedge transmit` end to end in a subprocess: output keys, and bad input -> one line, exit 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def semedge(*args, env=None, cwd=None):
    e = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "semedge.cli", *args], capture_output=True, text=True, env=e, cwd=cwd, timeout=600)


def _one_line_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in r.stderr


def test_transmit_json_keys(tmp_path):
    r = semedge("transmit", "--model", "whisper-tiny.en", "--text", "the boy threw the ball", "--snr", "20", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("transcript", "reference", "wer", "bleu", "similarity", "snr_db", "channel", "symbols_sent"):
        assert key in out
    assert out["reference"] == "the boy threw the ball"
    assert out["snr_db"] == 20 and out["channel"] == "awgn"
    assert out["symbols_sent"] == out["tokens_sent"] * out["k"] > 0
    assert 0 <= out["wer"] <= 1.0  # 20 dB: a usable transcript
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_unknown_model_source(tmp_path):
    _one_line_error(semedge("transmit", "--model", "no-such-model", "--text", "hi", cwd=tmp_path), "no-such-model", "fix")
    assert list(tmp_path.iterdir()) == []


def test_snr_not_a_number(tmp_path):
    _one_line_error(semedge("transmit", "--snr", "loud", "--text", "hi", cwd=tmp_path), "snr")


def test_unreadable_wav(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"this is not audio")
    _one_line_error(semedge("transmit", "--model", "whisper-tiny.en", "--wav", str(bad), cwd=tmp_path), "bad.wav")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.wav"]


def test_missing_espeak(tmp_path):
    # A PATH without espeak-ng (python itself is called by absolute path).
    _one_line_error(
        semedge("transmit", "--model", "whisper-tiny.en", "--text", "hi", env={"PATH": str(tmp_path)}, cwd=tmp_path),
        "espeak-ng", "apt-get install espeak-ng",
    )


def test_bad_channel_and_k(tmp_path):
    _one_line_error(semedge("transmit", "--channel", "carrier-pigeon", "--text", "hi", cwd=tmp_path), "carrier-pigeon")
    _one_line_error(semedge("transmit", "--k", "lots", "--text", "hi", cwd=tmp_path), "--k")


def test_k_to_send_nested_auto_and_errors():
    from types import SimpleNamespace

    from semedge.semcom.checkpoint import Checkpoint
    from semedge.semcom.jsc import JSCCodec, JSCConfig
    from semedge.semcom.rate import RatePolicy
    from semedge.cli_transmit import _k_to_send
    from semedge.core.errors import UserError

    loaded = SimpleNamespace(source="m", d_model=16)
    man = {"rate_training": {"rate_min": 8}, "cut_from": {"folder": "parent-k64", "k": 64},
           "rate_policy": RatePolicy(32, [(0.0, 32), (10.0, 16)]).to_dict()}
    ck = Checkpoint(Path("ck"), man, JSCCodec(JSCConfig(d_model=16, k=32)))
    assert _k_to_send(None, ck, loaded, 5.0) is None
    assert _k_to_send(32, ck, loaded, 5.0) is None  # all of k
    assert _k_to_send(16, ck, loaded, 5.0) == 16
    assert _k_to_send("auto", ck, loaded, 12.0) == 16 and _k_to_send("auto", ck, loaded, 5.0) is None
    with pytest.raises(UserError, match="parent-k64"):
        _k_to_send(48, ck, loaded, 5.0)
    with pytest.raises(UserError, match="8 to 32"):
        _k_to_send(4, ck, loaded, 5.0)
    assert _k_to_send("auto", None, loaded, 5.0) is None and _k_to_send(16, None, loaded, 5.0) is None
    with pytest.raises(UserError, match="no trained codec"):
        _k_to_send(8, None, loaded, 5.0)


def test_transmit_default_codec_k_auto_and_nested(tmp_path):
    """whisper-base's shipped codec: --k auto asks its rate policy, --k K sends its first K symbols (K: the
    smallest its nested training allows)."""
    from semedge.semcom.checkpoint import ASSETS, DEFAULTS
    from semedge.semcom.rate import RatePolicy

    man = json.loads((ASSETS / DEFAULTS["whisper-base"] / "manifest.json").read_text())
    k_default = man["jsc"]["k"]
    policy = RatePolicy.from_dict(man["rate_policy"])
    k_min = man["rate_training"]["rate_min"]
    for k, want in (("auto", policy.choose(10.0)), (str(k_min), k_min)):
        r = semedge("transmit", "--text", "the boy threw the ball", "--snr", "10", "--k", k, "--json", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert out["codec"] == f"jsc k={k_default}" and out["k"] == want
        assert out["symbols_sent"] == out["tokens_sent"] * want
