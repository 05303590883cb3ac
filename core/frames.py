"""Whisper's frame arithmetic: sample rate, mel and encoder frames, the "fit" window.

Declared once here; the log-mel front end (runtime/features.py), the split model
(semcom) and the cost model read these. numpy only.
"""

from __future__ import annotations

import math

import numpy as np

from semedge.core.errors import UserError

SAMPLE_RATE = 16000
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480000
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames
ENC_FRAMES = N_FRAMES // 2  # 1500 encoder frames (conv stride 2)
SAMPLES_PER_ENC_FRAME = 2 * HOP_LENGTH  # 320 samples = 20 ms
FIT_MARGIN = 40  # mel frames (0.4 s) the "fit" window keeps past the utterance's end
WINDOWS = ("fit", "full")


def content_frames(n_samples: int) -> int:
    """Encoder frames (20 ms each) that cover `n_samples` of audio, at most 1500."""
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 0:
        raise UserError(f"n_samples must be a non-negative int, got {n_samples!r}", "pass len(audio)")
    return min(ENC_FRAMES, math.ceil(int(n_samples) / SAMPLES_PER_ENC_FRAME))


def window_frames(n_samples: int, window: str = "fit") -> int:
    """Mel frames the device encoder runs on: "full" = the 30 s window (3000); "fit" = the
    utterance plus FIT_MARGIN, even, at most 3000 (the encoder's cost grows with it)."""
    if window == "full":
        return N_FRAMES
    if window != "fit":
        raise UserError(f"window {window!r} is unknown", "use fit or full")
    return min(N_FRAMES, 2 * content_frames(n_samples) + FIT_MARGIN)
