"""Bootstrap 95% confidence intervals over utterances, and paired comparisons.

Percentile bootstrap: draw `n` utterances with replacement `n_resamples` times
from a seeded numpy Generator (so the same inputs give the same interval), compute
the statistic on each resample, take the 2.5th and 97.5th percentiles.

- corpus WER: keep per-utterance (errors, reference words); each resample's WER is
  sum(errors) / sum(words), exactly as the corpus figure is computed.
- means of per-utterance metrics (similarity, exact match, PSNR): resample the values.
- corpus BLEU: resample sentences' sacrebleu statistics (n-gram matches, lengths) and
  score the summed statistics, as sacrebleu's own paired bootstrap does.
- paired difference B - A on the same utterances: the same resample indices for both
  systems, so the noise the utterances share cancels.

JSON form of an interval: {"value": v, "ci95": [lo, hi], "n": N};
of a paired difference: {"delta": d, "ci95": [lo, hi], "n": N, "worse": bool}.
numpy only; sacrebleu is imported inside `bleu_ci`.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from semedge.core.errors import UserError

N_RESAMPLES = 1000
BLEU_RESAMPLES = 1000  # BLEU resamples summed statistics, so it is as cheap as WER
SEED = 0
_LO, _HI = 2.5, 97.5  # percentiles of a 95% interval


def _indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """(n_resamples, n) utterance indices drawn with replacement."""
    if n < 1:
        raise UserError("no utterances to bootstrap over", "score at least one utterance")
    if n_resamples < 1:
        raise UserError(f"n_resamples must be >= 1, got {n_resamples}", "pass n_resamples=1000")
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def _interval(samples: np.ndarray) -> list[float]:
    lo, hi = np.percentile(np.asarray(samples, dtype=np.float64), [_LO, _HI])
    return [float(lo), float(hi)]


def ci_dict(value: float, ci95: Sequence[float], n: int) -> dict:
    """The JSON form of an interval."""
    return {"value": float(value), "ci95": [float(ci95[0]), float(ci95[1])], "n": int(n)}


def _pairs_array(pairs) -> np.ndarray:
    a = np.asarray(list(pairs), dtype=np.float64).reshape(-1, 2)  # (n, 2): errors, words
    if a.shape[0] == 0:
        raise UserError("no utterances to bootstrap over", "score at least one utterance")
    return a


def _wer_of(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Corpus WER of each resample row; a: (n, 2), idx: (R, n) -> (R,)."""
    return a[idx, 0].sum(axis=1) / np.maximum(a[idx, 1].sum(axis=1), 1.0)


def corpus_wer(pairs) -> float:
    """sum(errors) / sum(words) (denominator at least 1) from (errors, words) pairs."""
    a = _pairs_array(pairs)
    return float(a[:, 0].sum() / max(a[:, 1].sum(), 1.0))


def wer_ci(pairs, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> dict:
    """Corpus WER and its bootstrap 95% interval from per-utterance (errors, words) pairs."""
    a = _pairs_array(pairs)
    idx = _indices(len(a), n_resamples, seed)
    return ci_dict(corpus_wer(a), _interval(_wer_of(a, idx)), len(a))


def mean_ci(values, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> dict:
    """Mean of per-utterance values (similarity, exact match, PSNR) and its 95% interval."""
    v = np.asarray(list(values), dtype=np.float64).reshape(-1)
    idx = _indices(len(v), n_resamples, seed)
    return ci_dict(v.mean(), _interval(v[idx].mean(axis=1)), len(v))


def _bleu_stats(refs: Sequence[str], hyps: Sequence[str]):
    """(metric, per-sentence statistics (n, 2 + 2*4)) from sacrebleu's BLEU (13a, as corpus_bleu)."""
    from sacrebleu.metrics import BLEU

    metric = BLEU()
    return metric, np.asarray(metric._extract_corpus_statistics(list(hyps), [list(refs)]), dtype=np.int64)


def _bleu_of(metric, stats: np.ndarray, idx: np.ndarray) -> np.ndarray:
    sums = np.concatenate([stats[c].sum(axis=1) for c in np.array_split(idx, max(1, len(idx) // 64))])  # (R, s)
    return np.array([min(100.0, metric._compute_score_from_stats(s.tolist()).score) for s in sums])


def bleu_ci(refs: Sequence[str], hyps: Sequence[str], n_resamples: int = BLEU_RESAMPLES, seed: int = SEED) -> dict:
    """sacrebleu corpus BLEU (0-100) of already-normalised texts and its 95% interval over sentences."""
    if len(refs) != len(hyps):
        raise UserError(f"refs has {len(refs)} texts but hyps has {len(hyps)}", "pass one hypothesis per reference")
    metric, stats = _bleu_stats(refs, hyps)
    idx = _indices(len(stats), n_resamples, seed)
    value = min(100.0, metric._compute_score_from_stats(stats.sum(axis=0).tolist()).score)
    return ci_dict(value, _interval(_bleu_of(metric, stats, idx)), len(stats))


def _paired(stat: Callable[[np.ndarray], np.ndarray], n: int, higher_is_better: bool,
            n_resamples: int, seed: int) -> dict:
    """stat(idx) -> (R,) values of B - A; the identity row gives the point estimate."""
    idx = _indices(n, n_resamples, seed)
    delta = float(stat(np.arange(n)[None, :])[0])
    lo, hi = _interval(stat(idx))
    worse = hi < 0 if higher_is_better else lo > 0
    return {"delta": delta, "ci95": [lo, hi], "n": int(n), "worse": bool(worse)}


def paired_wer_diff(pairs_a, pairs_b, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> dict:
    """WER(B) - WER(A) on the same utterances; worse: B's WER is higher at 95% (CI entirely above 0)."""
    a, b = _pairs_array(pairs_a), _pairs_array(pairs_b)
    _same_n(len(a), len(b))
    return _paired(lambda idx: _wer_of(b, idx) - _wer_of(a, idx), len(a), False, n_resamples, seed)


def paired_mean_diff(values_a, values_b, higher_is_better: bool = True,
                     n_resamples: int = N_RESAMPLES, seed: int = SEED) -> dict:
    """mean(B) - mean(A) of per-utterance values; worse: B is below (or, lower-is-better, above) A at 95%."""
    a = np.asarray(list(values_a), dtype=np.float64).reshape(-1)
    b = np.asarray(list(values_b), dtype=np.float64).reshape(-1)
    _same_n(len(a), len(b))
    d = b - a
    return _paired(lambda idx: d[idx].mean(axis=1), len(d), higher_is_better, n_resamples, seed)


def _same_n(na: int, nb: int) -> None:
    if na != nb:
        raise UserError(f"paired comparison needs the same utterances: A has {na}, B has {nb}",
                        "score both systems on the same utterances, in the same order")


def not_worse(paired: dict) -> bool:
    """True when a paired difference does not show B significantly worse than A at 95%."""
    return not paired["worse"]


def fmt_ci(d: dict | None, digits: int = 3, scale: float = 1.0) -> str:
    """'0.376 [0.351, 0.402]' from an interval or paired dict ('-' for None)."""
    if not d:
        return "-"
    v = d.get("value", d.get("delta"))
    if v is None or not math.isfinite(float(v)):
        return "-"
    lo, hi = (scale * float(x) for x in d["ci95"])
    return f"{scale * float(v):.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
