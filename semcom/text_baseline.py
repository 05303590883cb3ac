"""Separate source and channel coding for text: UTF-8 -> zstd -> 5G LDPC -> QAM.

Source: the sentence's UTF-8 bytes compressed by zstd (python `zstandard`, libzstd),
level 19, optionally with a dictionary trained on the TRAIN split of the project's
sentences (`semcom.tasks.corpus`; never val or test). Short sentences compress badly
without context: on the test split (40.5 UTF-8 bytes per sentence) zstd alone emits more
bytes than the text (it falls back to a raw block plus its headers); the dictionary is
the fair setting and the baseline's default. Both ends know the dictionary and the frame
format, so the frame is written magicless with no dictionary id, content size or
checksum: only the frame header byte and the blocks go on the air.

Channel coding: the payload's bits in 5G LDPC codewords of `block_bits` information bits
(the last one zero-padded) -> Gray QAM, over the project's channel with its SNR
convention, ZF with perfect CSI, APP demapping, BP decoding: `semcom.baseline.transmit_bits`,
the link the speech and image baselines use. Channel uses per sentence are counted as
there: ceil(bits / block_bits) codewords x code_bits / bits_per_symbol (complex uses).

Receiver: the decoded bits -> bytes (the zero padding after the frame is ignored by
zstd) -> zstd decompress. A stream that fails to decompress yields the EMPTY string;
one that decompresses to invalid UTF-8 is decoded best-effort (errors="replace": the
bad bytes become U+FFFD, which the metrics' normalisers drop as punctuation).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np

from semedge.core.errors import UserError

LEVEL = 19  # zstd compression level
DICT_SIZE = 65536  # bytes of the trained dictionary (both ends store it)
MAX_TEXT_BYTES = 1 << 16  # decompression window and output cap (a corrupted frame may claim more)
DICT_SPLIT = "train"  # the only split a dictionary may be trained on


def _zstd():
    try:
        import zstandard
    except ImportError as e:
        raise UserError("the zstandard package is not installed (text baseline)", "pip install zstandard") from e
    return zstandard


@dataclass(frozen=True)
class TextLinkConfig:
    bits_per_symbol: int = 2  # 2 QPSK, 4 16-QAM, 6 64-QAM
    rate: float = 0.5  # LDPC code rate
    block_bits: int = 256  # information bits per LDPC codeword
    dictionary: bool = True  # zstd with the dictionary trained on the train split
    level: int = LEVEL
    ldpc_iters: int = 20

    def __post_init__(self):
        if self.block_bits < 32 or self.block_bits % 8:
            raise UserError(f"block_bits={self.block_bits} is unsupported", "use a multiple of 8 >= 32, e.g. 256")
        self.link()  # validates rate and bits_per_symbol

    @property
    def label(self) -> str:
        mod = {2: "QPSK", 4: "16QAM", 6: "64QAM"}[self.bits_per_symbol]
        return f"zstd{'-dict' if self.dictionary else ''}+ldpc-{self.rate:g}+{mod}"

    def link(self):
        """The speech baseline's link settings (semcom.baseline.BaselineConfig)."""
        from semedge.semcom.baseline import BaselineConfig

        return BaselineConfig(rate=self.rate, bits_per_symbol=self.bits_per_symbol, block_bits=self.block_bits,
                              ldpc_iters=self.ldpc_iters)

    def channel_uses(self, n_bytes: int) -> int:
        """Complex channel uses for a payload of n_bytes: every codeword of every byte."""
        return self.link().channel_uses(8 * int(n_bytes))


# ------------------------------------------------------------------ dictionary

def train_dictionary(samples: list[str], size: int = DICT_SIZE, level: int = LEVEL) -> bytes:
    """A zstd dictionary (COVER, libzstd's trainer) from these sentences' UTF-8 bytes."""
    if not samples:
        raise UserError("no sentences to train the zstd dictionary on", "pass the train split's sentences")
    d = _zstd().train_dictionary(int(size), [s.encode("utf-8") for s in samples], level=level)
    return d.as_bytes()


def dictionary_samples(split: str = DICT_SPLIT) -> list[str]:
    """The sentences a dictionary is trained on: the train split, and nothing else."""
    if split != DICT_SPLIT:
        raise UserError(f"a zstd dictionary trained on the {split!r} split would see evaluation sentences",
                        f"train it on {DICT_SPLIT!r} only")
    from semedge.semcom.tasks.corpus import sentences

    return sentences(split)


@functools.lru_cache(maxsize=4)
def corpus_dictionary(size: int = DICT_SIZE, level: int = LEVEL) -> bytes:
    """The dictionary trained on the train split (built once per process, a few seconds)."""
    return train_dictionary(dictionary_samples(), size, level)


def dictionary_sha256(d: bytes | None) -> str | None:
    return hashlib.sha256(d).hexdigest() if d is not None else None


# ------------------------------------------------------------------ source coding

def _dict(d: bytes | None):
    return _zstd().ZstdCompressionDict(d) if d is not None else None


def compress_text(text: str, dict_data: bytes | None = None, level: int = LEVEL) -> bytes:
    """UTF-8 text -> a magicless zstd frame (no dictionary id, content size or checksum)."""
    zstd = _zstd()
    params = zstd.ZstdCompressionParameters.from_level(level, format=zstd.FORMAT_ZSTD1_MAGICLESS, write_checksum=0,
                                                        write_content_size=0, write_dict_id=0)
    return zstd.ZstdCompressor(compression_params=params, dict_data=_dict(dict_data)).compress(text.encode("utf-8"))


def receive_text(data: bytes, dict_data: bytes | None = None) -> str | None:
    """A received frame (zero padding after it allowed) -> text, or None when it does not
    decompress (a zstd error, or the frame does not end within the data); invalid UTF-8 is
    replaced by U+FFFD (best effort).

    Streaming decompression: a corrupted frame header may claim any content size, and the
    one-shot API would allocate it; the window is capped at MAX_TEXT_BYTES."""
    zstd = _zstd()
    dec = zstd.ZstdDecompressor(dict_data=_dict(dict_data), format=zstd.FORMAT_ZSTD1_MAGICLESS,
                                max_window_size=MAX_TEXT_BYTES)
    obj = dec.decompressobj()
    try:
        out = obj.decompress(bytes(data))
    except zstd.ZstdError:
        return None
    if not obj.eof:
        return None
    return out[:MAX_TEXT_BYTES].decode("utf-8", errors="replace")


def decompress_text(data: bytes, dict_data: bytes | None = None) -> str:
    """receive_text, with "" (the empty string) for a frame that does not decompress."""
    t = receive_text(data, dict_data)
    return "" if t is None else t


# ------------------------------------------------------------------ the link

def _padded_bits(payload: bytes, block_bits: int) -> np.ndarray:
    """The payload's bits zero-padded to whole codewords (at least one)."""
    from semedge.semcom.baseline import bytes_to_bits

    bits = bytes_to_bits(payload)
    blocks = max(1, -(-len(bits) // block_bits))
    return np.concatenate([bits, np.zeros(blocks * block_bits - len(bits), dtype=np.uint8)])


def through_link(payloads: list[bytes], cfg: TextLinkConfig, channel: str, snr_db: float, seed: int = 0) -> list[bytes]:
    """Each payload, in whole codewords, as its own message through LDPC + QAM + channel +
    receiver: the received bytes (padding included).

    The receiver of `semcom.baseline.transmit_bits` (the same encoder, mapper, demapper,
    decoder and channel draws), batched over messages: block fading draws one gain per
    message (sentence), shared by its codewords. Fast fading goes message by message
    through transmit_bits itself."""
    import torch

    from semedge.core.channel_spec import parse_channel, parse_snr
    from semedge.semcom.baseline import bits_to_bytes, transmit_bits

    spec, snr_db, link = parse_channel(channel), parse_snr(snr_db), cfg.link()
    gen = torch.Generator().manual_seed(seed)
    sent = [_padded_bits(p, cfg.block_bits) for p in payloads]
    if spec.fast or spec.kind == "none" or not np.isfinite(snr_db):
        return [bits_to_bytes(transmit_bits(b, link, channel, snr_db, gen)[0]) for b in sent]
    blocks = np.array([len(b) // cfg.block_bits for b in sent])
    rx = _batched(np.concatenate(sent), np.repeat(np.arange(len(sent)), blocks), link, spec, snr_db, gen)
    ends = np.cumsum(blocks) * (cfg.block_bits // 8)
    data = bits_to_bytes(rx)
    return [data[e - len(b) // 8 : e] for e, b in zip(ends, sent)]


def _batched(bits, msg_of_block, link, spec, snr_db: float, gen) -> np.ndarray:
    """bits [B * block_bits] in B codewords; msg_of_block [B] the message each belongs to."""
    import math

    import torch

    from semedge.semcom.baseline import _fec
    from semedge.semcom.channels import draw_fading, draw_noise

    n_blocks = len(msg_of_block)
    enc, dec, mapper, demapper = _fec(link.block_bits, link.code_bits, link.bits_per_symbol, link.ldpc_iters)
    with torch.no_grad():
        c = enc(torch.from_numpy(bits.astype(np.float32)).view(n_blocks, link.block_bits))  # [B, code_bits]
        s = mapper(c).reshape(n_blocks, -1)  # [B, uses per codeword], unit energy
        no = 10 ** (-snr_db / 10)  # N0 per complex use, Es = 1
        if spec.fading:
            h = draw_fading(spec, int(msg_of_block.max()) + 1, 1, gen)[torch.from_numpy(msg_of_block)]  # [B, 1]
        else:
            h = torch.ones(n_blocks, 1, dtype=torch.complex64)
        y = h * s + draw_noise(n_blocks, s.shape[1], gen) * math.sqrt(no / 2)
        no_eff = (no / (h.abs() ** 2).clamp_min(1e-12)).expand(s.shape).float()
        u = dec(demapper(y / h, no_eff)).reshape(-1).numpy()
    return (u > 0.5).astype(np.uint8)


def encode_texts(texts: list[str], cfg: TextLinkConfig, dict_data: bytes | None = None) -> list[bytes]:
    """The payload sent for each text (dict_data used only when cfg.dictionary)."""
    d = dict_data if cfg.dictionary else None
    if cfg.dictionary and d is None:
        raise UserError("the text link uses a zstd dictionary but none was given",
                        "pass dict_data=corpus_dictionary(), or TextLinkConfig(dictionary=False)")
    return [compress_text(t, d, cfg.level) for t in texts]


def send_texts(texts: list[str], cfg: TextLinkConfig, channel: str, snr_db: float, seed: int = 0,
               dict_data: bytes | None = None, payloads: list[bytes] | None = None) -> tuple[list[str], dict]:
    """texts -> (received texts, stats), one message per text.

    payloads: encode_texts(texts, cfg, dict_data) when already computed.
    stats: channel_uses (per text), payload_bytes (per text), decoded (share that
    decompressed), intact (share received byte-exact), ber (payload bit error rate)."""
    payloads = payloads if payloads is not None else encode_texts(texts, cfg, dict_data)
    got = through_link(payloads, cfg, channel, snr_db, seed)
    d = dict_data if cfg.dictionary else None
    received = [receive_text(g, d) for g in got]
    hyps = ["" if t is None else t for t in received]
    errs = sum(int(np.unpackbits(np.frombuffer(p, np.uint8) ^ np.frombuffer(g[: len(p)], np.uint8)).sum())
               for p, g in zip(payloads, got))
    n = max(1, len(texts))
    stats = {"channel_uses": [cfg.channel_uses(len(p)) for p in payloads], "payload_bytes": [len(p) for p in payloads],
             "decoded": sum(t is not None for t in received) / n, "intact": sum(h == t for h, t in zip(hyps, texts)) / n,
             "ber": errs / max(1, 8 * sum(len(p) for p in payloads))}
    return hyps, stats


def exact_match(refs: list[str], hyps: list[str], normalizer: str = "whisper") -> list[float]:
    """1.0 where the normalised hypothesis equals the normalised reference (the BLEU normaliser)."""
    from semedge.semcom.metrics import normalizer_fn

    f = normalizer_fn(normalizer)
    return [float(f(r) == f(h)) for r, h in zip(refs, hyps)]
