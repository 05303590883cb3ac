"""Separate source and channel coding for images: JPEG -> 5G LDPC -> QAM at a fixed channel-use budget.

Source: JPEG (Pillow, baseline, 4:2:0) at the highest quality whose bits fit the
budget. Both ends know the JPEG header for a given (quality, size) -- Pillow writes
the same 600-odd bytes of quantisation and Huffman tables for any image -- so only
one quality byte and the entropy-coded scan (without its end marker) are sent; at
32 x 32 the header alone would be 20x the scan. The payload is zero-padded to the
budget's information bits (zeros after the scan are ignored by the decoder).

Channel coding: one 5G LDPC codeword per image (information bits = uses x bits per
symbol x code rate) + Gray QAM, over the project's channel with its SNR convention,
ZF equalisation with perfect CSI and APP demapping: `semcom.baseline.transmit_bits`,
the same link the speech baseline uses.

Receiver: rebuild the header from the received quality byte, decode; when nothing
decodes (wrong quality byte, broken stream) it shows a mid-grey image.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np

from semedge.core.errors import UserError

SOS = b"\xff\xda"  # start of scan
EOI = b"\xff\xd9"  # end of image
QUALITIES = range(1, 96)  # Pillow: above 95 only grows the file
FAILED_GREY = 0.5  # what the receiver shows when nothing decodes


@dataclass(frozen=True)
class JpegLinkConfig:
    uses: int  # complex channel uses per image (the budget)
    bits_per_symbol: int = 2  # 2 QPSK, 4 16-QAM, 6 64-QAM
    rate: float = 0.5  # LDPC code rate
    ldpc_iters: int = 20

    def __post_init__(self):
        if self.bits_per_symbol not in (2, 4, 6):
            raise UserError(f"bits_per_symbol={self.bits_per_symbol} is unsupported", "use 2 (QPSK), 4 (16-QAM) or 6 (64-QAM)")
        info = self.uses * self.bits_per_symbol * self.rate
        if abs(info - round(info)) > 1e-9 or round(info) % 8:
            raise UserError(f"{self.uses} uses x {self.bits_per_symbol} bits x rate {self.rate:g} = {info:g} information bits, "
                            "not a whole number of bytes", "choose a budget and rate giving whole bytes (e.g. 512 uses, rate 1/2)")

    @property
    def info_bits(self) -> int:
        return int(round(self.uses * self.bits_per_symbol * self.rate))

    @property
    def label(self) -> str:
        mod = {2: "QPSK", 4: "16QAM", 6: "64QAM"}[self.bits_per_symbol]
        return f"jpeg+ldpc-{self.rate:g}+{mod}"

    def link(self):
        """The speech baseline's link settings for one codeword of info_bits (semcom.baseline)."""
        from semedge.semcom.baseline import BaselineConfig

        cfg = BaselineConfig(rate=self.rate, bits_per_symbol=self.bits_per_symbol, block_bits=self.info_bits,
                             ldpc_iters=self.ldpc_iters)
        if cfg.channel_uses(self.info_bits) != self.uses:
            raise UserError(f"the LDPC codeword takes {cfg.channel_uses(self.info_bits)} uses, not the budget's {self.uses}",
                            "choose a rate whose codeword fills the budget exactly (e.g. 1/2, 3/4 with 16-QAM)")
        return cfg


def _encode(img: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def _split(data: bytes) -> tuple[bytes, bytes]:
    """(header through the SOS segment, scan without EOI)."""
    i = data.index(SOS)
    end = i + 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    scan = data[end:]
    return data[:end], scan[:-2] if scan.endswith(EOI) else scan


@functools.lru_cache(maxsize=256)
def jpeg_header(quality: int, height: int, width: int) -> bytes:
    """The header Pillow writes for any RGB image of this size and quality (both ends know it)."""
    return _split(_encode(np.zeros((height, width, 3), dtype=np.uint8), quality))[0]


def _payload(img: np.ndarray, quality: int) -> bytes:
    return bytes([quality]) + _split(_encode(img, quality))[1]


def jpeg_fit(img: np.ndarray, max_bytes: int) -> tuple[int, bytes]:
    """(quality, payload) for uint8 [H, W, 3]: the highest quality whose payload (quality
    byte + scan) fits max_bytes, by bisection (the size grows with the quality); quality 1
    cut to max_bytes when none fits."""
    lo, hi, best = QUALITIES[0], QUALITIES[-1], None
    while lo <= hi:
        q = (lo + hi) // 2
        payload = _payload(img, q)
        if len(payload) <= max_bytes:
            best, lo = (q, payload), q + 1
        else:
            hi = q - 1
    return best if best is not None else (1, _payload(img, 1)[:max_bytes])


def jpeg_decode(payload: bytes, height: int, width: int) -> np.ndarray | None:
    """uint8 [H, W, 3] from a received payload, or None when it does not decode."""
    from PIL import Image

    if not payload or payload[0] not in QUALITIES:
        return None
    data = jpeg_header(payload[0], height, width) + payload[1:] + EOI
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            out = np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError):
        return None
    return out if out.shape == (height, width, 3) else None


def _through_link(payloads: list[bytes], cfg: JpegLinkConfig, channel: str, snr_db: float, seed: int) -> list[bytes]:
    """Each payload (info_bits // 8 bytes) as one LDPC codeword through the link; the received bytes.

    A block-fading channel draws one gain per image, so each image is its own message. On
    AWGN (no gain to share) all images go as one message of one codeword each: the same
    statistics (independent codewords, independent noise) in one decoder call."""
    import torch

    from semedge.core.channel_spec import parse_channel
    from semedge.semcom.baseline import bits_to_bytes, bytes_to_bits, transmit_bits

    link, size = cfg.link(), cfg.info_bits // 8
    gen = torch.Generator().manual_seed(seed)
    if not parse_channel(channel).fading:
        rx, _ = transmit_bits(bytes_to_bits(b"".join(payloads)), link, channel, snr_db, gen)  # [N * info_bits]
        data = bits_to_bytes(rx)
        return [data[i * size : (i + 1) * size] for i in range(len(payloads))]
    return [bits_to_bytes(transmit_bits(bytes_to_bits(p), link, channel, snr_db, gen)[0]) for p in payloads]


def send_patches(patches: np.ndarray, cfg: JpegLinkConfig, channel: str, snr_db: float, seed: int = 0,
                 fits: list | None = None) -> tuple[np.ndarray, dict]:
    """patches float [N, 3, H, W] in [0, 1] -> (received [N, 3, H, W], stats), one codeword each.

    fits: the jpeg_fit (quality, payload) of each patch for this cfg, when already computed.
    stats: quality (mean), decoded (share that decoded), ber (information bit error rate)."""
    from semedge.semcom.image_data import to_chw, to_hwc_uint8

    size = cfg.info_bits // 8
    n, _, h, w = patches.shape
    fits = fits if fits is not None else [jpeg_fit(to_hwc_uint8(p), size) for p in patches]
    sent = [p.ljust(size, b"\0") for _, p in fits]  # zero padding after the scan
    got = _through_link(sent, cfg, channel, snr_db, seed)
    out = np.full(patches.shape, FAILED_GREY, dtype=np.float32)
    decoded = 0
    for i, data in enumerate(got):
        img = jpeg_decode(data, h, w)
        if img is not None:
            out[i] = to_chw(img)
            decoded += 1
    errs = sum(int(np.unpackbits(np.frombuffer(a, np.uint8) ^ np.frombuffer(b, np.uint8)).sum()) for a, b in zip(sent, got))
    stats = {"quality": float(np.mean([q for q, _ in fits])), "decoded": decoded / n, "ber": errs / (n * cfg.info_bits)}
    return out, stats
