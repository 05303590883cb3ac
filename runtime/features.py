"""Whisper's log-mel front end in numpy (device side: no torch, transformers or scipy).

`log_mel(audio)` reproduces `transformers.WhisperFeatureExtractor` (80 Slaney mel
bins, n_fft 400, hop 160, 30 s window) so the device can make the encoder's input.
The frame constants and window arithmetic live in semedge.core.frames.
"""

from __future__ import annotations

import functools

import numpy as np

from semedge.core.errors import UserError
from semedge.core.frames import HOP_LENGTH, N_SAMPLES, SAMPLE_RATE

N_FFT = 400
N_MELS = 80


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
def whisper_filters() -> np.ndarray:
    """The filterbank log_mel uses, [n_fft/2+1, n_mels] float64, read-only."""
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
    mel = power @ whisper_filters()  # [3001, 80]
    logm = np.log10(np.maximum(mel, 1e-10)).T[:, :-1]  # drop last frame -> [80, 3000]
    logm = np.maximum(logm, logm.max() - 8.0)
    return ((logm + 4.0) / 4.0).astype(np.float32)


def pcm_input(audio, full: bool = False) -> np.ndarray:
    """The input of a package with the front end in its graph (manifest frontend.compute "graph"):
    float32 [1, n] samples, cut to 30 s; full: zero-padded to 30 s (the graph then gives the full window)."""
    x = pad_or_trim(_check_audio(audio)) if full else _check_audio(audio)[:N_SAMPLES]
    return np.ascontiguousarray(x[None], dtype=np.float32)
