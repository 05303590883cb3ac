"""Importance-aware rate: a per-frame symbol count k_t for a nested codec, at a fixed budget.

Device side, numpy only (no decoder, no reference text): the score is computed from the JSC
code the device has just produced, so it costs one pass over [T, k] numbers.

Conventions
- code: [T, k], one message's JSC encoder output (any overall scale: a per-message scale
  cancels). A nested codec (`semedge train --rate-min`) decodes the first k' symbols of a frame
  with the rest zero, for any k' on its ladder (`ladder`: rate_min, 2 rate_min, ..., k).
- importance of a frame's next ladder step = what sending those symbols buys through AWGN at
  the SNR: a symbol of power e (the code scaled as the uniform policy would send it, unit mean
  power) sent with noise variance s2 = 10**(-snr/10) removes e**2 / (e + s2) of the squared
  error in code space that zero-filling it leaves (linear MMSE). On a clean channel that is the
  frame's energy above k'; at low SNR weak symbols count for less than their energy.
- layout: k_t per frame, on the ladder. Sent: x[t, :k_t] of every frame, in frame order
  (sum k_t real symbols), power-normalised together to unit mean power ("message") or each
  frame's kept symbols to unit power ("token"); the receiver zero-fills x[t, k_t:].
- signalling: each frame's ladder index, ceil(log2 len(ladder)) bits, sent with BPSK (one
  coded bit per real symbol) under a rate-`code_rate` code (default 1/4: 4 real symbols per
  bit, comfortably decodable at 0 dB Es/N0, where BPSK carries about 0.49 bit per real symbol).
  Counted as channel uses and charged to the budget; modelled as received without error.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from semedge.core.errors import UserError

CODE_RATE = 0.25  # the signalling's channel code (BPSK, one coded bit per real symbol)


def ladder(k: int, k_min: int, step: int | None = None) -> tuple[int, ...]:
    """A nested codec's k' values: k_min, k_min + step, ..., k (step defaults to k_min)."""
    step = k_min if step is None else step
    if not 1 <= k_min <= k or step < 1:
        raise UserError(f"no ladder from k_min={k_min} to k={k} by {step}", "give 1 <= k_min <= k and a positive step")
    out = list(range(k_min, k, step)) + [k]
    return tuple(out)


def header_bits(n_frames: int, n_levels: int) -> int:
    """Bits that say each frame's ladder index (none when there is one level)."""
    return n_frames * math.ceil(math.log2(n_levels)) if n_levels > 1 else 0


def header_symbols(n_frames: int, n_levels: int, code_rate: float = CODE_RATE) -> int:
    """Real channel symbols of the layout header: BPSK, one coded bit per real symbol, rate `code_rate`."""
    if not 0 < code_rate <= 1:
        raise UserError(f"code_rate={code_rate} is not a code rate", "give 0 < code_rate <= 1, e.g. 0.25")
    return math.ceil(header_bits(n_frames, n_levels) / code_rate)


def symbol_gain(code: np.ndarray, k_ref: int, snr_db: float) -> np.ndarray:
    """[T, k] squared error each symbol removes when sent (see the module docstring), the code
    scaled to unit mean power over its first k_ref symbols (as the uniform policy sends it)."""
    x2 = np.square(np.asarray(code, dtype=np.float64))
    e = x2 / max(x2[:, :k_ref].mean(), 1e-30)
    if not math.isfinite(snr_db):
        return e
    s2 = 10.0 ** (-float(snr_db) / 10.0)
    return e * e / (e + s2)


def step_gains(code: np.ndarray, levels: tuple[int, ...], k_ref: int, snr_db: float) -> np.ndarray:
    """[T, L-1]: what each frame gains by going from levels[j] to levels[j+1] symbols."""
    cum = np.concatenate([np.zeros((code.shape[0], 1)), np.cumsum(symbol_gain(code, k_ref, snr_db), axis=1)], axis=1)
    at = cum[:, list(levels)]
    return np.diff(at, axis=1)


def frame_importance(code: np.ndarray, k_min: int, snr_db: float = math.inf, k_ref: int | None = None) -> np.ndarray:
    """[T]: each frame's gain from all its symbols above k_min (a score to look at, not the allocator's input)."""
    g = symbol_gain(code, k_ref or k_min, snr_db)
    return g[:, k_min:].sum(axis=1)


@dataclass(frozen=True)
class Layout:
    k: np.ndarray  # [T] symbols sent per frame
    header: int  # real symbols of signalling (0: uniform, nothing signalled)

    @property
    def symbols(self) -> int:
        """Real channel symbols of the message: payload + header."""
        return int(self.k.sum()) + self.header

    @property
    def uniform(self) -> bool:
        return self.header == 0


def allocate(gains: np.ndarray, levels: tuple[int, ...], spare: int) -> np.ndarray:
    """Greedy: every frame starts at levels[0]; repeatedly give the next ladder step to the frame
    whose step gains most per symbol, while `spare` symbols last. gains: [T, L-1] (step_gains)."""
    n = gains.shape[0]
    idx = np.zeros(n, dtype=np.int64)  # each frame's ladder index
    cost = np.diff(levels)
    heap = [(-gains[t, 0] / cost[0], t) for t in range(n)] if len(levels) > 1 else []
    heapq.heapify(heap)
    while heap:
        _, t = heapq.heappop(heap)
        j = idx[t]
        if cost[j] > spare:
            continue  # this step does not fit; a cheaper one of another frame may
        spare -= cost[j]
        idx[t] = j + 1
        if j + 1 < len(cost):
            heapq.heappush(heap, (-gains[t, j + 1] / cost[j + 1], t))
    return np.asarray(levels)[idx]


@dataclass(frozen=True)
class ImportanceRate:
    """The policy: a per-frame layout on `levels` spending at most what a uniform `k_budget` per frame would."""

    levels: tuple[int, ...]
    k_budget: int
    code_rate: float = CODE_RATE

    def __post_init__(self):
        lv = tuple(int(v) for v in self.levels)
        if not lv or list(lv) != sorted(set(lv)) or lv[0] < 1:
            raise UserError(f"ladder {lv} is not increasing positive symbol counts", "e.g. levels=(128, 256, 384, 512)")
        if not lv[0] <= self.k_budget <= lv[-1]:
            raise UserError(f"budget k={self.k_budget} per frame is outside the codec's {lv[0]}..{lv[-1]}",
                            f"give a budget between {lv[0]} and {lv[-1]}")
        object.__setattr__(self, "levels", lv)

    def layout(self, code: np.ndarray, snr_db: float) -> Layout:
        """The layout for one message's code [T, k]; uniform k_budget when no per-frame layout fits
        (the budget at the top of the ladder, or too close to its floor to pay the header)."""
        n = code.shape[0]
        if code.shape[1] != self.levels[-1]:
            raise UserError(f"code has {code.shape[1]} symbols per frame, the ladder ends at {self.levels[-1]}",
                            "build the ladder from this codec's k")
        spare = n * self.k_budget - header_symbols(n, len(self.levels), self.code_rate) - n * self.levels[0]
        if self.k_budget >= self.levels[-1] or spare < 0:
            return Layout(np.full(n, self.k_budget, dtype=np.int64), 0)
        gains = step_gains(code, self.levels, self.k_budget, snr_db)
        k = allocate(gains, self.levels, spare)
        return Layout(k, header_symbols(n, len(self.levels), self.code_rate))


def pack(code: np.ndarray, k: np.ndarray) -> np.ndarray:
    """The sent stream: x[t, :k_t] of every frame, in frame order ([sum k_t])."""
    return np.concatenate([code[t, : int(kt)] for t, kt in enumerate(k)])


def unpack(stream: np.ndarray, k: np.ndarray, width: int) -> np.ndarray:
    """The receiver's [T, width] frames from the stream, zero above each frame's k_t."""
    out = np.zeros((len(k), width), dtype=stream.dtype)
    ends = np.cumsum(k)
    if len(stream) != (ends[-1] if len(k) else 0):
        raise UserError(f"stream has {len(stream)} symbols, the layout says {int(ends[-1]) if len(k) else 0}",
                        "send the stream of this layout")
    for t, (kt, end) in enumerate(zip(k, ends)):
        out[t, : int(kt)] = stream[end - kt : end]
    return out


def normalize_stream(code: np.ndarray, k: np.ndarray, per: str = "message", eps: float = 1e-8) -> np.ndarray:
    """pack(code, k) at unit mean power: one scale for the message, or per frame (per="token")."""
    if per == "message":
        s = pack(code, k)
        return s / np.sqrt(np.mean(np.square(s)) + eps)
    return np.concatenate([code[t, :kt] / np.sqrt(np.mean(np.square(code[t, :kt])) + eps) for t, kt in enumerate(k)])
