"""Accuracy through the link: ONNX device half (ONNX Runtime) -> numpy channel -> PyTorch server half.

    msgs = device_messages(onnx_path, loaded, utts)            # once per device half
    acc = link_accuracy(split.server, msgs, refs, "rayleigh", 5.0)   # per SNR: {"wer", "wer_ci95", ...}

This is the host-side evaluator (it needs torch for the server half); the
compression benchmark and the planner both call it. `AccuracyCache` stores
results in one JSON file keyed by a content hash (`cache_key`) of whatever
determines them (plan, codec, weights, channel, SNR, utterance ids).
Noise is drawn per message from a seed derived from (seed, channel, SNR, message
index), so every device half sees the same channel realisation at a given SNR.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from semedge.core.files import check_cache, write_sealed
from semedge.core.errors import UserError

METRICS_VERSION = 3  # bump when the way accuracy is computed changes (invalidates caches)
# 2: fitted windows; 3: Whisper's English normaliser, 95% intervals and per-utterance word errors


def cache_key(**parts) -> str:
    """sha256 hex of the canonical JSON of `parts` (numbers, strings, lists)."""
    canon = json.dumps({"v": METRICS_VERSION, **parts}, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(canon.encode()).hexdigest()


def _json_default(o):
    if isinstance(o, float) and math.isinf(o):
        return "inf"
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class AccuracyCache:
    """A JSON file of {key: result} with its sums (core.files.seal); reads once, writes atomically
    after each put. A file that does not match its sums is dropped with a warning (measured again);
    one written before sums existed is adopted if it parses."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.data: dict[str, dict] = {}
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        if self.path and check_cache(self.path, "accuracy", adopt_unsealed=True):
            try:
                self.data = json.loads(self.path.read_text())
            except (json.JSONDecodeError, OSError):
                self.data = {}  # an unreadable cache written before sums existed: start again

    def get(self, key: str) -> dict | None:
        r = self.data.get(key)
        if r is None:
            self.misses += 1
        else:
            self.hits += 1
        return r

    def put(self, key: str, value: dict) -> None:
        with self._lock:
            self.data[key] = value
            if self.path:
                write_sealed(self.path, json.dumps(self.data, sort_keys=True, indent=0))


def trim_memory() -> None:
    """Hand freed heap back to the OS (glibc). Many ORT sessions and decodes of varying
    shapes fragment the heap: without this a planner run grew ~350 MB per candidate."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def speech_features(loaded, utts) -> np.ndarray:
    """Log-mel features [N, 80, 3000] float32 of the utterances (the model's feature extractor)."""
    fe = loaded.feature_extractor
    return fe([np.asarray(u.audio, dtype=np.float32) for u in utts], sampling_rate=16000,
              return_tensors="np").input_features.astype(np.float32)


def device_messages(onnx_path, loaded, utts, threads: int = 1, batch: int = 4, sess=None) -> list[np.ndarray]:
    """Run the device half in ONNX Runtime; one [content_frames, k] float32 array per utterance.

    Each utterance runs on its own window (core.frames.window_frames, as the device
    runner does) when the graph takes any frame count; a fixed 3000-frame graph runs in batches.
    """
    from semedge.core.frames import content_frames, window_frames
    from semedge.runtime.profiler import session

    if not loaded.task.supports("link-eval"):
        raise UserError(f"{loaded.source} is a {loaded.kind} model; link evaluation supports speech models",
                        "use a Whisper model (e.g. whisper-base)")
    s = sess or session(onnx_path, threads)
    inp = s.get_inputs()[0]
    fixed = isinstance(inp.shape[-1], int)
    out: list[np.ndarray] = []
    for b in range(0, len(utts), batch):
        chunk = utts[b : b + batch]
        feats = speech_features(loaded, chunk)
        if fixed:
            ys = list(s.run(None, {inp.name: feats})[0])
        else:
            ys = [s.run(None, {inp.name: np.ascontiguousarray(feats[i : i + 1, :, : window_frames(len(u.audio))])})[0][0]
                  for i, u in enumerate(chunk)]
        for y, u in zip(ys, chunk):
            out.append(np.ascontiguousarray(y[: content_frames(len(u.audio))], dtype=np.float32))
    return out


def eval_utterances(split: str, n: int | None, voices="mix", data=None) -> list:
    """The utterances accuracy is measured on: the first n of the user's audiofolder `data`
    (all when n is None), or of the built-in `split` spoken by `voices` (tasks.speech families)."""
    if data is not None:
        from semedge.semcom.tasks.audiofolder import load_audiofolder

        utts = load_audiofolder(data)
        return utts if n is None else utts[:n]
    from semedge.semcom.tasks.speech import load_split

    return load_split(split, n, progress=False, family=tuple(voices.split("+")) if "+" in voices else voices)


def segmented(utts, max_s: float) -> tuple[list, list[list[int]] | None]:
    """Recordings longer than max_s cut at pauses (core.segment): (pieces, groups), where
    groups[i] lists the pieces of utts[i]; (utts, None) when none is that long."""
    import dataclasses

    from semedge.core.frames import SAMPLE_RATE
    from semedge.core.segment import split_audio

    if all(len(u.audio) <= max_s * SAMPLE_RATE for u in utts):
        return list(utts), None
    pieces, groups = [], []
    for u in utts:
        parts = split_audio(u.audio, max_s)
        groups.append(list(range(len(pieces), len(pieces) + len(parts))))
        pieces += [dataclasses.replace(u, id=f"{u.id}#{j}", audio=a, text="") for j, a in enumerate(parts)]
    return pieces, groups


def _noise_seed(seed: int, channel: str, snr_db: float, i: int) -> int:
    h = hashlib.sha256(f"{seed}|{channel}|{snr_db:g}|{i}".encode()).digest()
    return int.from_bytes(h[:8], "little")


def receive(messages: Sequence[np.ndarray], channel: str, snr_db: float, seed: int = 0) -> list[np.ndarray]:
    """Each message through runtime.link.transmit (numpy), with a per-message seed."""
    from semedge.runtime.link import transmit

    out = []
    for i, m in enumerate(messages):
        rng = np.random.default_rng(_noise_seed(seed, channel, float(snr_db), i))
        out.append(np.asarray(transmit(m[None], channel, snr_db, rng)[0], dtype=np.float32))
    return out


def link_accuracy(server, messages: Sequence[np.ndarray], refs: Sequence[str], channel: str, snr_db: float,
                  seed: int = 0, batch: int = 8, similarity: bool = False, max_new_tokens: int | None = None,
                  groups: list[list[int]] | None = None) -> dict:
    """WER, BLEU (and sentence similarity) of the server's transcripts of the received messages.

    Beside each figure its bootstrap 95% interval (`wer_ci95` ..., semcom.stats), the
    normaliser's name, and `word_errors`: per-utterance [errors, reference words], kept
    for paired comparisons between device halves (same utterances, same noise).
    max_new_tokens defaults to 2 tokens per reference word + 8 (at most 96): a noisy
    message can make the decoder run on, and a transcript that long is wrong anyway.
    With `groups` (segmented recordings), messages are pieces: each reference is scored
    against its pieces' transcripts joined, each piece allowed core.segment.new_tokens_for."""
    import torch

    from semedge.semcom.metrics import score

    rx = receive(messages, channel, snr_db, seed)
    refs = list(refs)
    if max_new_tokens is None and groups is not None:
        from semedge.core.frames import SAMPLES_PER_ENC_FRAME, SAMPLE_RATE
        from semedge.core.segment import new_tokens_for

        max_new_tokens = new_tokens_for(max((len(m) for m in messages), default=0) * SAMPLES_PER_ENC_FRAME / SAMPLE_RATE)
    elif max_new_tokens is None:
        max_new_tokens = min(96, 8 + 2 * max((len(r.split()) for r in refs), default=0))
    hyps: list[str] = []
    with torch.no_grad():
        for b in range(0, len(rx), batch):
            hyps += server.transcribe([torch.from_numpy(x) for x in rx[b : b + batch]], max_new_tokens=max_new_tokens)
    if groups is not None:
        from semedge.core.segment import join_texts

        hyps = [join_texts(hyps[j] for j in g) for g in groups]
    s = score(refs, hyps, with_similarity=similarity, keep_errors=True)
    return {"wer": round(float(s["wer"]), 5), "bleu": round(float(s["bleu"]), 3),
            "similarity": round(float(s["similarity"]), 5) if similarity else None, "n": len(refs),
            "wer_ci95": s["wer_ci95"], "bleu_ci95": s["bleu_ci95"], "similarity_ci95": s["similarity_ci95"],
            "normalizer": s["normalizer"], "word_errors": s["word_errors"]}


def evaluate_onnx(onnx_path, split, utts, channel: str, snrs: Sequence[float], *, threads: int = 1,
                  cache: AccuracyCache | None = None, key_parts: dict | None = None, messages=None,
                  similarity: bool = False, seed: int = 0, segment_s: float | None = None) -> dict[float, dict]:
    """Accuracy per SNR of the ONNX device half `onnx_path` with `split`'s server half.

    With `cache` and `key_parts` (what identifies the device half: plan hash, codec hash,
    weight hash ...), results are looked up and stored by content hash; the device half
    only runs when some SNR is missing. `messages` may pass the device outputs, or a
    function returning them (called only on a cache miss). With `segment_s`, recordings
    longer than it are sent as segments and scored on the joined transcript (`segmented`);
    `messages` then holds the pieces' outputs.
    """
    ids = [u.id for u in utts]
    pieces, groups = segmented(utts, segment_s) if segment_s else (utts, None)
    if groups is not None:
        key_parts = {**(key_parts or {}), "segment_s": float(segment_s)} if key_parts is not None else None
    out: dict[float, dict] = {}
    todo = []
    for snr in snrs:
        key = cache_key(**(key_parts or {}), channel=channel, snr=float(snr), ids=ids, seed=seed,
                        similarity=similarity) if cache is not None and key_parts is not None else None
        hit = cache.get(key) if key else None
        if hit is not None:
            out[float(snr)] = dict(hit, cached=True)
        else:
            todo.append((float(snr), key))
    if todo:
        if messages is None:
            messages = device_messages(onnx_path, split.loaded, pieces, threads)
        elif callable(messages):
            messages = messages()
        refs = [u.text for u in utts]
        for snr, key in todo:
            r = link_accuracy(split.server, messages, refs, channel, snr, seed=seed, similarity=similarity, groups=groups)
            if key:
                cache.put(key, r)
            out[snr] = dict(r, cached=False)
    return out
