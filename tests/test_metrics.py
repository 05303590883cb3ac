import pytest

from semedge.semcom import metrics
from semedge.core.errors import UserError

REFS = ["the boy threw the ball", "a visit to a strange place will bring fresh work"]


def test_normalize():
    # The basic normaliser; the data splits hash it, so this must not change.
    assert metrics.normalize("  Don't STOP—the long-forgotten Ball, ok?! ") == "dont stop the long forgotten ball ok"
    assert metrics.normalize("") == ""


def test_wer_known_values():
    assert metrics.wer(REFS, REFS) == 0.0
    # Case and punctuation do not count.
    assert metrics.wer(["The boy threw the ball."], ["the boy, threw the ball"]) == 0.0
    # 1 substitution in 5 words.
    assert metrics.wer(["the boy threw the ball"], ["the boy threw a ball"]) == pytest.approx(0.2)
    # Corpus WER pools words: (1 + 0) / (5 + 10).
    assert metrics.wer(REFS, ["the boy threw a ball", REFS[1]]) == pytest.approx(1 / 15)
    assert metrics.wer(["a b"], [""]) == 1.0


def test_wer_empty_reference():
    assert metrics.wer([""], [""]) == 0.0
    assert metrics.wer(["", "a b"], ["x", "a b"]) == pytest.approx(0.5)
    assert metrics.wer_per_utt(["", "a b c d"], ["", "a b"]) == [0.0, 0.5]


def test_bad_inputs():
    with pytest.raises(UserError, match="hyps"):
        metrics.wer(["a"], ["a", "b"])
    with pytest.raises(UserError, match="empty"):
        metrics.bleu([], [])


def test_bleu():
    assert metrics.bleu(REFS, REFS) == pytest.approx(100.0)
    b = metrics.bleu(REFS, ["the boy threw a ball", "the cat sat on the mat"])
    assert 0.0 <= b < 50.0


def test_similarity_and_score():
    same = metrics.similarity(REFS, REFS)
    assert same == pytest.approx(1.0, abs=1e-4)
    close, far = metrics.similarity_per_utt(
        [REFS[0], REFS[0]], ["the boy tossed the ball", "interest rates rose sharply in march"]
    )
    assert close > 0.7 > far
    s = metrics.score(REFS, ["the boy threw a ball", "the cat sat on the mat"])
    assert set(s) == {"wer", "bleu", "similarity", "wer_ci95", "bleu_ci95", "similarity_ci95", "n", "normalizer"}
    assert s["wer"] > 0.3 and s["bleu"] < 100 and s["similarity"] < 0.9
    assert s["n"] == 2 and s["normalizer"] == "whisper-english"
    for m in ("wer", "bleu", "similarity"):
        lo, hi = s[f"{m}_ci95"]["ci95"]
        assert s[f"{m}_ci95"]["value"] == s[m] and lo <= s[m] + 1e-9 and s[m] <= hi + 1e-9


def test_whisper_normalizer_is_default():
    # Whisper's English normaliser: titles, British spelling, spelled numbers, contractions, fillers.
    assert metrics.wer(["Mr. Smith painted the colour red"], ["mister smith painted the color red"]) == 0.0
    assert metrics.wer(["twenty one apples"], ["21 apples"]) == 0.0
    assert metrics.wer(["I won't go, uh, today"], ["i will not go today"]) == 0.0
    # The basic normaliser counts them.
    assert metrics.wer(["Mr. Smith painted the colour red"], ["mister smith painted the color red"],
                       normalizer="basic") == pytest.approx(2 / 6)
    assert metrics.normalizer_name() == "whisper-english" and metrics.normalizer_name("basic") == "basic"
    with pytest.raises(UserError, match="normalizer"):
        metrics.wer(["a"], ["a"], normalizer="nope")


def test_word_errors_per_utt():
    pairs = metrics.word_errors_per_utt(REFS, ["the boy threw a ball", REFS[1]])
    assert pairs == [(1, 5), (0, 10)]
    assert metrics.wer(REFS, ["the boy threw a ball", REFS[1]]) == pytest.approx(1 / 15)
