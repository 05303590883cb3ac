"""Device runtime: package verification, the ONNX runner vs the torch device half, no-torch import."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from semedge.export.package import build_package
from semedge.runtime.package import Package
from semedge.runtime.runner import DeviceRunner, normalize_power, provider_plan, resolve_providers, truncate
from semedge.core.errors import UserError

REPO = Path(__file__).resolve().parent.parent


def _split(arch: str, k: int = 16, power: str = "token"):
    from semedge.semcom.jsc import JSCCodec, JSCConfig
    from semedge.semcom.models import tiny_model
    from semedge.semcom.split import build_split

    loaded = tiny_model(arch)
    torch.manual_seed(1)
    codec = JSCCodec(JSCConfig(d_model=loaded.d_model, k=k, hidden=64, power=power))
    return build_split(loaded, codec)


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    split = _split("whisper")
    pkg = build_package(split, tmp_path_factory.mktemp("pkg") / "tiny-speech")
    return split, pkg


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    split = _split("bart")
    pkg = build_package(split, tmp_path_factory.mktemp("pkg") / "tiny-text")
    return split, pkg


def _audio(seconds: float = 1.3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def _copy(pkg: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(pkg, dst)
    return dst


# ----------------------------------------------------------------------------- package


def test_package_loads_and_reads_fields(speech):
    split, path = speech
    pkg = Package.load(path)
    assert pkg.kind == "speech" and pkg.k == 16 and pkg.d_model == 64
    assert pkg.package_id.startswith("tiny-speech-")
    assert pkg.onnx_path.is_file()


def test_tampered_byte_is_refused(speech, tmp_path):
    p = _copy(speech[1], tmp_path)
    onnx = p / "device.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0x01
    onnx.write_bytes(bytes(data))
    with pytest.raises(UserError) as e:
        Package.load(p)
    assert "device.onnx" in str(e.value) and "re-export the package" in str(e.value)


def test_missing_file_is_refused(speech, tmp_path):
    p = _copy(speech[1], tmp_path)
    (p / "server" / "jsc.safetensors").unlink()
    with pytest.raises(UserError, match="server/jsc.safetensors is missing"):
        Package.load(p)


def test_extra_file_is_refused(speech, tmp_path):
    p = _copy(speech[1], tmp_path)
    (p / "server" / "evil.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="server/evil.bin is not listed"):
        Package.load(p)


def test_bad_manifest_is_refused(speech, tmp_path):
    p = _copy(speech[1], tmp_path)
    m = json.loads((p / "manifest.json").read_text())
    m["format"] = "semedge-package/99"
    (p / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="format"):
        Package.load(p)
    m["format"] = "semedge-package/1"
    m["files"]["../outside"] = "0" * 64
    (p / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="unsafe"):
        Package.load(p)
    (p / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        Package.load(p)


# ----------------------------------------------------------------------------- runner


def test_runner_matches_torch_device_half(speech):
    from semedge.semcom.system import device_encode

    split, path = speech
    runner = DeviceRunner(path)
    audio = _audio()
    got = runner.encode_audio(audio)
    ref = device_encode(split, [audio])[0].numpy()
    assert got.shape == ref.shape == (65, 16)  # ceil(1.3 s / 20 ms) frames
    np.testing.assert_allclose(got, ref, atol=2e-3, rtol=0)
    # rate adaptation: the same symbols the torch path sends
    got8 = runner.encode_audio(audio, k_keep=8)
    ref8 = device_encode(split, [audio], k_keep=8)[0].numpy()
    assert got8.shape == (65, 8)
    np.testing.assert_allclose(got8, ref8, atol=2e-3, rtol=0)
    np.testing.assert_allclose(np.mean(got8**2, axis=-1), 1.0, atol=1e-4)


def test_runner_per_message_power_matches_torch(tmp_path):
    """A per-message codec: the graph scales over its window, the runner over the sent frames."""
    from semedge.semcom.system import device_encode

    split = _split("whisper", power="message")
    runner = DeviceRunner(build_package(split, tmp_path / "msg"))
    assert runner.package.power == "message"
    audio = _audio()
    for k_keep in (None, 8):
        got = runner.encode_audio(audio, k_keep=k_keep)
        ref = device_encode(split, [audio], k_keep=k_keep)[0].numpy()
        np.testing.assert_allclose(got, ref, atol=2e-3, rtol=0)
        assert abs(np.mean(got**2) - 1) < 1e-4  # unit power over the message
        assert np.std(np.mean(got**2, axis=-1)) > 0.05  # tokens keep their relative norms


def test_runner_refuses_a_foreign_filterbank(speech, tmp_path):
    """The runner reads the package's mel_filters.npy: a filterbank log_mel does not compute is refused."""
    p = _copy(speech[1], tmp_path)
    fb = np.load(p / "mel_filters.npy")
    np.save(p / "mel_filters.npy", fb * 1.01)
    with pytest.raises(UserError, match="mel_filters.npy"):
        DeviceRunner(Package.load(p, verify=False))


def test_runner_text_matches_torch(text):
    from semedge.semcom.system import device_encode

    split, path = text
    runner = DeviceRunner(path)
    got = runner.encode_text("the quick brown fox jumps")
    ref = device_encode(split, ["the quick brown fox jumps"])[0].numpy()
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    with pytest.raises(UserError, match="text model"):
        runner.encode_audio(_audio())


def test_k_keep_renormalisation_matches_torch():
    from semedge.semcom.jsc import normalize_power as torch_np

    x = np.random.default_rng(0).standard_normal((3, 7, 12)).astype(np.float32) * 3
    for k_keep in (None, 1, 5, 12):
        ref = torch_np(torch.from_numpy(x), k_keep).numpy()
        np.testing.assert_allclose(normalize_power(x, k_keep), ref, rtol=1e-5, atol=1e-6)
        ref = torch_np(torch.from_numpy(x), k_keep, "message").numpy()
        np.testing.assert_allclose(normalize_power(x, k_keep, "message"), ref, rtol=1e-5, atol=1e-6)
    assert truncate(x, 5).shape == (3, 7, 5)
    np.testing.assert_allclose(truncate(x, None, "message"), normalize_power(x, None, "message"))
    with pytest.raises(UserError, match="k_keep"):
        normalize_power(x, 13)


def test_providers_fall_back_to_cpu():
    from semedge.runtime.profiles import load_profile

    assert resolve_providers(None) == ["CPUExecutionProvider"]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert resolve_providers(["TensorRT", "CUDA"]) == ["CPUExecutionProvider"]
    assert any("not available in this onnxruntime build" in str(x.message) for x in w)
    with pytest.raises(UserError, match="not known"):
        resolve_providers(["TPU"])
    # asked for explicitly (`--ep`): an error naming what this build has, no silent CPU run
    with pytest.raises(UserError, match="CPUExecutionProvider"):
        provider_plan(["CUDA"], strict=True)
    assert provider_plan(["XnnpackExecutionProvider"])[0] == ["CPUExecutionProvider"]  # ORT's spelling
    prof = load_profile("jetson-orin-nano")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert resolve_providers(prof.execution_providers)[-1] == "CPUExecutionProvider"


def test_runner_takes_a_profile(speech):
    from semedge.runtime.profiles import load_profile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runner = DeviceRunner(speech[1], providers=load_profile("raspberry-pi-5"))
    assert runner.providers[-1] == "CPUExecutionProvider"
    assert runner.encode_audio(_audio(0.5)).shape == (25, 16)


def test_device_runtime_imports_without_torch(speech, text):
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None
        sys.modules["transformers"] = None
        import numpy as np
        from semedge.runtime import client, features, link, package, runner
        r = runner.DeviceRunner(package.Package.load({str(speech[1])!r}))
        t = np.arange(16000) / 16000
        x = r.encode_audio((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), k_keep=8)
        assert x.shape == (50, 8), x.shape
        y = client.apply_link(x, "awgn", 10.0, np.random.default_rng(0))
        assert y.shape == x.shape and not np.allclose(x, y)
        assert client.to_npy(y, "float16")[:6] == b"\\x93NUMPY"
        tr = runner.DeviceRunner({str(text[1])!r})
        assert tr.encode_text("hello there").shape[1] == 16
        bad = [m for m in ("torch", "transformers") if sys.modules.get(m) is not None]
        assert not bad, bad
        print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("ok")


def _cli_without_torch(*args: str) -> subprocess.CompletedProcess:
    """The `semedge` command in a fresh process where importing torch or transformers fails."""
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "from semedge.cli import main\n"
            f"rc = main({list(args)!r})\n"
            "bad = [m for m in ('torch', 'transformers') if sys.modules.get(m) is not None]\n"
            "assert not bad, bad\n"
            "sys.exit(rc)\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="120")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)


def test_device_cli_runs_without_torch(speech, tmp_path):
    """`semedge device run/bench` need only the base install: no torch, no transformers (a real
    server in this process decodes; the device side runs in the torch-free subprocess)."""
    import json
    import wave

    from semedge.runtime.server import ServerConfig, create_app, serve_in_thread

    split, path = speech
    r = _cli_without_torch("device", "run", "--help")
    assert r.returncode == 0 and "--ep" in r.stdout, r.stderr[-2000:]
    r = _cli_without_torch("device", "bench", str(path), "--ep", "cpu", "--runs", "2", "--warmup", "0", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["results"][0]["p50_ms"] > 0, r.stderr[-2000:]
    pcm = np.round(_audio(1.0) * 32767).astype("<i2")
    with wave.open(str(tmp_path / "a.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000), w.writeframes(pcm.tobytes())
    pkg = Package.load(path)
    app = create_app([pkg], loader=lambda src: split.loaded,
                     config=ServerConfig(max_new_tokens=4, backend="torch"))
    with serve_in_thread(app) as url:
        r = _cli_without_torch("device", "run", str(path), "--wav", str(tmp_path / "a.wav"), "--server", url,
                               "--ep", "cpu", "--channel", "none", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["providers"] == ["CPUExecutionProvider"] and out["tokens"] == 50 and isinstance(out["text"], str)
