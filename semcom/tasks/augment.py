"""Deterministic degradations of 16 kHz speech, the way a phone or radio front end hears it.

Each step is a small function `(audio, rng, pool) -> audio` on float32 mono 16 kHz samples.
A chain is a "+"-joined list of step names (e.g. "reverb+babble10"); `apply` runs it with a
generator seeded by the utterance id, so the same id always gives the same samples.
`pool` is a list of other clean utterances (the babble source); only babble steps use it.
Codecs (mu-law, GSM) and pitch shifting run the `sox` program as a subprocess.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess

import numpy as np

from semedge.core.errors import UserError
from semedge.core.frames import SAMPLE_RATE

# Bump when a step's output changes, so cached augmented audio is rebuilt.
AUGMENT_VERSION = 1
NOISE_SNRS_DB = (20, 10, 5)


# ---------------------------------------------------------------- helpers

def _sox(data: bytes, args_in: list[str], args_out: list[str], effects: list[str] = ()) -> bytes:
    """Run sox on raw bytes (stdin -> stdout); -R -D: repeatable, no dither, so the output is deterministic."""
    exe = shutil.which("sox")
    if exe is None:
        raise UserError("sox not found (needed for codec and pitch augmentation)", "apt-get install sox")
    r = subprocess.run([exe, "-q", "-R", "-D", *args_in, "-", *args_out, "-", *effects],
                       input=data, capture_output=True, timeout=120)
    if r.returncode != 0:
        raise UserError(f"sox failed: {r.stderr.decode(errors='replace').strip()[:200]}",
                        "check `sox -h` lists the format (gsm, ul) and effect (pitch)")
    return r.stdout


_F32_16K = ["-t", "raw", "-e", "floating-point", "-b", "32", "-c", "1", "-r", str(SAMPLE_RATE)]


def _f32(x: np.ndarray) -> bytes:
    return np.ascontiguousarray(x, dtype="<f4").tobytes()


def _from_f32(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)) + 1e-12))


def _fit(noise: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """`noise` tiled and cut to n samples from a random offset."""
    reps = -(-(n + len(noise)) // len(noise))
    start = int(rng.integers(0, len(noise)))
    return np.tile(noise, reps)[start:start + n]


def _peak_safe(x: np.ndarray) -> np.ndarray:
    """Scale down only if the peak would clip the int16 cache."""
    peak = float(np.max(np.abs(x))) if len(x) else 0.0
    return (x * (0.99 / peak) if peak > 0.99 else x).astype(np.float32)


# ---------------------------------------------------------------- steps

def speed(x: np.ndarray, factor: float) -> np.ndarray:
    """Speed perturbation by resampling: tempo and pitch both change by `factor`."""
    from fractions import Fraction

    from scipy.signal import resample_poly

    f = Fraction(factor).limit_denominator(20)
    return resample_poly(x, f.denominator, f.numerator).astype(np.float32)


def pitch(x: np.ndarray, cents: int) -> np.ndarray:
    """Pitch shift by `cents` at the same tempo (sox `pitch`)."""
    return _from_f32(_sox(_f32(x), _F32_16K, _F32_16K, ["pitch", str(cents)]))[:len(x)]


def telephone(x: np.ndarray) -> np.ndarray:
    """Narrowband telephone: 8 kHz sampling, 300-3400 Hz band-pass, back to 16 kHz."""
    from scipy.signal import butter, resample_poly, sosfilt

    y = resample_poly(x, 1, 2)
    sos = butter(4, [300, 3400], btype="bandpass", fs=SAMPLE_RATE // 2, output="sos")
    return resample_poly(sosfilt(sos, y), 2, 1).astype(np.float32)


def codec(x: np.ndarray, kind: str) -> np.ndarray:
    """Round trip through an 8 kHz telephone codec with sox: "ul" (G.711 mu-law) or "gsm" (GSM 06.10)."""
    enc = _sox(_f32(x), _F32_16K, ["-t", kind, "-r", "8000", "-c", "1"])
    return _from_f32(_sox(enc, ["-t", kind, "-r", "8000", "-c", "1"], _F32_16K))


def add_noise(x: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """x + noise scaled so that power(x) / power(noise) is `snr_db`."""
    gain = _rms(x) / (_rms(noise) * 10 ** (snr_db / 20))
    return (x + gain * noise[:len(x)]).astype(np.float32)


def colored_noise(n: int, rng: np.random.Generator, exponent: float) -> np.ndarray:
    """Noise with power ~ 1/f**exponent (0 white, 1 pink, 2 brown), 50 Hz high-passed."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    spec *= np.where(f < 50, 0.0, 1.0 / np.maximum(f, 50) ** (exponent / 2))
    y = np.fft.irfft(spec, n)
    return (y / _rms(y)).astype(np.float32)


def babble(n: int, rng: np.random.Generator, pool: list[np.ndarray], talkers: int = 4) -> np.ndarray:
    """Several other talkers at once, each from a random offset (pool: clean utterances)."""
    if not pool:
        raise UserError("babble noise needs a pool of other utterances", "pass pool=[...] to augment.apply")
    picks = rng.choice(len(pool), size=min(talkers, len(pool)), replace=False)
    y = sum(_fit(pool[i] / _rms(pool[i]), n, rng) for i in picks)
    return (y / _rms(y)).astype(np.float32)


def room_impulse(rng: np.random.Generator, rt60: float) -> np.ndarray:
    """Synthetic room impulse response: a direct path then exponentially decaying noise (-60 dB at rt60)."""
    t = np.arange(int(rt60 * SAMPLE_RATE)) / SAMPLE_RATE
    ir = rng.standard_normal(len(t)) * np.exp(-6.9 * t / rt60) * 0.3
    ir[:int(0.003 * SAMPLE_RATE)] = 0.0  # first reflections arrive a few ms after the direct path
    ir[0] = 1.0
    return (ir / np.sqrt(np.sum(ir**2))).astype(np.float32)


def reverb(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Convolve with a synthetic room (RT60 0.2-0.8 s); keeps 0.25 s of tail, same RMS as the input."""
    from scipy.signal import fftconvolve

    y = fftconvolve(x, room_impulse(rng, float(rng.uniform(0.2, 0.8))))[:len(x) + SAMPLE_RATE // 4]
    return (y * (_rms(x) / _rms(y))).astype(np.float32)


# ---------------------------------------------------------------- chains

def _noise_step(kind: str, snr: int):
    def step(x, rng, pool):
        noise = babble(len(x), rng, pool) if kind == "babble" else colored_noise(len(x), rng, rng.uniform(0.5, 2.0))
        return add_noise(x, noise, snr)
    return step


STEPS = {
    "speed0.9": lambda x, rng, pool: speed(x, 0.9),
    "speed1.1": lambda x, rng, pool: speed(x, 1.1),
    "pitchup": lambda x, rng, pool: pitch(x, 250),
    "pitchdown": lambda x, rng, pool: pitch(x, -250),
    "tel": lambda x, rng, pool: telephone(x),
    "ulaw": lambda x, rng, pool: codec(x, "ul"),
    "gsm": lambda x, rng, pool: codec(x, "gsm"),
    "reverb": lambda x, rng, pool: reverb(x, rng),
    **{f"{k}{s}": _noise_step(k, s) for k in ("babble", "noise") for s in NOISE_SNRS_DB},
}

# The chains `load_split(augment=p)` picks from, one per augmented utterance.
CHAINS = (
    "speed0.9", "speed1.1", "pitchup", "pitchdown", "tel", "ulaw", "gsm", "reverb",
    "babble20", "babble10", "babble5", "noise20", "noise10", "noise5",
    "reverb+babble10", "tel+noise10", "gsm+babble10", "speed1.1+ulaw", "speed0.9+reverb", "reverb+noise20",
)


def seed_of(uid: str) -> int:
    return int.from_bytes(hashlib.sha256(uid.encode()).digest()[:8], "big")


def check_chain(name: str) -> tuple[str, ...]:
    steps = tuple(name.split("+")) if isinstance(name, str) else ()
    bad = [s for s in steps if s not in STEPS]
    if not steps or bad:
        raise UserError(f"unknown augmentation {name!r}", f"use steps from {', '.join(STEPS)} joined by '+'")
    return steps


def apply(name: str, x: np.ndarray, uid: str, pool: list[np.ndarray] | None = None) -> np.ndarray:
    """Run chain `name` on x, seeded by the utterance id `uid`: same inputs, same samples."""
    rng = np.random.default_rng(seed_of(f"{uid}|{name}"))
    y = np.asarray(x, dtype=np.float32)
    for step in check_chain(name):
        y = STEPS[step](y, rng, pool or [])
    return _peak_safe(y)


def chain_for(key: str) -> str:
    """A deterministic chain for a key (e.g. a normalised sentence)."""
    return CHAINS[seed_of("chain|" + key) % len(CHAINS)]
