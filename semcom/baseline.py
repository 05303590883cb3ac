"""The conventional link ("LAM without SemCom"): separate source and channel coding.

Device: 16 kHz audio -> 8 kHz -> Codec 2 (Debian `codec2`, `c2enc`, a real low-rate
speech codec) -> bits -> 5G NR LDPC (sionna-no-rt, PyTorch) in blocks of
`block_bits` -> Gray QAM (sionna Mapper). Channel: the team's channel model
(`semcom.channels`: the same fading and noise draws and SNR convention as the JSC
link: Es/N0 per complex use = 10**(snr_db/10)). Server: zero-forcing equalisation
with perfect CSI (y/h, per-symbol noise N0/|h|^2), APP demapping to LLRs, LDPC
belief propagation, hard bits -> `c2dec` -> 16 kHz -> the unmodified Whisper.
Blocks that fail to decode keep their (erroneous) hard decisions, as a real
receiver would hand them to the speech decoder.
"""

from __future__ import annotations

import functools
import hashlib
import math
import shutil
import subprocess
from dataclasses import dataclass

import numpy as np
import torch

from semedge.semcom.errors import UserError

CODEC2_MODES = ("3200", "2400", "1600", "1400", "1300", "1200", "700C")


@dataclass(frozen=True)
class BaselineConfig:
    mode: str = "1600"  # Codec 2 bit rate (b/s) or 700C
    rate: float = 0.5  # LDPC code rate
    bits_per_symbol: int = 2  # 2 = QPSK, 4 = 16-QAM
    block_bits: int = 1024  # information bits per LDPC codeword
    ldpc_iters: int = 20

    def __post_init__(self):
        if self.mode not in CODEC2_MODES:
            raise UserError(f"Codec 2 mode {self.mode!r} is unknown", f"use one of {', '.join(CODEC2_MODES)}")
        if not 0.1 <= self.rate <= 0.95:
            raise UserError(f"LDPC rate {self.rate} is out of range", "use e.g. 0.5")
        if self.bits_per_symbol not in (2, 4, 6):
            raise UserError(f"bits_per_symbol={self.bits_per_symbol} is unsupported", "use 2 (QPSK), 4 (16-QAM) or 6 (64-QAM)")

    @property
    def name(self) -> str:
        mod = {2: "QPSK", 4: "16QAM", 6: "64QAM"}[self.bits_per_symbol]
        return f"codec2-{self.mode}+ldpc-{self.rate:g}+{mod}"

    @property
    def code_bits(self) -> int:
        n = int(round(self.block_bits / self.rate))
        return n + (-n) % self.bits_per_symbol

    def channel_uses(self, n_bits: int) -> int:
        blocks = max(1, math.ceil(n_bits / self.block_bits))
        return blocks * self.code_bits // self.bits_per_symbol


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
    from semedge.semcom.channel_spec import parse_channel, parse_snr
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


class ConventionalLink:
    """Codec 2 + LDPC + QAM over a channel, then the unmodified Whisper on the decoded audio."""

    def __init__(self, loaded, cfg: BaselineConfig = BaselineConfig(), backend: str = "torch"):
        """backend: the receiver's Whisper runs in transformers ("torch", fp32) or CTranslate2 ("ct2", int8)."""
        if loaded.kind != "speech":
            raise UserError("the conventional baseline is for speech models", "use a Whisper model")
        if backend not in ("torch", "ct2"):
            raise UserError(f"baseline receiver backend {backend!r} is unknown", "use torch or ct2")
        self.loaded, self.cfg, self.backend = loaded, cfg, backend
        self._bits: dict[str, np.ndarray] = {}
        self._asr: dict[str, str] = {}  # sha1 of the received bit stream -> transcript (same bits, same audio)

    def source_bits(self, uid: str, audio: np.ndarray) -> np.ndarray:
        if uid not in self._bits:
            self._bits[uid] = bytes_to_bits(codec2_encode(audio, self.cfg.mode))
        return self._bits[uid]

    def transcribe_bits(self, streams: list[bytes], batch_size: int = 8) -> list[str]:
        from semedge.semcom.split import generate_kwargs

        keys = [hashlib.sha1(s).hexdigest() for s in streams]
        todo = [(k, s) for k, s in dict(zip(keys, streams)).items() if k not in self._asr]
        fe, model, tok = self.loaded.feature_extractor, self.loaded.model, self.loaded.tokenizer
        for b in range(0, len(todo), batch_size):
            chunk = todo[b : b + batch_size]
            audio = [codec2_decode(s, self.cfg.mode) for _, s in chunk]
            feats = fe(audio, sampling_rate=16000, return_tensors="pt").input_features
            if self.backend == "ct2":
                from semedge.semcom.ct2_backend import engine_for

                texts = engine_for(self.loaded, "int8").transcribe(feats.numpy(), 96)
            else:
                with torch.no_grad():
                    ids = model.generate(input_features=feats, max_new_tokens=96, **generate_kwargs(self.loaded))
                texts = tok.batch_decode(ids, skip_special_tokens=True)
            for (k, _), t in zip(chunk, texts):
                self._asr[k] = t.strip()
        return [self._asr[k] for k in keys]

    def run(self, utts, channel: str, snr_db: float, seed: int = 0) -> tuple[list[str], list[int], dict]:
        """(hypotheses, complex channel uses per utterance, stats) for utterances with .id and .audio."""
        gen = torch.Generator().manual_seed(seed)
        streams, uses, errs, nbits = [], [], 0, 0
        for u in utts:
            bits = self.source_bits(u.id, u.audio)
            rx, n_uses = transmit_bits(bits, self.cfg, channel, snr_db, gen)
            errs += int((rx != bits).sum())
            nbits += len(bits)
            streams.append(bits_to_bytes(rx))
            uses.append(n_uses)
        hyps = self.transcribe_bits(streams)
        return hyps, uses, {"ber": errs / max(1, nbits), "bits_per_utt": nbits / max(1, len(utts))}
