"""Whisper's log-mel front end in numpy (device side: no torch, transformers or scipy).

`log_mel(audio)` reproduces `transformers.WhisperFeatureExtractor` (80 Slaney mel
bins, n_fft 400, hop 160, 30 s window) so the device can make the encoder's input.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from semedge.semcom.errors import UserError

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
N_MELS = 80
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480000
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames
ENC_FRAMES = N_FRAMES // 2  # 1500 encoder frames (conv stride 2)
SAMPLES_PER_ENC_FRAME = 2 * HOP_LENGTH  # 320 samples = 20 ms


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    # Slaney scale: linear below 1 kHz, logarithmic above.
    f = np.asarray(f, dtype=np.float64)
    lin = 3.0 * f / 200.0
    log = 15.0 + np.log(np.maximum(f, 1e-12) / 1000.0) * (27.0 / np.log(6.4))
    return np.where(f >= 1000.0, log, lin)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    lin = 200.0 * m / 3.0
    log = 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0))
    return np.where(m >= 15.0, log, lin)


def mel_filter_bank(
    num_frequency_bins: int = N_FFT // 2 + 1,
    num_mel_filters: int = N_MELS,
    min_frequency: float = 0.0,
    max_frequency: float = SAMPLE_RATE / 2,
    sampling_rate: int = SAMPLE_RATE,
) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular filters, [num_frequency_bins, num_mel_filters] float64."""
    mel_pts = np.linspace(_hz_to_mel(min_frequency), _hz_to_mel(max_frequency), num_mel_filters + 2)
    filter_freqs = _mel_to_hz(mel_pts)
    fft_freqs = np.linspace(0, sampling_rate // 2, num_frequency_bins)
    diff = np.diff(filter_freqs)
    slopes = filter_freqs[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    fb = np.maximum(0.0, np.minimum(down, up))
    # Area normalisation: roughly constant energy per channel.
    fb *= (2.0 / (filter_freqs[2:] - filter_freqs[:-2]))[None, :]
    return fb


@functools.lru_cache(maxsize=1)
def _whisper_filters() -> np.ndarray:
    fb = mel_filter_bank()
    fb.setflags(write=False)
    return fb


@functools.lru_cache(maxsize=1)
def _hann() -> np.ndarray:
    n = np.arange(N_FFT)
    w = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / N_FFT)  # periodic
    w.setflags(write=False)
    return w


def _check_audio(audio) -> np.ndarray:
    try:
        x = np.asarray(audio)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"audio is not an array ({e})", "pass a 1-D float array of 16 kHz samples") from e
    if x.ndim != 1:
        raise UserError(
            f"audio has shape {x.shape}, expected 1-D mono samples",
            "pass one channel of 16 kHz audio (average the channels, e.g. semcom.tasks.speech.read_wav)",
        )
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise UserError(f"audio has dtype {x.dtype}", "pass float32 samples in [-1, 1]")
    x = x.astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise UserError("audio contains NaN or inf samples", "clean the audio before feature extraction")
    return x


def pad_or_trim(audio: np.ndarray, length: int = N_SAMPLES) -> np.ndarray:
    """Zero-pad or cut to `length` samples (30 s)."""
    if audio.shape[0] >= length:
        return audio[:length]
    return np.pad(audio, (0, length - audio.shape[0]))


def log_mel(audio) -> np.ndarray:
    """16 kHz mono samples -> Whisper input features [80, 3000] float32."""
    x = pad_or_trim(_check_audio(audio))
    # Centered STFT: reflect-pad n_fft/2 each side -> 3001 frames.
    x = np.pad(x, (N_FFT // 2, N_FFT // 2), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(x, N_FFT)[::HOP_LENGTH]
    spec = np.fft.rfft(frames * _hann(), n=N_FFT, axis=-1)  # [3001, 201]
    power = spec.real**2 + spec.imag**2
    mel = power @ _whisper_filters()  # [3001, 80]
    logm = np.log10(np.maximum(mel, 1e-10)).T[:, :-1]  # drop last frame -> [80, 3000]
    logm = np.maximum(logm, logm.max() - 8.0)
    return ((logm + 4.0) / 4.0).astype(np.float32)


def content_frames(n_samples: int) -> int:
    """Encoder frames (20 ms each) that cover `n_samples` of audio, at most 1500."""
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 0:
        raise UserError(f"n_samples must be a non-negative int, got {n_samples!r}", "pass len(audio)")
    return min(ENC_FRAMES, math.ceil(int(n_samples) / SAMPLES_PER_ENC_FRAME))


FIT_MARGIN = 40  # mel frames (0.4 s) the "fit" window keeps past the utterance's end
WINDOWS = ("fit", "full")


def window_frames(n_samples: int, window: str = "fit") -> int:
    """Mel frames the device encoder runs on: "full" = the 30 s window (3000); "fit" = the
    utterance plus FIT_MARGIN, even, at most 3000 (the encoder's cost grows with it)."""
    if window == "full":
        return N_FRAMES
    if window != "fit":
        raise UserError(f"window {window!r} is unknown", "use fit or full")
    return min(N_FRAMES, 2 * content_frames(n_samples) + FIT_MARGIN)
