"""Long recordings: cut audio into segments of at most 30 s at quiet points (numpy only, device side).

Whisper encodes 30 s windows, so a longer recording is sent as several messages, one per
segment, and the transcripts are joined (the way Whisper's long-form decoding walks a
recording window by window). Where to cut: a simple energy detector. The audio's power in
20 ms frames (one encoder frame each) is averaged over a 0.3 s sliding window; within the
last `search_s` seconds (8 s; 30% of a shorter `max_s`) before a segment would reach
`max_s`, the cut goes to the middle of the quietest such window (the latest one on a tie),
so a pause between words is preferred to a cut through one. With no pause there, the
quietest point still wins; a segment is never longer than `max_s`.

    for start, end in segment_bounds(audio):          # sample indices, contiguous, cover the audio
        symbols = runner.encode_audio(audio[start:end])

Segments are contiguous and cover every sample; the same audio always gives the same cuts.
"""

from __future__ import annotations

import math

import numpy as np

from semedge.core.errors import UserError
from semedge.core.frames import SAMPLE_RATE, SAMPLES_PER_ENC_FRAME
MAX_SECONDS = 30.0  # Whisper's window: the default for unsplit features (the identity codec)
# A trained JSC codec learned short utterances (4-20 words, under ~9 s): on a 56.6 s recording at
# 10 dB AWGN (whisper-base) the k=40 codec read WER 1.79 with 30 s segments (a repetition loop),
# 0.77 with 10 s, 0.54 with 6 s; the retrained k=64 default 0.92 / 1.02 (loops) / 0.52; unsplit
# features 0.15 (30 s) and 0.20 (10 s). docs/split.md has the table.
CODEC_SECONDS = 6.0
SEARCH_SECONDS = 8.0  # where a cut may go: the last 8 s before a segment reaches MAX_SECONDS
SEARCH_SHARE = 0.3  # ... or the last 30% of a shorter segment
FRAME = SAMPLES_PER_ENC_FRAME  # 320 samples = 20 ms, one Whisper encoder frame
SMOOTH_FRAMES = 15  # 0.3 s: a pause between words, not the gap inside a plosive
TOKENS_PER_SECOND = 8  # decoder budget: about twice the densest speech (~3 words/s, ~1.3 tokens/word)
MIN_NEW_TOKENS, MAX_NEW_TOKENS = 96, 224  # the short-message default; Whisper's own cap per 30 s window


def _check(audio, max_s: float, search_s: float | None) -> tuple[np.ndarray, float]:
    x = np.asarray(audio)
    if x.ndim != 1 or x.size == 0:
        raise UserError(f"audio has shape {x.shape}, expected non-empty 1-D samples", "pass mono 16 kHz audio")
    if not (math.isfinite(max_s) and 1.0 <= max_s <= MAX_SECONDS):
        raise UserError(f"segment length {max_s!r} s is out of range", f"give 1 to {MAX_SECONDS:g} seconds")
    if search_s is None:
        search_s = min(SEARCH_SECONDS, SEARCH_SHARE * max_s)
    if not (math.isfinite(search_s) and 0.0 <= search_s < max_s):
        raise UserError(f"cut search span {search_s!r} s is out of range", f"give 0 to less than the segment length ({max_s:g} s)")
    return x, search_s


def default_segment_s(identity: bool) -> float:
    """Longest segment to send: Whisper's 30 s window for unsplit features, 6 s for a trained codec."""
    return MAX_SECONDS if identity else CODEC_SECONDS


def frame_energy(audio: np.ndarray) -> np.ndarray:
    """Mean power of each 20 ms frame (the last one zero-padded), smoothed over 0.3 s, [n_frames] float64."""
    x = np.asarray(audio, dtype=np.float64)
    n = math.ceil(len(x) / FRAME)
    power = np.mean(np.square(np.pad(x, (0, n * FRAME - len(x)))).reshape(n, FRAME), axis=1)
    kernel = np.ones(SMOOTH_FRAMES) / SMOOTH_FRAMES
    return np.convolve(power, kernel, mode="same")


def _cut(energy: np.ndarray, start: int, max_len: int, search: int) -> int:
    """The sample index of the next cut after `start`: the quietest frame boundary in the search span."""
    hi = (start + max_len) // FRAME  # last frame boundary the segment may reach
    lo = max(start // FRAME + 1, (start + max_len - search) // FRAME)
    if lo >= hi:
        return hi * FRAME if hi * FRAME > start else start + max_len
    span = energy[lo:hi]
    best = lo + len(span) - 1 - int(np.argmin(span[::-1]))  # the latest minimum: the longest segment
    return best * FRAME


def segment_bounds(audio, max_s: float = MAX_SECONDS, search_s: float | None = None) -> list[tuple[int, int]]:
    """[(start, end)] sample ranges of 16 kHz `audio`, each at most `max_s` long, cut at quiet points
    in the last `search_s` seconds (default: 8 s, or 30% of a shorter `max_s`)."""
    x, search_s = _check(audio, max_s, search_s)
    n = len(x)
    max_len = int(max_s * SAMPLE_RATE)
    if n <= max_len:
        return [(0, n)]
    energy = frame_energy(x)
    search = int(search_s * SAMPLE_RATE)
    bounds, start = [], 0
    while n - start > max_len:
        end = _cut(energy, start, max_len, search)
        bounds.append((start, end))
        start = end
    bounds.append((start, n))
    return bounds


def split_audio(audio, max_s: float = MAX_SECONDS, search_s: float | None = None) -> list[np.ndarray]:
    """The segments themselves (views of `audio`)."""
    x = np.asarray(audio)
    return [x[a:b] for a, b in segment_bounds(x, max_s, search_s)]


def new_tokens_for(seconds: float) -> int:
    """Decoder tokens to allow for a segment this long: 96 up to 12 s, growing to 224 at 28 s and beyond."""
    return int(min(MAX_NEW_TOKENS, max(MIN_NEW_TOKENS, math.ceil(TOKENS_PER_SECOND * seconds))))


def join_texts(texts) -> str:
    """One transcript from the segments' transcripts (empty ones skipped)."""
    return " ".join(t.strip() for t in texts if t and t.strip())


def describe(bounds: list[tuple[int, int]]) -> list[dict]:
    """[{"start_s", "end_s"}] for printing and JSON."""
    return [{"start_s": round(a / SAMPLE_RATE, 3), "end_s": round(b / SAMPLE_RATE, 3)} for a, b in bounds]
