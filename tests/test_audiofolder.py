"""The user's recordings (Hugging Face audiofolder): formats, rates and channels in; every bad row named, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sf = pytest.importorskip("soundfile")

from semedge.core.errors import UserError  # noqa: E402
from semedge.semcom.tasks.audiofolder import load_audiofolder  # noqa: E402

SENTENCES = ("the boy threw the ball", "a cat sat on the warm mat", "she sells sea shells", "green trees grow tall")


def _semedge(*args, env=None, cwd=None):
    exe = Path(sys.executable).with_name("semedge")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "semedge.cli"]
    e = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    e.update(env or {})
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=e, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def speech():
    from semedge.semcom.tasks.speech import synthesize

    return [synthesize(s) for s in SENTENCES]  # 16 kHz mono float32


def _resample(x, rate):
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(rate, 16000)
    return resample_poly(x, rate // g, 16000 // g).astype(np.float32)


def long_recording(speech) -> np.ndarray:
    """Two sentences 30 s apart (quiet noise between): 36 s or so, cut in the pause."""
    rng = np.random.default_rng(0)
    gap = (1e-3 * rng.standard_normal(30 * 16000)).astype(np.float32)
    return np.concatenate([speech[0], gap, speech[1]])


def write_folder(d: Path, speech, long: bool = False) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    st = _resample(speech[1], 44100)
    sf.write(d / "mono8k.wav", _resample(speech[0], 8000), 8000, subtype="PCM_16")
    (d / "sub").mkdir(exist_ok=True)
    sf.write(d / "sub" / "stereo44k.flac", np.stack([st, 0.5 * st], 1), 44100)
    sf.write(d / "stereo44k.wav", np.stack([st, st], 1), 44100, subtype="PCM_24")
    sf.write(d / "clip.ogg", speech[2], 16000, format="OGG", subtype="VORBIS")
    rows = [("mono8k.wav", SENTENCES[0]), ("sub/stereo44k.flac", SENTENCES[1]), ("stereo44k.wav", SENTENCES[1]),
            ("clip.ogg", SENTENCES[2])]
    if long:
        sf.write(d / "long.wav", long_recording(speech), 16000)
        rows.append(("long.wav", f"{SENTENCES[0]} {SENTENCES[1]}"))
    lines = ["file_name,transcription,speaker"] + [f"{f},{t},someone" for f, t in rows]
    (d / "metadata.csv").write_text("\n".join(lines) + "\n")
    return d


def test_formats_rates_channels(speech, tmp_path):
    utts = load_audiofolder(write_folder(tmp_path / "data", speech))
    assert [u.text for u in utts] == [SENTENCES[0], SENTENCES[1], SENTENCES[1], SENTENCES[2]]
    for u, src in zip(utts, (speech[0], speech[1], speech[1], speech[2])):
        assert u.audio.dtype == np.float32 and u.audio.ndim == 1
        assert abs(len(u.audio) - len(src)) <= 2  # resampled back to 16 kHz
        assert u.voice == "user" and u.source == "audiofolder" and u.speed == 0
        assert getattr(u, "family", "user") == "user"
    # stereo 44.1 kHz, averaged and resampled: close to the 16 kHz original (0.75 x for the FLAC's mix)
    assert np.corrcoef(utts[2].audio[: len(speech[1])], speech[1][: len(utts[2].audio)])[0, 1] > 0.99
    assert len({u.id for u in utts}) == 4 and utts[0].id.startswith("user-mono8k.wav-")
    assert [u.id for u in load_audiofolder(tmp_path / "data")] == [u.id for u in utts]  # stable


def test_every_bad_row_is_named(speech, tmp_path):
    d = write_folder(tmp_path / "data", speech)
    (d / "noise.wav").write_bytes(b"RIFF not really audio")
    sf.write(d / "empty.wav", np.zeros(0, np.float32), 16000)
    (d / "metadata.csv").write_text(
        "file_name,transcription\n"
        "mono8k.wav,fine\n"              # line 2: good
        "gone.wav,a missing file\n"      # line 3
        "clip.ogg,   \n"                 # line 4: empty transcript
        "noise.wav,unreadable\n"         # line 5
        "empty.wav,no samples\n"         # line 6
        "../x.wav,outside\n"             # line 7
        ",no file name\n")               # line 8
    with pytest.raises(UserError) as e:
        load_audiofolder(d)
    lines = e.value.problem.splitlines()
    assert lines[0].startswith("6 problem(s)")
    expect = {3: ("gone.wav", "does not exist"), 4: ("clip.ogg", "empty transcription"), 5: ("noise.wav", "unreadable"),
              6: ("empty.wav", "no samples"), 7: ("../x.wav", "leaves the folder"), 8: ("(no file_name)", "empty file_name")}
    for (no, (name, why)), line in zip(sorted(expect.items()), lines[1:]):
        assert line.strip().startswith(f"line {no}: {name}:") and why in line, line


@pytest.mark.parametrize("meta, words", [
    (None, ["no metadata.csv"]),
    ("file,text\na.wav,hello\n", ["lacks column(s) file_name, transcription", "file, text"]),
    ("file_name,text\nmono8k.wav,hello\n", ["lacks column(s) transcription"]),
    ("file_name,transcription\n", ["no rows"]),
])
def test_bad_folder(speech, tmp_path, meta, words):
    d = write_folder(tmp_path / "data", speech)
    (d / "metadata.csv").unlink()
    if meta is not None:
        (d / "metadata.csv").write_text(meta)
    with pytest.raises(UserError) as e:
        load_audiofolder(d)
    for w in words:
        assert w in str(e.value)


def test_eval_data_cli(speech, tmp_path):
    """8 kHz mono, 44.1 kHz stereo FLAC/WAV, OGG and a 36 s recording, through `semedge eval --data`."""
    d = write_folder(tmp_path / "data", speech, long=True)
    out = tmp_path / "res" / "e"
    r = _semedge("eval", "--data", str(d), "--model", "whisper-tiny.en", "--jsc", "identity", "--channel", "awgn",
                 "--snr", "20", "--no-similarity", "--threads", "1", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.with_suffix(".json").read_text())
    (row,) = res["rows"]
    assert row["n"] == 5 and row["segments"] == 6  # the long recording is two messages
    assert row["system"] == "identity" and row["wer"] < 0.8, row  # whisper-tiny.en, short sentences, 8 kHz among them
    assert res["args"]["data"] == str(d) and "segments 6" in r.stdout
    assert out.with_suffix(".png").exists()


def test_eval_bad_folder_cli_exit_2_nothing_written(speech, tmp_path):
    d = write_folder(tmp_path / "data", speech)
    (d / "metadata.csv").write_text("file_name,transcription\nmono8k.wav,ok\ngone.wav,x\nclip.ogg,\n")
    cache = tmp_path / "cache"
    r = _semedge("eval", "--data", str(d), "--model", "whisper-tiny.en", "--jsc", "identity", "--snr", "10",
                 "--out", str(tmp_path / "e"), env={"XDG_CACHE_HOME": str(cache)}, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert "line 3: gone.wav: file does not exist" in r.stderr
    assert "line 4: clip.ogg: empty transcription" in r.stderr
    assert not (tmp_path / "e.json").exists() and not cache.exists()  # nothing cached from a half-read folder


@pytest.mark.parametrize("command", ["plan", "build"])
def test_plan_and_build_bad_folder_exit_2_before_any_work(speech, tmp_path, command):
    d = write_folder(tmp_path / "data", speech)
    (d / "metadata.csv").write_text("file_name,transcription\nmono8k.wav,ok\ngone.wav,x\n")
    out = tmp_path / ("plans.json" if command == "plan" else "out")
    r = _semedge(command, "--data", str(d), "--model", "tiny:whisper:0", "--quick", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "line 3: gone.wav: file does not exist" in r.stderr
    assert not out.exists()
