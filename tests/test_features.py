import subprocess
import sys

import numpy as np
import pytest

from semedge.runtime import features
from semedge.core.frames import ENC_FRAMES, N_FRAMES, SAMPLE_RATE, content_frames
from semedge.runtime.features import log_mel
from semedge.core.errors import UserError

# Measured on 100 test utterances: max 6.2e-5 against WhisperFeatureExtractor's default
# (torch float32 STFT) path, 1.2e-7 (one float32 ulp) against its numpy path.
TOL = 1e-4
TOL_NP = 1e-6


@pytest.fixture(scope="module")
def extractor():
    transformers = pytest.importorskip("transformers")
    return transformers.WhisperFeatureExtractor()


@pytest.fixture(scope="module")
def speech_audio():
    from semedge.semcom.tasks.speech import synthesize

    return synthesize("the boy threw the ball over the garden wall", voice="en-gb", speed=160)


def _ref(fe, audio):
    return fe(audio, sampling_rate=16000, return_tensors="np").input_features[0]


def test_parity_on_speech(extractor, speech_audio):
    ours = log_mel(speech_audio)
    assert ours.shape == (80, N_FRAMES) and ours.dtype == np.float32
    ref = _ref(extractor, speech_audio)
    assert np.abs(ours - ref).max() <= TOL
    padded = np.pad(speech_audio, (0, 480000 - len(speech_audio)))
    ref_np = extractor._np_extract_fbank_features(padded[None], "cpu")[0]
    assert np.abs(ours - ref_np).max() <= TOL_NP
    # Speech must not be flat: the comparison has to be over a real dynamic range.
    assert ours.max() - ours.min() > 1.0


@pytest.mark.parametrize("seconds,scale", [(0.5, 0.01), (31.0, 0.5)])
def test_parity_on_noise_and_trimming(extractor, seconds, scale):
    rng = np.random.default_rng(3)
    audio = (scale * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)
    assert np.abs(log_mel(audio) - _ref(extractor, audio)).max() <= TOL


def test_filter_bank_matches_transformers():
    audio_utils = pytest.importorskip("transformers.audio_utils")
    ref = audio_utils.mel_filter_bank(
        num_frequency_bins=201, num_mel_filters=80, min_frequency=0, max_frequency=8000,
        sampling_rate=16000, norm="slaney", mel_scale="slaney",
    )
    assert np.allclose(features.mel_filter_bank(), ref, rtol=0, atol=1e-12)


def test_content_frames():
    assert content_frames(0) == 0
    assert content_frames(1) == 1
    assert content_frames(320) == 1
    assert content_frames(321) == 2
    assert content_frames(16000) == 50
    assert content_frames(10 * 480000) == ENC_FRAMES
    with pytest.raises(UserError):
        content_frames(-1)


def test_bad_audio_raises():
    with pytest.raises(UserError, match="1-D"):
        log_mel(np.zeros((2, 16000), np.float32))
    with pytest.raises(UserError, match="NaN"):
        log_mel(np.array([0.0, np.nan], np.float32))


def test_imports_without_torch():
    code = (
        "import sys\n"
        "for m in ('torch', 'transformers', 'scipy'): sys.modules[m] = None\n"
        "import numpy as np\n"
        "from semedge.runtime.features import log_mel\n"
        "x = log_mel(np.zeros(16000, np.float32))\n"
        "assert x.shape == (80, 3000)\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
