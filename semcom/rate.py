"""Rate adaptation: how many of a codec's k symbols per token to send at a given SNR.

A codec trained with random truncation (`semedge train --rate-min`) puts the most
useful information in its leading symbols, so the device can send only the first
k' <= k. `RatePolicy` is a table fitted from measurement: for each measured SNR,
the smallest k' whose WER is within `tolerance` of the WER at the full k. Between
table points the policy uses the entry at the highest measured SNR not above the
current one (conservative: a lower SNR never gets fewer symbols); below the table,
the full k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from semedge.core.channel_spec import snr_key
from semedge.core.errors import UserError


@dataclass
class RatePolicy:
    k: int
    table: list[tuple[float, int]]  # (snr_db, k') sorted by SNR
    tolerance: float = 0.02
    measured: dict = field(default_factory=dict)  # {"snr": {"k'": wer}} the fit came from

    def __post_init__(self):
        self.table = sorted((float(s), int(kk)) for s, kk in self.table)
        for _, kk in self.table:
            if not 1 <= kk <= self.k:
                raise UserError(f"rate table entry k'={kk} is outside [1, {self.k}]", "refit the policy (semedge train --rate-min ...)")

    def choose(self, snr_db: float) -> int:
        """k' to send at `snr_db` (dB; inf = clean channel)."""
        snr_db = float(snr_db)
        if math.isnan(snr_db):
            raise UserError("SNR is NaN", "give the link's SNR in dB")
        best = self.k
        for s, kk in self.table:
            if s <= snr_db:
                best = kk
        # never fewer symbols at a lower SNR than at a higher one
        return best

    def to_dict(self) -> dict:
        return {"k": self.k, "table": [[s, kk] for s, kk in self.table], "tolerance": self.tolerance,
                "measured": self.measured}

    @classmethod
    def from_dict(cls, d: dict) -> "RatePolicy":
        try:
            return cls(int(d["k"]), [(float(s), int(kk)) for s, kk in d["table"]], float(d.get("tolerance", 0.02)),
                       dict(d.get("measured", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"rate policy is malformed: {e}", "refit it with semedge train --rate-min ...") from e


def fit_policy(k: int, wer_table: dict[float, dict[int, float]], tolerance: float = 0.02) -> RatePolicy:
    """wer_table[snr][k'] (measured, must include k' = k) -> the policy.

    Per finite SNR, the smallest k' with WER <= WER(k) + tolerance; then made monotone
    (k' never rises with SNR). A clean-channel row (SNR inf) is kept in `measured` only.
    """
    entries = []
    for snr in sorted(s for s in wer_table if math.isfinite(s)):
        row = wer_table[snr]
        if k not in row:
            raise UserError(f"measurement at {snr} dB lacks the full k={k}", "measure k' = k at every SNR")
        ok = [kk for kk, w in row.items() if w <= row[k] + tolerance]
        entries.append([snr, min(ok)])
    for i in range(len(entries) - 2, -1, -1):  # lower SNR: at least as many symbols as any higher SNR
        entries[i][1] = max(entries[i][1], entries[i + 1][1])
    measured = {snr_key(s): {str(kk): round(w, 4) for kk, w in sorted(r.items())} for s, r in sorted(wer_table.items())}
    return RatePolicy(k, [(s, kk) for s, kk in entries], tolerance, measured)


def restrict(wer_table: dict[float, dict[int, float]], k: int) -> dict[float, dict[int, float]]:
    """The measurements a codec cut to k symbols (semcom.jsc.cut) inherits: the k' <= k columns."""
    return {s: {kk: w for kk, w in row.items() if kk <= k} for s, row in wer_table.items()}


def rule_k(wer_table: dict[float, dict[int, float]], k: int, snr_db: float = 10.0, tolerance: float = 0.02) -> int:
    """The smallest k' whose WER at `snr_db` is within `tolerance` of the full codec's clean-channel WER
    (the rule that picks the default codec's k); the full k if none is."""
    clean = wer_table.get(math.inf, {}).get(k)
    row = wer_table.get(float(snr_db))
    if clean is None or row is None:
        raise UserError(f"the rule needs WER at k'={k} on a clean channel and WER at {snr_db:g} dB",
                        f"measure --snr inf {snr_db:g}")
    ok = [kk for kk, w in row.items() if w <= clean + tolerance]
    return min(ok) if ok else k


def choose_k(ckpt, snr_db: float) -> int:
    """`--k auto`: k' for a checkpoint at `snr_db`; the full k when the checkpoint has no fitted policy."""
    pol = ckpt.rate_policy if ckpt is not None else None
    if pol is None:
        return ckpt.k if ckpt is not None else None
    return pol.choose(snr_db)
