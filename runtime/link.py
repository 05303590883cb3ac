"""The link between device and server: channel simulation in numpy (no torch).

This docstring states the channel convention; `semedge.semcom.channels` (torch,
differentiable) implements the same and refers here. docs/channels.md has the
derivations and the measured checks.

- Input x: real, shape [B, ...]; each batch element is one message; unit mean
  power per real symbol.
- Per message, the flattened real symbols are paired in order,
  s_i = x[2i] + j*x[2i+1], one complex channel use each (Es = E|s|^2 = 2). An odd
  count gets one zero pad, removed after. `channel_uses(n) = ceil(n/2)`.
- SNR is Es/N0 per real symbol in dB: noise variance per real dimension
  sigma2 = 10**(-snr_db/10), so the complex noise n has E|n|^2 = 2*sigma2.
- y = h*s + n. Each channel class draws its own h (`fading`), with E|h|^2 = 1:
  h = 1 (awgn); CN(0,1) (rayleigh); sqrt(K/(K+1))*e^{j*phi} + sqrt(1/(K+1))*CN(0,1)
  (rician, phi uniform, one phi per message). Block fading: one h per message;
  fast: one h per complex use.
- The receiver knows h and equalises with LMMSE:
  s_hat = conj(h)*y / (|h|^2 + N0/Es) = conj(h)*y / (|h|^2 + sigma2),
  since N0/Es = 2*sigma2/2. x_hat = (Re s_hat, Im s_hat) unpaired. With no
  noise (snr_db = inf) x_hat = x exactly; for `none`, x_hat = x.
- Draws: h first (`fading`), then the noise (`draw_noise`), from one generator.

Channels are classes in `CHANNELS` (kind name -> class; the names are declared in
`semedge.core.channel_spec.KINDS`). A new channel is one `Channel` subclass with
its `fading`, plus one line in `CHANNELS`.
"""

from __future__ import annotations

import math

import numpy as np

from semedge.core.channel_spec import ChannelSpec, parse_channel, parse_snr
from semedge.core.errors import UserError

EQUALIZERS = ("mmse", "zf")


def channel_uses(n_real_symbols: int) -> int:
    """Complex channel uses for n real symbols: ceil(n/2)."""
    n = int(n_real_symbols)
    if n < 0 or n != n_real_symbols:
        raise UserError(f"n_real_symbols must be a whole number >= 0, got {n_real_symbols!r}",
                        "pass the count of real symbols per message")
    return (n + 1) // 2


def draw_noise(batch: int, n_uses: int, rng: np.random.Generator) -> np.ndarray:
    """Complex noise [batch, n_uses] with unit variance per real dimension (E|n|^2 = 2)."""
    z = rng.standard_normal((batch, n_uses, 2))
    return z[..., 0] + 1j * z[..., 1]


def _sigma2(snr_db, batch: int) -> np.ndarray:
    """Noise variance per real dimension, shape [batch, 1]."""
    if np.ndim(snr_db) == 0:
        snr = np.full(batch, parse_snr(snr_db.item() if isinstance(snr_db, np.ndarray) else snr_db))
    else:
        snr = np.asarray(snr_db, dtype=np.float64)
        if snr.shape != (batch,):
            raise UserError(f"snr_db has shape {snr.shape}, expected a number or one per message ({batch},)",
                            "pass one SNR or an array with one SNR per batch element")
        if np.isnan(snr).any() or (snr == -np.inf).any():
            raise UserError("SNR must be a number in dB; snr_db holds NaN or -inf",
                            'give the SNR in dB, e.g. 10, -5 or "inf" for no noise')
    with np.errstate(over="ignore"):
        return (10.0 ** (-snr / 10.0))[:, None]


def _check_x(x) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim < 1 or x.shape[0] == 0:
        raise UserError(f"channel input x has shape {x.shape}, expected [batch, ...] with batch >= 1",
                        "pass the device half's symbols, shape [batch, tokens, k]")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise UserError(f"channel input x has dtype {x.dtype}, expected real numbers",
                        "pass real float symbols")
    return x


def apply_channel(x, h, noise, snr_db, equalizer: str = "mmse") -> np.ndarray:
    """The pure channel step with explicit draws: pair, y = h*s + sigma*noise, equalise, unpair.

    x: real [B, ...]; h: complex, broadcastable to [B, n_uses] (None: h = 1);
    noise: complex [B, n_uses], unit variance per real dimension (None: no noise);
    snr_db: number or [B]; equalizer: "mmse" (default) or "zf" (conj(h)*y/|h|^2).
    Returns x_hat with x's shape (and dtype, if floating).
    """
    if equalizer not in EQUALIZERS:
        raise UserError(f"equalizer {equalizer!r} is not known", "use mmse or zf")
    x = _check_x(x)
    out_dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64
    b = x.shape[0]
    flat = x.reshape(b, -1).astype(np.float64)
    n_real = flat.shape[1]
    n_uses = channel_uses(n_real)
    if n_real % 2:
        flat = np.concatenate([flat, np.zeros((b, 1))], axis=1)
    s = flat[:, 0::2] + 1j * flat[:, 1::2]
    sigma2 = _sigma2(snr_db, b)
    h = np.ones((b, 1), dtype=np.complex128) if h is None else np.asarray(h, dtype=np.complex128)
    y = h * s
    if noise is not None:
        noise = np.asarray(noise, dtype=np.complex128)
        if noise.shape != (b, n_uses):
            raise UserError(f"noise has shape {noise.shape}, expected ({b}, {n_uses})",
                            "draw one complex noise sample per channel use (draw_noise)")
        y = y + np.sqrt(sigma2) * noise
    reg = sigma2 if equalizer == "mmse" else 0.0
    noiseless = sigma2 == 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        s_hat = np.conj(h) * y / (np.abs(h) ** 2 + reg)
    s_hat = np.where(noiseless, s, s_hat)  # perfect CSI, no noise: exact
    out = np.empty((b, 2 * n_uses))
    out[:, 0::2] = s_hat.real
    out[:, 1::2] = s_hat.imag
    return out[:, :n_real].reshape(x.shape).astype(out_dtype, copy=False)


def _rng(rng) -> np.random.Generator:
    """None -> a fresh generator; anything but a numpy Generator is refused."""
    if rng is None:
        return np.random.default_rng()
    if not isinstance(rng, np.random.Generator):
        raise UserError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}",
                        "pass np.random.default_rng(seed)")
    return rng


class Channel:
    """y = h*s + n with h = 1 (the base draws no fading). Subclasses draw their h in
    `fading`: None (h = 1), [batch, 1] (block) or [batch, n_uses] (fast)."""

    def __init__(self, spec: ChannelSpec):
        self.spec = spec

    def fading(self, batch: int, n_uses: int, rng: np.random.Generator) -> np.ndarray | None:
        return None

    def transmit(self, x: np.ndarray, snr_db, rng: np.random.Generator | None = None) -> np.ndarray:
        """Draw h, then the noise, and run `apply_channel`."""
        rng = _rng(rng)
        b = x.shape[0]
        n_uses = channel_uses(x[0].size)
        h = self.fading(b, n_uses, rng)
        return apply_channel(x, h, draw_noise(b, n_uses, rng), snr_db)

    def _gain_count(self, n_uses: int) -> int:
        """Gains per message: one (block) or one per complex use (fast)."""
        return n_uses if self.spec.fast else 1


class NoChannel(Channel):
    """y = x: no draws."""

    def transmit(self, x, snr_db, rng=None):
        return x.copy()


class AWGN(Channel):
    """y = s + n."""


def _cn01(batch: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """[batch, n] draws of CN(0, 1)."""
    z = rng.standard_normal((batch, n, 2))
    return (z[..., 0] + 1j * z[..., 1]) / math.sqrt(2.0)


class Rayleigh(Channel):
    """h ~ CN(0, 1)."""

    def fading(self, batch, n_uses, rng):
        return _cn01(batch, self._gain_count(n_uses), rng)


class Rician(Channel):
    """h = sqrt(K/(K+1)) e^{j phi} + sqrt(1/(K+1)) CN(0,1), one phi per message."""

    def fading(self, batch, n_uses, rng):
        scatter = _cn01(batch, self._gain_count(n_uses), rng)
        k = self.spec.k_factor
        phi = rng.uniform(0.0, 2.0 * math.pi, size=(batch, 1))
        return math.sqrt(k / (k + 1.0)) * np.exp(1j * phi) + math.sqrt(1.0 / (k + 1.0)) * scatter


CHANNELS: dict[str, type[Channel]] = {"none": NoChannel, "awgn": AWGN, "rayleigh": Rayleigh, "rician": Rician}


def make_channel(spec: "str | ChannelSpec") -> Channel:
    """`make_channel("rician-fast:K=2")` -> Rician(ChannelSpec("rician", True, 2.0))."""
    spec = parse_channel(spec)
    return CHANNELS[spec.kind](spec)


def draw_fading(spec, batch: int, n_uses: int, rng: np.random.Generator) -> np.ndarray:
    """Complex gains: [batch, 1] for block fading, [batch, n_uses] for fast; ones for none/awgn."""
    h = make_channel(spec).fading(batch, n_uses, rng)
    return np.ones((batch, 1), dtype=np.complex128) if h is None else h


def transmit(x, spec, snr_db, rng: np.random.Generator | None = None) -> np.ndarray:
    """Send x [B, ...] through the channel `spec` at `snr_db` (number or [B]); returns x_hat."""
    channel = make_channel(spec)
    x = _check_x(x)
    _sigma2(snr_db, x.shape[0])  # validates snr_db
    return channel.transmit(x, snr_db, rng)
