import numpy as np
import pytest

from semedge.semcom import stats
from semedge.core.errors import UserError


def _pairs(n, seed=0, p=0.2):
    rng = np.random.default_rng(seed)
    words = rng.integers(4, 15, size=n)
    return [(int(rng.binomial(w, p)), int(w)) for w in words]


def test_wer_ci_contains_point_and_narrows_with_data():
    small, big = stats.wer_ci(_pairs(30)), stats.wer_ci(_pairs(600))
    for d in (small, big):
        lo, hi = d["ci95"]
        assert lo <= d["value"] <= hi
        assert d["value"] == pytest.approx(stats.corpus_wer(_pairs(d["n"])))
    assert big["ci95"][1] - big["ci95"][0] < small["ci95"][1] - small["ci95"][0]
    assert small["n"] == 30


def test_corpus_wer_pools_words():
    assert stats.corpus_wer([(1, 5), (0, 10)]) == pytest.approx(1 / 15)
    assert stats.corpus_wer([(2, 0)]) == 2.0  # empty references: denominator at least 1


def test_deterministic():
    a, b = stats.wer_ci(_pairs(50), seed=3), stats.wer_ci(_pairs(50), seed=3)
    assert a == b
    assert stats.wer_ci(_pairs(50), seed=4) != a
    assert stats.mean_ci([0.1, 0.5, 0.9], seed=1) == stats.mean_ci([0.1, 0.5, 0.9], seed=1)


def test_mean_ci():
    d = stats.mean_ci([1.0] * 20 + [0.0] * 20)
    assert d["value"] == 0.5 and d["ci95"][0] < 0.5 < d["ci95"][1] and d["n"] == 40
    assert stats.mean_ci([0.7] * 5)["ci95"] == [pytest.approx(0.7), pytest.approx(0.7)]


def test_bleu_ci_matches_sacrebleu():
    import sacrebleu

    refs = ["the boy threw the ball", "a visit to a strange place will bring fresh work", "the cat sat on the mat"] * 4
    hyps = ["the boy threw a ball", "a visit to a strange place brings work", "the cat sat on a mat"] * 4
    d = stats.bleu_ci(refs, hyps, n_resamples=200)
    assert d["value"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert d["ci95"][0] <= d["value"] <= d["ci95"][1] and d["n"] == 12


def test_paired_detects_a_clear_difference_and_not_a_null_one():
    a = _pairs(200, seed=1, p=0.1)
    worse = [(min(w, e + 2), w) for e, w in a]  # B makes two more errors per utterance
    d = stats.paired_wer_diff(a, worse)
    assert d["worse"] and d["delta"] > 0 and d["ci95"][0] > 0 and not stats.not_worse(d)
    null = stats.paired_wer_diff(a, a)
    assert null["delta"] == 0.0 and not null["worse"] and stats.not_worse(null)
    # B draws its errors at A's rate, independently: no significant difference.
    rng = np.random.default_rng(7)
    same_rate = [(int(rng.binomial(w, 0.1)), w) for _, w in a]
    d0 = stats.paired_wer_diff(a, same_rate)
    assert not d0["worse"] and d0["ci95"][0] < 0 < d0["ci95"][1]
    better = stats.paired_wer_diff(worse, a)
    assert not better["worse"] and better["ci95"][1] < 0


def test_paired_mean_direction():
    a = [0.9] * 50 + [0.8] * 50
    b = [x - 0.1 for x in a]
    assert stats.paired_mean_diff(a, b)["worse"]  # similarity dropped
    assert not stats.paired_mean_diff(a, b, higher_is_better=False)["worse"]


def test_bad_inputs_and_format():
    with pytest.raises(UserError, match="same utterances"):
        stats.paired_wer_diff([(1, 2)], [(1, 2), (0, 3)])
    with pytest.raises(UserError, match="no utterances"):
        stats.wer_ci([])
    assert stats.fmt_ci({"value": 0.3761, "ci95": [0.3512, 0.4024], "n": 9}) == "0.376 [0.351, 0.402]"
    assert stats.fmt_ci({"delta": 0.02, "ci95": [-0.01, 0.05], "n": 9, "worse": False}, digits=1, scale=100) \
        == "2.0 [-1.0, 5.0]"
    assert stats.fmt_ci(None) == "-"
