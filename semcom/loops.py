"""Runaway transcripts: a decoder stuck repeating itself, cut back to its first pass.

Whisper's decoding flags a transcript whose gzip compression ratio exceeds 2.4 (a loop:
"with the sinking heart with the sinking heart with ...") and decodes it again at a higher
temperature. Forbidding repeated n-grams in a greedy retry does not stop the loop (the
decoder varies case or spelling and goes on), so here a flagged transcript is cut where
a phrase of NGRAM words (case and punctuation ignored) first comes back. Deterministic and
free: no second decode. Every Whisper receiver in semedge (the server's decoder on both
backends, the conventional links' Whisper on decoded audio) applies it, like for like.
"""

from __future__ import annotations

import re
import zlib

COMPRESSION_RATIO = 2.4  # Whisper's threshold (openai/whisper, transcribe.py)
NGRAM = 4  # words: long enough that a real sentence rarely repeats one, short enough to catch a looped phrase


def runaway(text: str) -> bool:
    """True when the text compresses like a loop (gzip ratio > COMPRESSION_RATIO)."""
    b = text.strip().encode()
    return len(b) > 0 and len(b) / len(zlib.compress(b)) > COMPRESSION_RATIO


def cut_loop(text: str) -> str:
    """A runaway text up to where an NGRAM-word phrase first repeats; other texts unchanged."""
    if not runaway(text):
        return text
    words = text.split()
    keys = [re.sub(r"[^\w']", "", w.lower()) for w in words]
    seen = set()
    for j in range(len(words) - NGRAM + 1):
        g = tuple(keys[j : j + NGRAM])
        if g in seen:
            return " ".join(words[:j])
        seen.add(g)
    return text
