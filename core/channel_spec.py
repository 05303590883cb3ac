"""Channel spec strings and SNR values, parsed in pure Python.

Both channel implementations (torch: `semedge.semcom.channels`, numpy:
`semedge.runtime.link`) read their settings from here, so the device runtime can
parse a spec without torch or numpy. The channel names (KINDS) and the SNR's dict
key (`snr_key`) are declared here and nowhere else.

Spec strings (case-insensitive):

    none               no channel: y = x
    awgn               y = x + n
    rayleigh           block Rayleigh fading: one h ~ CN(0,1) per message
    rayleigh-fast      fast Rayleigh fading: one h per complex channel use
    rician             block Rician fading, K = 4 (linear, LOS power / scattered power)
    rician:K=10        block Rician fading with K = 10
    rician-fast:K=2    fast Rician fading with K = 2

SNR is Es/N0 per real symbol in dB (see docs/channels.md): the noise variance
per real dimension is 10**(-snr_db/10) for unit-power symbols.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from semedge.core.errors import UserError

KINDS = ("none", "awgn", "rayleigh", "rician")
DEFAULT_K = 4.0
ACCEPTED = "none, awgn, rayleigh, rayleigh-fast, rician, rician:K=<K>, rician-fast, rician-fast:K=<K>"


@dataclass(frozen=True)
class ChannelSpec:
    """One channel: `kind` in none|awgn|rayleigh|rician; `fast` = one h per complex
    channel use (else one h per message); `k_factor` = Rician K (linear), used only
    by rician."""

    kind: str
    fast: bool = False
    k_factor: float = 0.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"channel kind {self.kind!r} is not known", f"use one of: {ACCEPTED}")
        if self.fast and self.kind in ("none", "awgn"):
            raise UserError(f"channel {self.kind!r} has no fading, so no fast variant",
                            f"use one of: {ACCEPTED}")
        k = self.k_factor
        if isinstance(k, bool) or not isinstance(k, numbers.Real) or not math.isfinite(k) or k < 0:
            raise UserError(f"Rician K factor {k!r} must be a finite number >= 0 (linear, not dB)",
                            "write e.g. rician:K=4")
        if self.kind != "rician" and k != 0:
            raise UserError(f"channel {self.kind!r} takes no K factor", "K applies to rician only")
        object.__setattr__(self, "k_factor", float(k))
        object.__setattr__(self, "fast", bool(self.fast))

    @property
    def fading(self) -> bool:
        return self.kind in ("rayleigh", "rician")

    def __str__(self) -> str:
        name = self.kind + ("-fast" if self.fast else "")
        if self.kind == "rician":
            name += f":K={self.k_factor:g}"
        return name


def parse_channel(spec: "str | ChannelSpec") -> ChannelSpec:
    """`"rician-fast:K=2"` -> ChannelSpec("rician", fast=True, k_factor=2.0)."""
    if isinstance(spec, ChannelSpec):
        return spec
    if not isinstance(spec, str):
        raise UserError(f"channel spec must be a string, got {type(spec).__name__}",
                        f"use one of: {ACCEPTED}")
    text = spec.strip().lower()
    head, sep, params = text.partition(":")
    head = head.strip()
    base, fast = (head[:-5], True) if head.endswith("-fast") else (head, False)
    bad = UserError(f"channel spec {spec!r} is not understood", f"use one of: {ACCEPTED}")
    if base not in KINDS or (fast and base in ("none", "awgn")):
        raise bad
    if base != "rician":
        if sep:
            raise bad
        return ChannelSpec(base, fast=fast)
    k = DEFAULT_K
    if sep:
        key, eq, value = params.partition("=")
        if key.strip() != "k" or not eq:
            raise bad
        try:
            k = float(value.strip())
        except ValueError:
            raise UserError(f"Rician K in {spec!r} is not a number",
                            "write K as a linear number, e.g. rician:K=4") from None
    return ChannelSpec("rician", fast=fast, k_factor=k)


def parse_channels(specs: str) -> list[ChannelSpec]:
    """`"awgn,rayleigh"` -> [ChannelSpec("awgn"), ChannelSpec("rayleigh")]."""
    if not isinstance(specs, str) or not specs.strip():
        raise UserError("channel list is empty", f"give a comma-separated list of: {ACCEPTED}")
    parts = [p.strip() for p in specs.split(",")]
    if any(not p for p in parts):
        raise UserError(f"channel list {specs!r} has an empty entry",
                        "separate channels with single commas, e.g. awgn,rayleigh")
    return [parse_channel(p) for p in parts]


def parse_snr(value) -> float:
    """A number (dB) or "inf" (no noise) -> float. -inf and NaN are refused."""
    fix = 'give the SNR in dB, e.g. 10, -5 or "inf" for no noise'
    if isinstance(value, bool):
        raise UserError(f"SNR must be a number in dB, got {value!r}", fix)
    if isinstance(value, str):
        try:
            out = float(value.strip())
        except ValueError:
            raise UserError(f"SNR must be a number in dB, got {value!r}", fix) from None
    elif isinstance(value, numbers.Real):
        out = float(value)
    else:
        raise UserError(f"SNR must be a number in dB, got {type(value).__name__}", fix)
    if math.isnan(out) or out == -math.inf:
        raise UserError(f"SNR must be a number in dB, got {value!r}", fix)
    return out


def noise_std(snr_db) -> float:
    """Noise standard deviation per real dimension for unit-power symbols: 10**(-snr_db/20)."""
    snr = parse_snr(snr_db)
    return 0.0 if snr == math.inf else 10.0 ** (-snr / 20.0)


def snr_key(snr_db) -> str:
    """An SNR as a dict/JSON key: 10 -> "10", 2.5 -> "2.5", inf -> "inf"."""
    f = float(snr_db)
    return "inf" if math.isinf(f) else f"{f:g}"
