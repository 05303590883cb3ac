"""The conventional link's source codecs (Codec 2, Opus in Ogg) and what its receiver does with bad bits."""

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from semedge.semcom.tasks.registry import get_task
from semedge.semcom import baseline as B
from semedge.core.errors import UserError


def _speech(seconds: float = 1.5) -> np.ndarray:
    """A short utterance: espeak-ng when installed, else a voiced, syllable-rate modulated harmonic signal."""
    if shutil.which("espeak-ng"):
        from semedge.semcom.tasks.speech import synthesize

        return synthesize("the quick brown fox jumps over the lazy dog")
    t = np.arange(int(seconds * B.SAMPLE_RATE)) / B.SAMPLE_RATE
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / B.SAMPLE_RATE
    x = sum(np.sin(h * phase) / h for h in range(1, 12)) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)) ** 2
    return (0.2 * x / np.abs(x).max()).astype(np.float32)


@pytest.fixture(scope="module")
def utterance():
    return _speech()


@pytest.mark.parametrize("rate", [6000, 8000, 16000])
def test_opus_round_trip_at_its_bit_rate(utterance, rate):
    c = B.source_codec("opus", str(rate))
    data = c.encode(utterance)
    out = c.decode(data)
    assert out.dtype == np.float32 and abs(len(out) - len(utterance)) <= 960  # libsndfile trims pre-skip and padding
    assert np.abs(out).max() > 0.01
    seconds = len(utterance) / B.SAMPLE_RATE
    payload = 8 * (len(data) - c.overhead_bytes(data)) / seconds  # Opus packets alone, b/s
    assert 0.5 * rate < payload < 1.25 * rate
    total = 8 * len(data) / seconds  # what the link sends: the whole file
    assert total > payload and 8 * c.overhead_bytes(data) < 0.2 * 8 * len(data) + 1200


def test_opus_file_is_compact_deterministic_and_valid(utterance):
    c = B.source_codec("opus", "8k")
    a, b = c.encode(utterance), c.encode(utterance)
    assert a == b  # fixed serial number: the same audio gives the same bits
    pages = B.ogg_pages(a)
    assert pages[-1].end == len(a)
    body = a[pages[1].offset + pages[1].header_len : pages[1].end]
    assert body.startswith(b"OpusTags") and pages[1].body_len < 64  # no zero padding
    for p in pages:  # every page's CRC is right (libogg would drop it otherwise)
        pg = bytearray(a[p.offset : p.end])
        crc = int.from_bytes(pg[22:26], "little")
        pg[22:26] = b"\0\0\0\0"
        assert B.ogg_crc(bytes(pg)) == crc


def test_bit_count_is_the_file_size(utterance):
    cfg = B.BaselineConfig(codec="opus", mode="8000")
    data = cfg.source.encode(utterance)
    bits = B.bytes_to_bits(data)
    assert len(bits) == 8 * len(data)
    assert B.bits_to_bytes(bits) == data
    assert cfg.channel_uses(len(bits)) == -(-len(bits) // 1024) * 2048 // 2


def test_error_free_link_gives_the_decoded_audio(utterance):
    pytest.importorskip("sionna.phy")
    cfg = B.BaselineConfig(codec="opus", mode="8k")
    data = cfg.source.encode(utterance)
    bits = B.bytes_to_bits(data)
    g = torch.Generator().manual_seed(0)
    for channel, snr in (("none", float("inf")), ("awgn", 10.0)):
        rx, uses = B.transmit_bits(bits, cfg, channel, snr, g)
        assert np.array_equal(rx, bits) and uses == cfg.channel_uses(len(bits))
        assert np.array_equal(cfg.source.decode(B.bits_to_bytes(rx)), cfg.source.decode(data))


def test_a_bad_page_is_dropped_a_bad_header_loses_everything(utterance):
    c = B.source_codec("opus", "8k")
    data = c.encode(np.concatenate([utterance] * 3))  # several 1 s pages
    whole = c.decode(data)
    pages = B.ogg_pages(data)
    assert len(pages) >= 4
    p = pages[2]  # the first audio page: its CRC fails, libogg drops it
    bad = bytearray(data)
    bad[p.offset + p.header_len + p.body_len // 2] ^= 0x55
    out = c.decode(bytes(bad))
    assert 0 < len(out) < len(whole) - B.SAMPLE_RATE // 2
    for head in pages[:2]:  # OpusHead / OpusTags lost: the file does not decode
        bad = bytearray(data)
        bad[head.offset + head.header_len + 9] ^= 0x01
        assert len(c.decode(bytes(bad))) == 0


def test_corrupted_streams_never_crash(utterance):
    c = B.source_codec("opus", "6000")
    data = c.encode(utterance)
    bits = B.bytes_to_bits(data)
    rng = np.random.default_rng(0)
    streams = [b"", data[: len(data) // 2], data[:30], rng.integers(0, 256, len(data), dtype=np.uint8).tobytes()]
    streams += [B.bits_to_bytes(bits ^ (rng.random(len(bits)) < ber)) for ber in (1e-3, 1e-2, 0.1, 0.5)]
    for s in streams:
        out = c.decode(s)
        assert out.dtype == np.float32 and out.ndim == 1 and np.all(np.isfinite(out))


def test_lost_stream_reads_as_empty_transcript(utterance):
    """A stream that decodes to no audio gives "" without running Whisper."""
    link = B.ConventionalLink(SimpleNamespace(kind="speech", task=get_task("speech")), B.BaselineConfig(codec="opus"))
    link._whisper = lambda audio: pytest.fail("Whisper ran on a lost stream")
    assert link.transcribe_bits([b"not an ogg file", b""]) == ["", ""]
    assert list(link.cache.asr.values()) == [None, None]  # recorded as lost, not as an empty transcript


def test_registry_names_the_allowed_codecs():
    assert set(B.SOURCE_CODECS) == {"codec2", "opus"}
    with pytest.raises(UserError, match="codec2, opus"):
        B.source_codec("mp3")
    with pytest.raises(UserError, match="codec2, opus"):
        B.BaselineConfig(codec="aac")
    with pytest.raises(UserError, match=r"6000, 16000"):
        B.BaselineConfig(codec="opus", mode="32k")
    with pytest.raises(UserError, match="700C"):
        B.BaselineConfig(codec="codec2", mode="8000")


def test_parse_conventional_specs():
    assert B.BaselineConfig.parse("opus:8k").name == "opus-8k+ldpc-0.5+QPSK"
    assert B.BaselineConfig.parse("codec2").mode == "1600"
    cfg = B.BaselineConfig.parse("codec2:700C:0.33:4")
    assert (cfg.mode, cfg.rate, cfg.bits_per_symbol) == ("700C", 0.33, 4)
    for bad in ("", "opus:8k:half", "opus:8k:0.5:2:9"):
        with pytest.raises(UserError, match="CODEC"):
            B.BaselineConfig.parse(bad)
    with pytest.raises(UserError, match="codec2, opus"):
        B.BaselineConfig.parse("1600:0.5:2")


def test_config_defaults_and_names():
    assert B.BaselineConfig().mode == "1600" and B.BaselineConfig().name == "codec2-1600+ldpc-0.5+QPSK"
    cfg = B.BaselineConfig(codec="Opus", mode="12k", rate=0.75, bits_per_symbol=4)
    assert (cfg.codec, cfg.mode, cfg.name) == ("opus", "12000", "opus-12k+ldpc-0.75+16QAM")
    assert B.BaselineConfig(codec="opus").source.bits_per_second == 8000.0
    assert B.source_codec("codec2", "700C").bits_per_second == 700.0
