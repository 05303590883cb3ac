"""The conventional link ("LAM without SemCom"): separate source and channel coding.

Device: 16 kHz audio -> a source codec (below) -> bytes -> bits -> 5G NR LDPC
(sionna-no-rt, PyTorch) in blocks of `block_bits` -> Gray QAM (sionna Mapper).
Channel: the team's channel model (`semcom.channels`: the same fading and noise draws
and SNR convention as the JSC link: Es/N0 per complex use = 10**(snr_db/10)). Server:
zero-forcing equalisation with perfect CSI (y/h, per-symbol noise N0/|h|^2), APP
demapping to LLRs, LDPC belief propagation, hard bits -> bytes -> the source decoder
-> 16 kHz -> the unmodified Whisper. A block that fails to decode keeps its
(erroneous) hard decisions: the receiver hands the source decoder what it got, and
the source decoder's own framing decides what survives.

Source codecs (one small class each, `SOURCE_CODECS` by name):

- `codec2` (Debian `codec2`, `c2enc`/`c2dec`, modes 3200 ... 700C): 16 kHz -> 8 kHz ->
  headerless frames of fixed size. Codec 2 has no integrity check: corrupted bits
  go into `c2dec` and come out as garbled speech.
- `opus` (libopus 1.4 inside the libsndfile that the `soundfile` wheel bundles; its
  OGG/OPUS writer, target bit rate 6-16 kb/s, VBR, 20 ms packets, 16 kHz): the bits
  sent are the WHOLE Ogg/Opus file, overhead included: Ogg page headers (27 B + one
  lacing byte per 255 B, pages of <= 1 s of audio: libsndfile's default), the OpusHead
  page (47 B) and the OpusTags page. libsndfile pads OpusTags to ~820 B of zeros; no
  link would send those, so `compact_ogg` rewrites that page to the vendor string alone
  (55 B) and sets a fixed stream serial number (libsndfile draws a random one; fixed,
  the same audio gives the same bits), recomputing the page CRCs. What the receiver
  does with corrupted bits: libogg checks every page's CRC-32 and drops a page that
  fails (with it, up to 1 s of audio: libsndfile skips the hole without concealment,
  so the audio comes out shorter); if the OpusHead or OpusTags page is lost, or no
  page survives, the file does not decode at all: empty audio, empty transcript.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import shutil
import struct
import subprocess
from dataclasses import dataclass, field

import numpy as np
import torch

from semedge.core.errors import UserError
from semedge.core.frames import SAMPLE_RATE

CODEC2_MODES = ("3200", "2400", "1600", "1400", "1300", "1200", "700C")
OPUS_BITRATES = (6000, 16000)  # b/s, the range the baseline accepts (libopus: 6 ... 256 kb/s per channel)


# ------------------------------------------------------------------ source codecs

class SourceCodec:
    """One source codec at one setting: 16 kHz audio <-> bytes.

    `setting` is the codec's own knob as a string (Codec 2 mode, Opus bit rate in b/s);
    `decode` must accept any bytes (the channel may have corrupted them) and return
    16 kHz float32 audio, empty when nothing decodes.
    """

    name = ""
    default = ""

    def __init__(self, setting: str | None = None):
        self.setting = self.check(str(setting if setting is not None else self.default))

    def check(self, setting: str) -> str:
        """The canonical setting, or UserError naming the allowed ones."""
        raise NotImplementedError

    @property
    def label(self) -> str:
        return f"{self.name}-{self.setting}"

    @property
    def bits_per_second(self) -> float:
        """Nominal source rate (Opus: the VBR target; the file's real size is what is sent)."""
        raise NotImplementedError

    def encode(self, audio16k: np.ndarray) -> bytes:
        raise NotImplementedError

    def decode(self, data: bytes) -> np.ndarray:
        raise NotImplementedError

    def overhead_bytes(self, data: bytes) -> int:
        """Bytes of `data` that are container, not codec payload (0 for a headerless stream)."""
        return 0


class Codec2(SourceCodec):
    """Codec 2 (`c2enc`/`c2dec`) at 8 kHz: headerless fixed-size frames, no integrity check."""

    name, default = "codec2", "1600"

    def check(self, setting: str) -> str:
        if setting not in CODEC2_MODES:
            raise UserError(f"Codec 2 mode {setting!r} is unknown", f"use one of {', '.join(CODEC2_MODES)}")
        return setting

    @property
    def bits_per_second(self) -> float:
        return 700.0 if self.setting == "700C" else float(self.setting)

    def encode(self, audio16k: np.ndarray) -> bytes:
        return codec2_encode(audio16k, self.setting)

    def decode(self, data: bytes) -> np.ndarray:
        return codec2_decode(data, self.setting)


class Opus(SourceCodec):
    """Opus in Ogg through soundfile (libsndfile's OGG/OPUS writer), 16 kHz mono, VBR target bit rate."""

    name, default = "opus", "8000"

    def check(self, setting: str) -> str:
        s = setting.lower().removesuffix("bps").removesuffix("b/s")
        try:
            bps = float(s[:-1]) * 1000 if s.endswith("k") else float(s)
        except ValueError:
            bps = math.nan
        lo, hi = OPUS_BITRATES
        if not lo <= bps <= hi or bps != int(bps):
            raise UserError(f"Opus bit rate {setting!r} is out of range",
                            f"give b/s in [{lo}, {hi}] (or kb/s with k), e.g. 8000 or 8k")
        return str(int(bps))

    @property
    def label(self) -> str:
        return f"opus-{int(self.setting) / 1000:g}k"

    @property
    def bits_per_second(self) -> float:
        return float(self.setting)

    def encode(self, audio16k: np.ndarray) -> bytes:
        import soundfile as sf

        _check_soundfile_opus(sf)
        # libsndfile maps compression level q in [0, 1] to int((1 - q) * 250000 + 6000) b/s per channel
        level = min(1.0, max(0.0, 1.0 - (int(self.setting) - 6000 + 0.5) / 250000.0))
        buf = io.BytesIO()
        x = np.clip(np.asarray(audio16k, dtype=np.float32).reshape(-1), -1.0, 1.0)
        sf.write(buf, x, SAMPLE_RATE, format="OGG", subtype="OPUS", compression_level=level)
        return compact_ogg(buf.getvalue())

    def decode(self, data: bytes) -> np.ndarray:
        import soundfile as sf

        try:
            y, sr = sf.read(io.BytesIO(bytes(data)), dtype="float32", always_2d=True)
        except (sf.SoundFileError, RuntimeError, ValueError, EOFError):  # header pages lost: nothing decodes
            return np.zeros(0, dtype=np.float32)
        y = y.mean(axis=1)
        if sr != SAMPLE_RATE and len(y):
            from scipy.signal import resample_poly

            y = resample_poly(y, SAMPLE_RATE, sr).astype(np.float32)
        return np.ascontiguousarray(y, dtype=np.float32)

    def overhead_bytes(self, data: bytes) -> int:
        """Page headers + the OpusHead and OpusTags pages."""
        pages = ogg_pages(data)
        return sum(p.header_len for p in pages) + sum(p.body_len for p in pages[:2])


SOURCE_CODECS: dict[str, type[SourceCodec]] = {c.name: c for c in (Codec2, Opus)}


def source_codec(name: str, setting: str | None = None) -> SourceCodec:
    """The registered source codec `name` at `setting` (its default when None)."""
    cls = SOURCE_CODECS.get(str(name).lower())
    if cls is None:
        raise UserError(f"source codec {name!r} is unknown", f"use one of {', '.join(SOURCE_CODECS)}")
    return cls(setting)


def _check_soundfile_opus(sf) -> None:
    if "OPUS" not in sf.available_subtypes("OGG"):
        raise UserError(f"the libsndfile behind soundfile {sf.__version__} cannot write Ogg/Opus",
                        "pip install 'soundfile>=0.13' (its wheels bundle libsndfile with libopus)")
    import inspect

    if "compression_level" not in inspect.signature(sf.write).parameters:
        raise UserError(f"soundfile {sf.__version__} cannot set the Opus bit rate (no compression_level)",
                        "pip install 'soundfile>=0.13'")


# ------------------------------------------------------------------ Ogg pages

@dataclass(frozen=True)
class OggPage:
    offset: int
    header_len: int  # 27 + lacing values
    body_len: int

    @property
    def end(self) -> int:
        return self.offset + self.header_len + self.body_len


@functools.lru_cache(maxsize=1)
def _crc_table() -> tuple[int, ...]:
    table = []
    for i in range(256):  # CRC-32, polynomial 0x04C11DB7, MSB first, init 0, no final xor (RFC 3533)
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else (r << 1)
        table.append(r & 0xFFFFFFFF)
    return tuple(table)


def ogg_crc(page: bytes) -> int:
    """The Ogg page checksum of `page` with its CRC field (bytes 22..25) zeroed."""
    t, crc = _crc_table(), 0
    for b in page:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ t[(crc >> 24) ^ b]
    return crc


def ogg_pages(data: bytes) -> list[OggPage]:
    """The pages of a well-formed Ogg stream, in order (stops at the first byte that is not a page)."""
    pages, i = [], 0
    while i + 27 <= len(data) and data[i : i + 4] == b"OggS":
        nseg = data[i + 26]
        hl = 27 + nseg
        if i + hl > len(data):
            break
        bl = sum(data[i + 27 : i + hl])
        pages.append(OggPage(i, hl, bl))
        i += hl + bl
    return pages


def _page(header: bytes, body: bytes) -> bytes:
    p = bytearray(header + body)
    p[22:26] = b"\0\0\0\0"
    p[22:26] = struct.pack("<I", ogg_crc(bytes(p)))
    return bytes(p)


OGG_SERIAL = 0x5345_4D45  # fixed stream serial number ("SEME")


def compact_ogg(data: bytes) -> bytes:
    """The same Ogg/Opus stream with OpusTags cut to its vendor string and a fixed serial number.

    Any stream not laid out as libsndfile writes it (OpusHead page, then one OpusTags
    page, then audio pages) comes back unchanged.
    """
    pages = ogg_pages(data)
    if len(pages) < 2 or pages[-1].end != len(data):
        return data
    tags = pages[1]
    body = data[tags.offset + tags.header_len : tags.end]
    lacing = data[tags.offset + 27 : tags.offset + tags.header_len]
    if not body.startswith(b"OpusTags") or len(body) < 16 or (lacing and lacing[-1] == 255):
        return data
    (vlen,) = struct.unpack_from("<I", body, 8)
    if 12 + vlen + 4 > len(body):
        return data
    new_tags = body[: 12 + vlen] + struct.pack("<I", 0)  # vendor string, no comments, no padding
    out = []
    for i, p in enumerate(pages):
        header = bytearray(data[p.offset : p.offset + p.header_len])
        header[14:18] = struct.pack("<I", OGG_SERIAL)
        b = data[p.offset + p.header_len : p.end]
        if i == 1:
            nseg = len(new_tags) // 255 + 1
            header = header[:26] + bytes([nseg]) + bytes([255] * (nseg - 1) + [len(new_tags) % 255])
            b = new_tags
        out.append(_page(bytes(header), b))
    return b"".join(out)


# ------------------------------------------------------------------ Codec 2 programs

def _tool(name: str) -> str:
    p = shutil.which(name)
    if p is None:
        raise UserError(f"`{name}` (Codec 2) is not installed", "install the Debian package codec2 (apt-get install codec2)")
    return p


def codec2_encode(audio16k: np.ndarray, mode: str = "1600") -> bytes:
    """16 kHz float audio -> Codec 2 bit stream (headerless)."""
    from scipy.signal import resample_poly

    x8 = resample_poly(np.asarray(audio16k, dtype=np.float64), 1, 2)
    pcm = (np.clip(x8, -1, 1) * 32767).astype("<i2").tobytes()
    r = subprocess.run([_tool("c2enc"), mode, "-", "-"], input=pcm, capture_output=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"c2enc failed: {r.stderr.decode(errors='replace')[:200]}")
    return r.stdout


def codec2_decode(bits: bytes, mode: str = "1600") -> np.ndarray:
    """Codec 2 bit stream -> 16 kHz float32 audio."""
    from scipy.signal import resample_poly

    r = subprocess.run([_tool("c2dec"), mode, "-", "-"], input=bits, capture_output=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"c2dec failed: {r.stderr.decode(errors='replace')[:200]}")
    x8 = np.frombuffer(r.stdout, dtype="<i2").astype(np.float64) / 32768.0
    return resample_poly(x8, 2, 1).astype(np.float32)



@dataclass(frozen=True)
class BaselineConfig:
    codec: str = "codec2"  # source codec: a key of SOURCE_CODECS
    mode: str | None = None  # its setting: Codec 2 mode (1600, 700C, ...) or Opus b/s (8000, 8k); None = its default
    rate: float = 0.5  # LDPC code rate
    bits_per_symbol: int = 2  # 2 = QPSK, 4 = 16-QAM
    block_bits: int = 1024  # information bits per LDPC codeword
    ldpc_iters: int = 20

    def __post_init__(self):
        object.__setattr__(self, "codec", str(self.codec).lower())
        object.__setattr__(self, "mode", self.source.setting)  # canonical (e.g. "8k" -> "8000")
        if not 0.1 <= self.rate <= 0.95:
            raise UserError(f"LDPC rate {self.rate} is out of range", "use e.g. 0.5")
        if self.bits_per_symbol not in (2, 4, 6):
            raise UserError(f"bits_per_symbol={self.bits_per_symbol} is unsupported", "use 2 (QPSK), 4 (16-QAM) or 6 (64-QAM)")

    @classmethod
    def parse(cls, spec: str, **defaults) -> "BaselineConfig":
        """From CODEC[:SETTING[:LDPC_RATE[:BITS_PER_SYMBOL]]], e.g. "opus:8k", "codec2:1600:0.5:2"."""
        parts = [p.strip() for p in str(spec).split(":")]
        kw = dict(defaults)
        try:
            if len(parts) > 2:
                kw["rate"] = float(parts[2])
            if len(parts) > 3:
                kw["bits_per_symbol"] = int(parts[3])
        except ValueError:
            parts = []
        if not 1 <= len(parts) <= 4 or not parts[0]:
            raise UserError(f"conventional link {spec!r} is malformed",
                            "give CODEC[:SETTING[:LDPC_RATE[:BITS_PER_SYMBOL]]], e.g. opus:8k or codec2:1600:0.5:2")
        return cls(codec=parts[0], mode=parts[1] if len(parts) > 1 and parts[1] else None, **kw)

    @property
    def source(self) -> SourceCodec:
        return source_codec(self.codec, self.mode)

    @property
    def name(self) -> str:
        mod = {2: "QPSK", 4: "16QAM", 6: "64QAM"}[self.bits_per_symbol]
        return f"{self.source.label}+ldpc-{self.rate:g}+{mod}"

    @property
    def code_bits(self) -> int:
        n = int(round(self.block_bits / self.rate))
        return n + (-n) % self.bits_per_symbol

    def channel_uses(self, n_bits: int) -> int:
        blocks = max(1, math.ceil(n_bits / self.block_bits))
        return blocks * self.code_bits // self.bits_per_symbol


@functools.lru_cache(maxsize=8)
def _fec(block_bits: int, code_bits: int, bits_per_symbol: int, iters: int):
    from sionna.phy.fec.ldpc import LDPC5GDecoder, LDPC5GEncoder
    from sionna.phy.mapping import Demapper, Mapper

    enc = LDPC5GEncoder(k=block_bits, n=code_bits)
    dec = LDPC5GDecoder(enc, num_iter=iters, hard_out=True)
    return enc, dec, Mapper("qam", bits_per_symbol), Demapper("app", "qam", bits_per_symbol)


def bytes_to_bits(b: bytes) -> np.ndarray:
    return np.unpackbits(np.frombuffer(b, dtype=np.uint8))


def bits_to_bytes(bits: np.ndarray) -> bytes:
    return np.packbits(bits.astype(np.uint8)).tobytes()


@torch.no_grad()
def transmit_bits(bits: np.ndarray, cfg: BaselineConfig, channel: str, snr_db: float,
                  generator: torch.Generator | None = None) -> tuple[np.ndarray, int]:
    """One message's bits through LDPC + QAM + channel + receiver. Returns (received bits, complex channel uses)."""
    from semedge.core.channel_spec import parse_channel, parse_snr
    from semedge.semcom.channels import draw_fading, draw_noise

    spec = parse_channel(channel)
    snr_db = parse_snr(snr_db)
    n = len(bits)
    blocks = max(1, math.ceil(n / cfg.block_bits))
    u = np.zeros(blocks * cfg.block_bits, dtype=np.float32)
    u[:n] = bits
    enc, dec, mapper, demapper = _fec(cfg.block_bits, cfg.code_bits, cfg.bits_per_symbol, cfg.ldpc_iters)
    c = enc(torch.from_numpy(u).view(blocks, cfg.block_bits))  # [blocks, code_bits]
    s = mapper(c).reshape(1, -1)  # unit-energy symbols, one message
    uses = s.shape[1]
    if spec.kind == "none" or not math.isfinite(snr_db):
        return bits.copy(), uses
    no = 10 ** (-snr_db / 10)  # N0 per complex use, Es = 1
    h = draw_fading(spec, 1, uses, generator) if spec.fading else torch.ones(1, 1, dtype=torch.complex64)
    noise = draw_noise(1, uses, generator) * math.sqrt(no / 2)  # E|n|^2 = N0
    y = h * s + noise
    habs2 = (h.abs() ** 2).clamp_min(1e-12)
    s_hat = y / h
    no_eff = (no / habs2).expand(s_hat.shape).float()
    llr = demapper(s_hat.reshape(blocks, -1), no_eff.reshape(blocks, -1))
    u_hat = dec(llr).reshape(-1).numpy()[:n]
    return (u_hat > 0.5).astype(np.uint8), uses


@dataclass
class LinkCache:
    """What a link may reuse across code rates and SNRs for one source codec setting."""

    bits: dict = field(default_factory=dict)  # utterance id -> bits sent (np.uint8)
    overhead: dict = field(default_factory=dict)  # utterance id -> container bits among them
    asr: dict = field(default_factory=dict)  # sha1 of a received stream -> transcript, None = no audio decoded


class ConventionalLink:
    """A source codec + LDPC + QAM over a channel, then the unmodified Whisper on the decoded audio."""

    def __init__(self, loaded, cfg: BaselineConfig = BaselineConfig(), backend: str = "torch",
                 cache: LinkCache | None = None):
        """backend: the receiver's Whisper runs in transformers ("torch", fp32) or CTranslate2 ("ct2", int8).
        cache: share one per source setting (`cfg.source.label`) between links at several code rates."""
        if not loaded.task.supports("baseline"):
            raise UserError("the conventional baseline is for speech models", "use a Whisper model")
        if backend not in ("torch", "ct2"):
            raise UserError(f"baseline receiver backend {backend!r} is unknown", "use torch or ct2")
        self.loaded, self.cfg, self.backend = loaded, cfg, backend
        self.source = cfg.source
        self.cache = cache if cache is not None else LinkCache()

    def source_bits(self, uid: str, audio: np.ndarray) -> np.ndarray:
        """The bits sent for one utterance: the source codec's whole output (Opus: the whole Ogg file)."""
        c = self.cache
        if uid not in c.bits:
            data = self.source.encode(audio)
            c.bits[uid] = bytes_to_bits(data)
            c.overhead[uid] = 8 * self.source.overhead_bytes(data)
        return c.bits[uid]

    def transcribe_bits(self, streams: list[bytes], batch_size: int = 8) -> list[str]:
        """Transcripts of received streams; a stream that decodes to no audio reads as ""."""
        asr = self.cache.asr
        keys = [hashlib.sha1(s).hexdigest() for s in streams]
        todo = [(k, s) for k, s in dict(zip(keys, streams)).items() if k not in asr]
        for b in range(0, len(todo), batch_size):
            chunk = [(k, self.source.decode(s)) for k, s in todo[b : b + batch_size]]
            asr.update((k, None) for k, a in chunk if len(a) == 0)
            chunk = [(k, a) for k, a in chunk if len(a)]
            if chunk:
                for (k, _), t in zip(chunk, self._whisper([a for _, a in chunk])):
                    asr[k] = t.strip()
        return [asr[k] or "" for k in keys]

    def _whisper(self, audio: list[np.ndarray]) -> list[str]:
        from semedge.semcom.split import generate_kwargs

        fe, model, tok = self.loaded.feature_extractor, self.loaded.model, self.loaded.tokenizer
        feats = fe(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        if self.backend == "ct2":
            from semedge.semcom.ct2_backend import engine_for

            return engine_for(self.loaded, "int8").transcribe(feats.numpy(), 96)
        with torch.no_grad():
            ids = model.generate(input_features=feats, max_new_tokens=96, **generate_kwargs(self.loaded))
        from semedge.semcom.loops import cut_loop

        return [cut_loop(t.strip()) for t in tok.batch_decode(ids, skip_special_tokens=True)]

    def run(self, utts, channel: str, snr_db: float, seed: int = 0) -> tuple[list[str], list[int], dict]:
        """(hypotheses, complex channel uses per utterance, stats) for utterances with .id and .audio.

        stats: ber (bit errors after LDPC / bits sent), bits_per_utt (mean bits sent, container
        included), overhead_bits_per_utt (of which container: Ogg pages and Opus headers),
        lost_utts (share of utterances whose stream decoded to no audio: empty transcript).
        """
        gen = torch.Generator().manual_seed(seed)
        streams, uses, errs, nbits, over = [], [], 0, 0, 0
        for u in utts:
            bits = self.source_bits(u.id, u.audio)
            rx, n_uses = transmit_bits(bits, self.cfg, channel, snr_db, gen)
            errs += int((rx != bits).sum())
            nbits += len(bits)
            over += self.cache.overhead[u.id]
            streams.append(bits_to_bytes(rx))
            uses.append(n_uses)
        hyps = self.transcribe_bits(streams)
        lost = sum(self.cache.asr[hashlib.sha1(s).hexdigest()] is None for s in streams)
        n = max(1, len(utts))
        return hyps, uses, {"ber": errs / max(1, nbits), "bits_per_utt": nbits / n, "overhead_bits_per_utt": over / n,
                            "lost_utts": lost / n}
