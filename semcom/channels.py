"""Differentiable channels in torch, one small layer per channel (after Sionna).

The convention (symbol pairing, SNR definition and noise variance, fading, LMMSE
equalisation, draw order) is stated once, in `semedge.runtime.link`, the numpy
link; these layers implement the same, and tests/test_channels.py checks that the
two agree on the same draws. Torch specifics: draws come from `generator` when
given; x_hat is differentiable w.r.t. x (draws and snr_db are constants);
float16/bfloat16 inputs are computed in float32 and cast back.

Layers are classes in `CHANNELS` (kind name -> class; the names are declared in
`semedge.core.channel_spec.KINDS`). A new channel is one `Channel` subclass with
its `fading`, plus one line in `CHANNELS`; its constructor takes ChannelSpec
fields by name (`fast`, `k_factor`).
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from semedge.core.channel_spec import ChannelSpec, parse_channel, parse_snr
from semedge.core.errors import UserError

EQUALIZERS = ("mmse", "zf")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _complex_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def channel_uses(n_real_symbols: int) -> int:
    """Complex channel uses for n real symbols: ceil(n/2)."""
    return (int(n_real_symbols) + 1) // 2


def draw_noise(batch: int, n_uses: int, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Complex noise [batch, n_uses] with unit variance per real dimension (E|n|^2 = 2)."""
    dtype = _compute_dtype(dtype)
    z = torch.randn(batch, n_uses, 2, generator=generator, device=device, dtype=dtype)
    return torch.complex(z[..., 0], z[..., 1])


def _sigma2(snr_db, batch: int, device, dtype) -> torch.Tensor:
    """Noise variance per real dimension, shape [batch, 1]."""
    if isinstance(snr_db, torch.Tensor) and snr_db.dim() > 0:
        if tuple(snr_db.shape) != (batch,):
            raise UserError(f"snr_db has shape {tuple(snr_db.shape)}, expected a number or one per "
                            f"message ({batch},)", "pass one SNR or a tensor with one SNR per batch element")
        snr = snr_db.detach().to(device=device, dtype=dtype)
        if torch.isnan(snr).any() or (snr == -math.inf).any():
            raise UserError("SNR must be a number in dB; snr_db holds NaN or -inf",
                            'give the SNR in dB, e.g. 10, -5 or "inf" for no noise')
    else:
        value = parse_snr(snr_db.item() if isinstance(snr_db, torch.Tensor) else snr_db)
        snr = torch.full((batch,), value, device=device, dtype=dtype)
    return torch.pow(10.0, -snr / 10.0)[:, None]


def _check_x(x) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] == 0 or not x.is_floating_point():
        raise UserError("channel input x must be a real float tensor [batch, ...] with batch >= 1",
                        "pass the JSC encoder's symbols, shape [batch, tokens, k]")


def apply_channel(x: torch.Tensor, h, noise, snr_db, equalizer: str = "mmse") -> torch.Tensor:
    """The pure channel step with explicit draws: pair, y = h*s + sigma*noise, equalise, unpair.

    x: real [B, ...]; h: complex tensor broadcastable to [B, n_uses] (None: h = 1);
    noise: complex [B, n_uses], unit variance per real dimension (None: no noise);
    snr_db: number, "inf" or tensor [B]; equalizer: "mmse" (default) or "zf".
    Returns x_hat, x's shape and dtype, differentiable w.r.t. x.
    """
    if equalizer not in EQUALIZERS:
        raise UserError(f"equalizer {equalizer!r} is not known", "use mmse or zf")
    _check_x(x)
    b = x.shape[0]
    cdt = _compute_dtype(x.dtype)
    flat = x.reshape(b, -1).to(cdt)
    n_real = flat.shape[1]
    n_uses = channel_uses(n_real)
    if n_real % 2:
        flat = torch.nn.functional.pad(flat, (0, 1))
    pairs = flat.view(b, n_uses, 2)
    sr, si = pairs[..., 0], pairs[..., 1]
    sigma2 = _sigma2(snr_db, b, x.device, cdt)
    if h is None:
        hr = torch.ones(b, 1, device=x.device, dtype=cdt)
        hi = torch.zeros(b, 1, device=x.device, dtype=cdt)
    else:
        h = torch.as_tensor(h, device=x.device)
        hr, hi = h.real.to(cdt), (h.imag.to(cdt) if h.is_complex() else torch.zeros_like(h, dtype=cdt))
    yr = hr * sr - hi * si
    yi = hr * si + hi * sr
    if noise is not None:
        noise = torch.as_tensor(noise, device=x.device)
        if tuple(noise.shape) != (b, n_uses):
            raise UserError(f"noise has shape {tuple(noise.shape)}, expected ({b}, {n_uses})",
                            "draw one complex noise sample per channel use (draw_noise)")
        sigma = sigma2.sqrt()
        yr = yr + sigma * noise.real.to(cdt)
        yi = yi + sigma * noise.imag.to(cdt)
    denom = hr * hr + hi * hi + (sigma2 if equalizer == "mmse" else 0.0)
    er = (hr * yr + hi * yi) / denom  # conj(h) * y / denom
    ei = (hr * yi - hi * yr) / denom
    noiseless = sigma2 == 0.0
    er = torch.where(noiseless, sr, er)  # perfect CSI, no noise: exact
    ei = torch.where(noiseless, si, ei)
    out = torch.stack([er, ei], dim=-1).reshape(b, 2 * n_uses)[:, :n_real]
    return out.reshape(x.shape).to(x.dtype)


def sample_snr(batch: int, low_db: float, high_db: float, generator=None, per_message: bool = True,
               device=None) -> torch.Tensor:
    """Training SNRs [batch], uniform in dB over [low_db, high_db]: one per message, or one per batch."""
    low, high = parse_snr(low_db), parse_snr(high_db)
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise UserError(f"SNR range [{low_db}, {high_db}] is not a finite range with low <= high",
                        "give finite dB values, e.g. low=0 high=20")
    u = torch.rand(batch if per_message else 1, generator=generator, device=device, dtype=torch.float64)
    return (low + (high - low) * u).expand(batch).to(torch.float32)


def _cn01(batch: int, n: int, generator, device, dtype) -> torch.Tensor:
    """[batch, n] draws of CN(0, 1)."""
    z = torch.randn(batch, n, 2, generator=generator, device=device, dtype=dtype) / math.sqrt(2.0)
    return torch.complex(z[..., 0], z[..., 1])


class Channel(nn.Module):
    """y = h*s + n with h = 1 (the base draws no fading). Subclasses draw their h in
    `fading`: None (h = 1), [batch, 1] (block) or [batch, n_uses] (fast)."""

    spec: ChannelSpec

    @classmethod
    def from_spec(cls, spec: ChannelSpec) -> "Channel":
        """The layer for `spec`: its constructor's parameters are read from the spec by name."""
        names = [n for n in inspect.signature(cls).parameters]
        return cls(**{n: getattr(spec, n) for n in names})

    def fading(self, batch: int, n_uses: int, generator=None, device=None,
               dtype=torch.float32) -> torch.Tensor | None:
        return None

    def forward(self, x: torch.Tensor, snr_db, generator: torch.Generator | None = None) -> torch.Tensor:
        """x [B, ...] real, snr_db a number, "inf" or tensor [B] -> x_hat (MMSE estimate of x)."""
        _check_x(x)
        b = x.shape[0]
        _sigma2(snr_db, b, x.device, _compute_dtype(x.dtype))  # validates snr_db
        n_uses = channel_uses(x[0].numel())
        h = self.fading(b, n_uses, generator, x.device, _compute_dtype(x.dtype))
        noise = draw_noise(b, n_uses, generator, x.device, x.dtype)
        return apply_channel(x, h, noise, snr_db)

    def _gain_count(self, n_uses: int) -> int:
        """Gains per message: one (block) or one per complex use (fast)."""
        return n_uses if self.spec.fast else 1

    def extra_repr(self) -> str:
        return str(self.spec)


class NoChannel(Channel):
    """y = x: no draws."""

    def __init__(self):
        super().__init__()
        self.spec = ChannelSpec("none")

    def forward(self, x: torch.Tensor, snr_db, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_x(x)
        _sigma2(snr_db, x.shape[0], x.device, _compute_dtype(x.dtype))  # validates snr_db
        return x


class AWGN(Channel):
    """y = s + n, n ~ CN(0, 2*sigma2), LMMSE output x_hat = y / (1 + sigma2)."""

    def __init__(self):
        super().__init__()
        self.spec = ChannelSpec("awgn")


class Rayleigh(Channel):
    """y = h*s + n, h ~ CN(0,1): one h per message (block) or per complex use (fast)."""

    def __init__(self, fast: bool = False):
        super().__init__()
        self.spec = ChannelSpec("rayleigh", fast=fast)

    def fading(self, batch, n_uses, generator=None, device=None, dtype=torch.float32):
        return _cn01(batch, self._gain_count(n_uses), generator, device, _compute_dtype(dtype))


class Rician(Channel):
    """y = h*s + n, h = sqrt(K/(K+1)) e^{j phi} + sqrt(1/(K+1)) CN(0,1), K linear, one phi per message."""

    def __init__(self, k_factor: float = 4.0, fast: bool = False):
        super().__init__()
        self.spec = ChannelSpec("rician", fast=fast, k_factor=k_factor)

    def fading(self, batch, n_uses, generator=None, device=None, dtype=torch.float32):
        dtype = _compute_dtype(dtype)
        scatter = _cn01(batch, self._gain_count(n_uses), generator, device, dtype)
        k = self.spec.k_factor
        phi = torch.rand(batch, 1, generator=generator, device=device, dtype=dtype) * (2.0 * math.pi)
        los = torch.polar(torch.full_like(phi, math.sqrt(k / (k + 1.0))), phi)
        return los + math.sqrt(1.0 / (k + 1.0)) * scatter


CHANNELS: dict[str, type[Channel]] = {"none": NoChannel, "awgn": AWGN, "rayleigh": Rayleigh, "rician": Rician}


def make_channel(spec: "str | ChannelSpec") -> Channel:
    """`make_channel("rician-fast:K=2")` -> Rician(2.0, fast=True)."""
    spec = parse_channel(spec)
    return CHANNELS[spec.kind].from_spec(spec)


def draw_fading(spec, batch: int, n_uses: int, generator=None, device=None,
                dtype=torch.float32) -> torch.Tensor:
    """Complex gains: [batch, 1] for block fading, [batch, n_uses] for fast; ones for none/awgn."""
    h = make_channel(spec).fading(batch, n_uses, generator, device, dtype)
    if h is None:
        return torch.ones(batch, 1, device=device, dtype=_complex_dtype(_compute_dtype(dtype)))
    return h
