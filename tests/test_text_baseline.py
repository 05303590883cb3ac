"""The text task's conventional baseline: zstd (+ train-split dictionary) -> 5G LDPC -> QAM."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("zstandard")
pytest.importorskip("sionna")

from semedge.core.errors import UserError  # noqa: E402
from semedge.semcom import text_baseline as tb  # noqa: E402

TEXTS = ["the radio link carries only the symbols", "a short one",
         "semantic communication sends meaning rather than bits over a noisy channel", "hello",
         "naïve café, 東京 and ünïcödé survive the round trip"]
# Sentences like the corpus's, to train a small dictionary fast.
TRAIN = [f"the {a} {b} the {c} over the channel" for a in ("boy", "girl", "radio", "model", "server")
         for b in ("threw", "sent", "carried", "decoded") for c in ("ball", "message", "symbols", "answer")] * 3


@pytest.fixture(scope="module")
def small_dict() -> bytes:
    return tb.train_dictionary(TRAIN, size=1024)


@pytest.mark.parametrize("dictionary", [True, False])
def test_error_free_round_trip_equals_input(small_dict, dictionary):
    cfg = tb.TextLinkConfig(dictionary=dictionary)
    for channel, snr in (("none", 0.0), ("awgn", math.inf)):
        hyps, stats = tb.send_texts(TEXTS, cfg, channel, snr, dict_data=small_dict)
        assert hyps == TEXTS
        assert stats["decoded"] == stats["intact"] == 1.0 and stats["ber"] == 0.0


def test_dictionary_shrinks_in_domain_text(small_dict):
    s = "the boy sent the message over the channel"
    assert len(tb.compress_text(s, small_dict)) < len(tb.compress_text(s)) <= len(s.encode()) + 8


def test_channel_uses_match_a_hand_count():
    qpsk = tb.TextLinkConfig(block_bits=256, rate=0.5, bits_per_symbol=2)
    # 256 info bits / rate 1/2 = 512 code bits = 256 QPSK symbols per codeword
    assert [qpsk.channel_uses(n) for n in (0, 1, 32, 33, 64, 65)] == [256, 256, 256, 512, 512, 768]
    qam16 = tb.TextLinkConfig(block_bits=256, rate=0.75, bits_per_symbol=4)
    # round(256 / 0.75) = 341 code bits, padded to 344 (a multiple of 4) = 86 16-QAM symbols per codeword
    assert [qam16.channel_uses(n) for n in (1, 32, 33, 100)] == [86, 86, 172, 344]
    payloads = tb.encode_texts(TEXTS, tb.TextLinkConfig(dictionary=False))
    _, stats = tb.send_texts(TEXTS, tb.TextLinkConfig(dictionary=False), "awgn", 20.0, payloads=payloads)
    assert stats["payload_bytes"] == [len(p) for p in payloads]
    assert stats["channel_uses"] == [256 * -(-len(p) // 32) for p in payloads]
    got = tb.through_link(payloads, tb.TextLinkConfig(dictionary=False), "rayleigh", 20.0)
    assert [len(g) for g in got] == [32 * -(-len(p) // 32) for p in payloads]  # whole codewords came back


def test_low_snr_is_the_cliff_high_snr_is_exact(small_dict):
    texts = TEXTS * 6
    cfg = tb.TextLinkConfig()
    low, s_low = tb.send_texts(texts, cfg, "awgn", -5.0, seed=1, dict_data=small_dict)
    assert s_low["ber"] > 0.1 and s_low["intact"] == 0.0
    assert sum(h == "" for h in low) >= len(texts) // 2  # most streams do not decompress: empty text
    high, s_high = tb.send_texts(texts, cfg, "awgn", 15.0, seed=1, dict_data=small_dict)
    assert high == texts and s_high["ber"] == 0.0
    assert tb.exact_match(texts, high) == [1.0] * len(texts)


def test_corrupt_stream_yields_empty_string(small_dict):
    good = tb.compress_text("the boy threw the ball", small_dict)
    assert tb.decompress_text(good + bytes(40), small_dict) == "the boy threw the ball"  # padding ignored
    assert tb.receive_text(good[:-3], small_dict) is None  # truncated frame
    assert tb.decompress_text(bytes([0xFF] * 40), small_dict) == ""
    assert tb.decompress_text(b"", small_dict) == ""


def test_dictionary_never_sees_test_sentences(monkeypatch):
    from semedge.semcom.metrics import normalize
    from semedge.semcom.tasks import corpus

    asked, seen = [], []
    real = corpus.sentences

    def spy(split):
        asked.append(split)
        return real(split)

    monkeypatch.setattr(corpus, "sentences", spy)
    monkeypatch.setattr(tb, "train_dictionary", lambda samples, size, level: seen.extend(samples) or b"d")
    tb.corpus_dictionary.cache_clear()
    try:
        assert tb.corpus_dictionary() == b"d"
    finally:
        tb.corpus_dictionary.cache_clear()
    assert asked == ["train"] and seen
    held_out = {normalize(s) for s in real("test")} | {normalize(s) for s in real("val")}
    assert not held_out & {normalize(s) for s in seen}
    with pytest.raises(UserError, match="train"):
        tb.dictionary_samples("test")


def test_bad_config_is_a_clear_error():
    with pytest.raises(UserError, match="block_bits"):
        tb.TextLinkConfig(block_bits=100)
    with pytest.raises(UserError, match="bits_per_symbol"):
        tb.TextLinkConfig(bits_per_symbol=3)
    with pytest.raises(UserError, match="dictionary"):
        tb.encode_texts(TEXTS, tb.TextLinkConfig(dictionary=True), None)
