"""Result files: JSON rows and the metric-vs-SNR plot, each written atomically."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from semedge.core.files import atomic_path, write_atomic


def write_json(obj, path) -> None:
    write_atomic(Path(path), json.dumps(obj, indent=1, default=float) + "\n")


def ci_yerr(rows: list[dict], m: str) -> np.ndarray:
    """(2, len(rows)) distances from each row's `m` to the ends of its 95% interval (0 without one)."""
    out = []
    for r in rows:
        lo, hi = (r.get(f"{m}_ci95") or {}).get("ci95", (r[m], r[m]))
        out.append((max(0.0, r[m] - lo), max(0.0, hi - r[m])))
    return np.array(out, dtype=np.float64).reshape(-1, 2).T


def plot_results(rows: list[dict], path, metrics_to_plot=("wer", "bleu", "similarity")) -> None:
    """One panel per metric vs SNR, one line per (system, channel), 95% error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mets = [m for m in metrics_to_plot if any(m in r for r in rows)]
    fig, axes = plt.subplots(1, len(mets), figsize=(5 * len(mets), 4), squeeze=False)
    series: dict[tuple, list] = {}
    for r in rows:
        series.setdefault((r["system"], r["channel"]), []).append(r)
    for ax, m in zip(axes[0], mets):
        for (sysname, ch), rs in sorted(series.items()):
            rs = sorted((r for r in rs if m in r and math.isfinite(r["snr_db"])), key=lambda r: r["snr_db"])
            if rs:
                ax.errorbar([r["snr_db"] for r in rs], [r[m] for r in rs], yerr=ci_yerr(rs, m), marker="o",
                            capsize=3, linestyle="-" if ch == "awgn" else "--", label=f"{sysname} / {ch}")
        ax.set_xlabel("SNR (dB)")
        ax.set_ylabel(m.upper() if m != "similarity" else "similarity")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
