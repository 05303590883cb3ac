"""The build report: static HTML + Markdown + JSON, with PNG plots (matplotlib, Agg).

`write_report(build, out_dir)` reads the dict `semedge.pipeline.build` writes to
build.json (docs/build.md) and writes, under `out_dir/report/`:

    index.html                 tables + the plots below (self-contained apart from the PNGs)
    report.md                  the same tables in Markdown
    report.json                the numbers behind every table and plot
    footprint_accuracy.png     per device: every candidate plan, footprint vs WER, Pareto front, chosen point
    snr_wer.png, snr_bleu.png, snr_similarity.png    metric vs SNR per chosen package, + the baseline
    latency_breakdown.png      device / link / server per device (predicted and host-measured)

Every figure says which numbers are measured and which are predicted. Accuracy figures
show their bootstrap 95% interval over utterances ("0.376 [0.351, 0.402]" in tables,
error bars in plots) where the build recorded one (semcom.stats), and the report names
the WER text normaliser.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from semedge.core.channel_spec import snr_key as _snr_key
from semedge.core.files import atomic_path, write_atomic
from semedge.semcom.stats import fmt_ci

METRICS = (("wer", "WER", "lower is better"), ("bleu", "BLEU", "higher is better"),
           ("similarity", "semantic similarity", "higher is better"))
PLOTS = ("footprint_accuracy.png", "snr_wer.png", "snr_bleu.png", "snr_similarity.png", "latency_breakdown.png")


# ---------------------------------------------------------------- helpers


def _save_fig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _fmt(v, spec: str = ".3f", unit: str = "") -> str:
    f = _num(v)
    return "–" if f is None else f"{f:{spec}}{unit}"


def _mb(b) -> str:
    f = _num(b)
    return "–" if f is None else f"{f / 1e6:.1f} MB"


def _wer_at(acc: dict, snrs) -> dict[str, float | None]:
    out = {}
    for s in snrs:
        row = (acc or {}).get(_snr_key(s)) or {}
        out[_snr_key(s)] = _num(row.get("wer"))
    return out


def _ci_at(acc: dict, snrs, metric: str = "wer") -> dict[str, dict | None]:
    """The 95% interval of `metric` at each SNR (None where the build has none)."""
    return {_snr_key(s): ((acc or {}).get(_snr_key(s)) or {}).get(f"{metric}_ci95") for s in snrs}


def _fmt_ci(v, ci: dict | None, spec: str = ".3f") -> str:
    """'0.376 [0.351, 0.402]' with an interval, else the bare figure."""
    if ci and _num(ci.get("value")) is not None:
        return fmt_ci(ci, int(spec.strip(".f")))
    return _fmt(v, spec)


def _yerr(values, cis) -> list[list[float]]:
    """matplotlib yerr (2 x n): distances from each value to its interval's ends (0 without one)."""
    lo, hi = [], []
    for v, ci in zip(values, cis):
        a, b = (ci or {}).get("ci95") or (v, v)
        lo.append(max(0.0, v - a))
        hi.append(max(0.0, b - v))
    return [lo, hi]


def _device_snrs(dev: dict) -> list[float]:
    return [float(s) for s in (dev.get("eval_snrs") or [])]


# ---------------------------------------------------------------- rows (tables and JSON)


def device_rows(build: dict) -> list[dict]:
    """One row per device: the report's headline numbers and the per-device table."""
    rows = []
    for name, d in (build.get("devices") or {}).items():
        pkg = d.get("package") or {}
        host = d.get("host") or {}
        pred = d.get("predicted") or {}
        lat = d.get("latency") or {}
        snrs = _device_snrs(d)
        rows.append({
            "device": name,
            "device_class": d.get("device_class"),
            "fits": bool(d.get("fits")),
            "failing_budget": d.get("failing_budget"),
            "chosen": d.get("chosen"),
            "plan": d.get("describe") or ("–" if not d.get("chosen") else d.get("chosen")),
            "package_bytes": pkg.get("bytes"),
            "onnx_bytes": pkg.get("onnx_bytes"),
            "package": pkg.get("path"),
            "peak_rss_mb": host.get("peak_rss_mb"),
            "host_latency_ms_p50": host.get("latency_ms_p50"),
            "host_latency_ms_p95": host.get("latency_ms_p95"),
            "predicted_latency_ms": pred.get("latency_ms"),
            "predicted_memory_mb": pred.get("memory_mb"),
            "memory_budget_mb": (d.get("budgets") or {}).get("memory_mb"),
            "latency_budget_ms": (d.get("budgets") or {}).get("latency_ms"),
            "channel": d.get("channel"),
            "snr_db": d.get("snr_db"),
            "eval_snrs": snrs,
            "wer_at_snr": _wer_at(d.get("accuracy") or {}, snrs),
            "wer_ci95_at_snr": _ci_at(d.get("accuracy") or {}, snrs),
            "accuracy": d.get("accuracy") or {},
            "link_ms_predicted": lat.get("link_ms_predicted"),
            "server_ms_host": lat.get("server_ms_host"),
            "note": d.get("note"),
            **target_figures(d),
        })
    return rows


def _check(predicted, measured) -> dict | None:
    p, m = _num(predicted), _num(measured)
    return None if p is None or not m else {"predicted_ms": p, "measured_ms": m, "error": round(p / m - 1, 4)}


def target_figures(d: dict) -> dict:
    """EP, its share of the graph, calibration and the predictor's error where a measurement exists."""
    pred = d.get("predicted") or {}
    host = d.get("host") or {}
    on_host = d.get("device_class") == "host"  # the device is this machine: its prediction meets its measurement
    return {"ep": pred.get("ep"), "ep_unit": pred.get("unit"), "ep_node_share": pred.get("node_share"),
            "ep_flop_share": pred.get("flop_share"), "ep_boundaries": pred.get("boundaries"),
            "calibrated_on": pred.get("calibrated_on"), "host_check": d.get("host_check"),
            "device_check": _check(pred.get("latency_ms"), host.get("latency_ms_p50")) if on_host else None,
            "fallback_from": (d.get("fallback") or {}).get("from_ep")}


# ---------------------------------------------------------------- plots


def _grid(n: int):
    import matplotlib.pyplot as plt

    cols = min(3, max(1, n))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    flat = [a for r in axes for a in r]
    for a in flat[n:]:
        a.axis("off")
    return fig, flat[:n]


def _pareto_2d(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Lower-left front of (x, y) points (both minimised), sorted by x."""
    front, best = [], math.inf
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


def candidate_points(build: dict, device: str) -> dict:
    """Every candidate for one device: footprint (predicted memory on the device, else ONNX MB) vs WER."""
    plans = build.get("plans") or {}
    cands = plans.get("candidates") or {}
    dev = (plans.get("devices") or {}).get(device) or (build.get("devices") or {}).get(device) or {}
    snrs = _device_snrs((build.get("devices") or {}).get(device) or dev) or [float(s) for s in dev.get("eval_snrs") or []]
    rejected = dev.get("rejected") or {}
    pareto = set(dev.get("pareto") or [])
    pts = []
    use_mem = all(((c.get("predicted") or {}).get(device) or {}).get("memory_mb") is not None for c in cands.values()) and cands
    for cid, c in cands.items():
        acc = c.get("accuracy") or {}
        # WER at the device's lowest SNR the candidate was scored at (its worst case)
        wer, at = None, None
        for s in sorted(snrs):
            w = _num((acc.get(_snr_key(s)) or {}).get("wer"))
            if w is not None:
                wer, at = w, _snr_key(s)
                break
        if wer is None and acc:  # no score at the device's SNRs: the lowest SNR it has
            k = min(acc, key=lambda s: float(s))
            wer, at = _num(acc[k].get("wer")), k
        x = ((c.get("predicted") or {}).get(device) or {}).get("memory_mb") if use_mem else (_num(c.get("bytes")) or 0) / 1e6
        if wer is None or _num(x) is None:
            continue
        pts.append({"cid": cid, "x": float(x), "wer": wer, "snr": at, "bytes": c.get("bytes"),
                    "wer_ci95": (acc.get(at) or {}).get("wer_ci95"),
                    "describe": c.get("describe") or cid, "rejected": rejected.get(cid), "pareto": cid in pareto,
                    "level": (acc.get(at) or {}).get("level")})
    bdev = (build.get("devices") or {}).get(device) or {}
    realised = None
    ch = next((p for p in pts if p["cid"] == dev.get("chosen")), None)
    if ch is not None and bdev.get("package"):  # the built package's own test-set WER at the same SNR
        w = _num(((bdev.get("accuracy") or {}).get(ch["snr"]) or {}).get("wer"))
        x = _num((bdev.get("predicted") or {}).get("memory_mb")) if use_mem else (_num((bdev.get("package") or {}).get("onnx_bytes")) or 0) / 1e6
        if w is not None and x is not None:
            realised = {"x": x, "wer": w, "snr": ch["snr"]}
    return {"x_label": "predicted peak memory on the device (MB)" if use_mem else "device graph size (MB)",
            "x_is_memory": bool(use_mem), "points": pts, "chosen": dev.get("chosen"), "closest": dev.get("closest") or bdev.get("closest"),
            "realised": realised, "budget_mb": (dev.get("budgets") or {}).get("memory_mb")}


def plot_footprint(build: dict, path: Path) -> dict:
    devices = list((build.get("devices") or {}).keys())
    fig, axes = _grid(len(devices) or 1)
    data = {}
    if not devices:
        axes[0].text(0.5, 0.5, "no devices", ha="center", va="center")
    for ax, name in zip(axes, devices):
        cp = candidate_points(build, name)
        data[name] = cp
        pts = cp["points"]
        if not pts:
            ax.text(0.5, 0.5, "no scored candidates", ha="center", va="center", transform=ax.transAxes)
        ok = [p for p in pts if not p["rejected"]]
        bad = [p for p in pts if p["rejected"]]
        for group, style in ((ok, dict(c="tab:blue", label="candidate (fits)")),
                             (bad, dict(c="tab:gray", marker="x", label="candidate (rejected)"))):
            if group:
                ys = [p["wer"] for p in group]
                ax.errorbar([p["x"] for p in group], ys, yerr=_yerr(ys, [p.get("wer_ci95") for p in group]),
                            fmt="none", ecolor=style["c"], elinewidth=0.6, alpha=0.5, zorder=1)
                ax.scatter([p["x"] for p in group], ys, s=22, zorder=2, **style)
        front = _pareto_2d([(p["x"], p["wer"]) for p in pts])
        if len(front) > 1:
            ax.plot([f[0] for f in front], [f[1] for f in front], "-", c="tab:orange", lw=1.2, label="Pareto front", zorder=1)
        ch = [p for p in pts if p["cid"] == cp["chosen"]]
        if ch:
            ax.scatter([ch[0]["x"]], [ch[0]["wer"]], s=140, facecolors="none", edgecolors="tab:red", lw=2,
                       label=f"chosen: {ch[0]['describe']}", zorder=3)
            real = cp.get("realised")
            if real:
                ax.scatter([real["x"]], [real["wer"]], s=90, marker="*", c="tab:red", zorder=4,
                           label=f"this build's package (test set, {real['snr']} dB)")
        closest = [p for p in pts if p["cid"] == cp.get("closest")] if not ch else []
        if closest:
            ax.scatter([closest[0]["x"]], [closest[0]["wer"]], s=140, facecolors="none", edgecolors="tab:gray", lw=2,
                       label=f"closest (does not fit): {closest[0]['describe']}", zorder=3)
        if cp["x_is_memory"] and _num(cp["budget_mb"]) is not None:
            ax.axvline(float(cp["budget_mb"]), ls="--", c="tab:red", lw=1, label="memory budget")
        ax.set_title(f"{name}" + ("" if (build["devices"][name].get("fits")) else "  (no plan fits)"), fontsize=10)
        ax.set_xlabel(cp["x_label"] + (" [predicted]" if cp["x_is_memory"] else ""), fontsize=8)
        snr_txt = ", ".join(sorted({p["snr"] for p in pts if p["snr"]}, key=float)) or "?"
        ax.set_ylabel(f"WER at {snr_txt} dB [measured, 95% bars]", fontsize=8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="best")
    fig.suptitle("Footprint vs accuracy per device (WER measured through the channel; memory predicted by the cost model)",
                 fontsize=10)
    fig.tight_layout()
    _save_fig(fig, path)
    return data


def snr_series(build: dict) -> list[dict]:
    """Lines for the SNR plots: one per distinct (chosen package, channel), + the baseline curves."""
    lines, seen = [], {}
    for name, d in (build.get("devices") or {}).items():
        c = d.get("curve")
        if not c or not c.get("snrs"):
            continue
        key = (d.get("chosen"), c.get("channel"), json.dumps(c.get("snrs")), json.dumps(c.get("wer")))
        if key in seen:
            seen[key]["devices"].append(name)
            continue
        line = {"label": d.get("describe") or d.get("chosen") or name, "devices": [name], "channel": c.get("channel"),
                "snrs": c["snrs"], "kind": "jsc", "measured": True, "n": c.get("n")}
        for m, _, _ in METRICS:
            line[m], line[f"{m}_ci95"] = c.get(m), c.get(f"{m}_ci95")
        seen[key] = line
        lines.append(line)
    base = build.get("baseline") or {}
    for ch, c in (base.get("curves") or {}).items():
        line = {"label": base.get("name", "baseline"), "devices": [], "channel": ch, "snrs": c.get("snrs") or [],
                "kind": "baseline", "measured": True, "n": c.get("n")}
        for m, _, _ in METRICS:
            line[m], line[f"{m}_ci95"] = c.get(m), c.get(f"{m}_ci95")
        lines.append(line)
    return lines


def plot_snr(build: dict, metric: str, path: Path, lines: list[dict]) -> None:
    import matplotlib.pyplot as plt

    title = dict((m, t) for m, t, _ in METRICS)[metric]
    better = dict((m, b) for m, _, b in METRICS)[metric]
    fig, ax = plt.subplots(figsize=(8.5, 5))
    drawn = 0
    for ln in lines:
        ys = ln.get(metric)
        if not ys:
            continue
        xs = [float(s) for s in ln["snrs"]]
        cis = ln.get(f"{metric}_ci95") or [None] * len(xs)
        pts = [(x, _num(y), ci) for x, y, ci in zip(xs, ys, cis) if _num(y) is not None and math.isfinite(x)]
        if not pts:
            continue
        px, py = [p[0] for p in pts], [p[1] for p in pts]
        yerr = _yerr(py, [p[2] for p in pts])
        if ln["kind"] == "baseline":
            lab = f"{ln['label']} ({ln['channel']})"
            ax.errorbar(px, py, yerr=yerr, fmt="k--", marker="s", ms=4, lw=1.5, capsize=2, label=lab)
        else:
            devs = ", ".join(ln["devices"])
            lab = f"{devs}: {ln['label']} ({ln['channel']})"
            ax.errorbar(px, py, yerr=yerr, fmt="-", marker="o", ms=4, lw=1.3, capsize=2, label=lab)
        drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, f"no {title} measurements", ha="center", va="center", transform=ax.transAxes)
    base = build.get("baseline") or {}
    if not base.get("curves"):
        ax.text(0.01, 0.01, "conventional baseline: " + (base.get("note") or "not available in this build"),
                transform=ax.transAxes, fontsize=7, color="gray")
    n = (build.get("settings") or {}).get("n_eval")
    ax.set_xlabel("SNR (dB, Es/N0 per real symbol)")
    ax.set_ylabel(f"{title} [measured, {n} test utterances, 95% bars]" if n else f"{title} [measured, 95% bars]")
    ax.set_title(f"{title} vs SNR through the channel ({better})", fontsize=10)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    _save_fig(fig, path)


def plot_latency(build: dict, path: Path) -> dict:
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    devs = list((build.get("devices") or {}).items())
    fig, ax = plt.subplots(figsize=(9, max(2.5, 0.75 * len(devs) + 1.5)))
    data, labels, y = {}, [], 0.0
    colors = {"device": "tab:blue", "link": "tab:green", "server": "tab:purple"}
    for name, d in devs:
        lat = d.get("latency") or {}
        link = _num(lat.get("link_ms_predicted")) or 0.0
        server = _num(lat.get("server_ms_host")) or 0.0
        rows = [("predicted on device", _num(lat.get("device_ms_predicted")), "//"),
                ("measured on host", _num(lat.get("device_ms_host")), "")]
        data[name] = {"device_ms_predicted": _num(lat.get("device_ms_predicted")), "device_ms_host": _num(lat.get("device_ms_host")),
                      "link_ms_predicted": link, "server_ms_host": server,
                      "latency_budget_ms": _num((d.get("budgets") or {}).get("latency_ms"))}
        for sub, dev_ms, hatch in rows:
            if dev_ms is None:
                y += 1
                labels.append((y - 1, f"{name}: {sub} (n/a)"))
                continue
            left = 0.0
            for part, v, h in (("device", dev_ms, hatch), ("link", link, "//"), ("server", server, "")):
                ax.barh(y, v, left=left, color=colors[part], hatch=h, edgecolor="white", height=0.8)
                left += v
            ax.text(left, y, f" {left:.0f} ms", va="center", fontsize=7)
            labels.append((y, f"{name}: {sub}"))
            y += 1
        budget = data[name]["latency_budget_ms"]
        if budget is not None:
            ax.plot([budget, budget], [y - 2.45, y - 0.55], c="tab:red", lw=1.5)
        y += 0.6
    ax.set_yticks([p for p, _ in labels], [t for _, t in labels], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms per message")
    handles = [Patch(color=colors["device"], label="device half (ONNX)"),
               Patch(color=colors["link"], hatch="//", label="link airtime [predicted]"),
               Patch(color=colors["server"], label="server decode [measured on host]"),
               Patch(facecolor="white", edgecolor="gray", hatch="//", label="hatched = predicted"),
               plt.Line2D([], [], c="tab:red", label="latency budget")]
    ax.legend(handles=handles, fontsize=7, loc="lower right")
    ax.set_title("Latency per message: device + link + server (device: predicted by the cost model vs measured on this host)",
                 fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    _save_fig(fig, path)
    return data


# ---------------------------------------------------------------- HTML / Markdown


def _wer_cell(r: dict) -> str:
    cis = r.get("wer_ci95_at_snr") or {}
    parts = [f"{s} dB: {_fmt_ci(w, cis.get(s))}" for s, w in r["wer_at_snr"].items()]
    return "; ".join(parts) or "–"


_HEAD_COLS = ("device", "fits", "chosen plan", "package", "predicted device latency", "WER at the device's SNRs")
_TABLE_COLS = ("device", "package bytes", "ONNX bytes", "peak RSS (host, measured)", "predicted memory (device)",
               "predicted latency (device)", "host latency p50 / p95 (measured)", "link airtime (predicted)",
               "server decode (host, measured)", "channel", "accuracy at the device's SNRs (measured)")


def _head_cells(r: dict) -> list[str]:
    fits = "yes" if r["fits"] else f"no ({r['failing_budget'] or 'budget'})"
    return [r["device"], fits, r["plan"], _mb(r["package_bytes"]), _fmt(r["predicted_latency_ms"], ".0f", " ms"), _wer_cell(r)]


def _acc_cell(r: dict) -> str:
    out = []
    for s in r["eval_snrs"]:
        a = r["accuracy"].get(_snr_key(s)) or {}
        if a:
            out.append(f"{_snr_key(s)} dB: WER {_fmt_ci(a.get('wer'), a.get('wer_ci95'))}, "
                       f"BLEU {_fmt_ci(a.get('bleu'), a.get('bleu_ci95'), '.1f')}, "
                       f"sim {_fmt_ci(a.get('similarity'), a.get('similarity_ci95'))}")
    return "; ".join(out) or "–"


def _table_cells(r: dict) -> list[str]:
    budget = f" / {_fmt(r['memory_budget_mb'], '.0f')} budget" if r["memory_budget_mb"] is not None else ""
    lb = f" / {_fmt(r['latency_budget_ms'], '.0f')} budget" if r["latency_budget_ms"] is not None else ""
    return [r["device"], _mb(r["package_bytes"]), _mb(r["onnx_bytes"]), _fmt(r["peak_rss_mb"], ".0f", " MB"),
            _fmt(r["predicted_memory_mb"], ".0f", " MB") + budget, _fmt(r["predicted_latency_ms"], ".0f", " ms") + lb,
            f"{_fmt(r['host_latency_ms_p50'], '.0f')} / {_fmt(r['host_latency_ms_p95'], '.0f')} ms",
            _fmt(r["link_ms_predicted"], ".1f", " ms"), _fmt(r["server_ms_host"], ".0f", " ms"),
            f"{r['channel'] or '–'} {r['snr_db'] or ''}", _acc_cell(r)]


_TARGET_COLS = ("device", "EP (compute unit)", "accelerator share (nodes / FLOPs; predicted)", "profile calibration",
                "predicted vs measured latency")


def _share_cell(r: dict) -> str:
    if r["ep_unit"] == "cpu":
        return "no accelerator" + ("" if r["ep"] == "CPU" else f" ({r['ep']} runs on the CPU)")
    if _num(r["ep_node_share"]) is None:
        return "–"
    return (f"{100 * r['ep_node_share']:.0f}% / {100 * r['ep_flop_share']:.0f}% on {r['ep']}, "
            f"{r['ep_boundaries']} unit boundaries")


def _check_cell(name: str, c: dict | None) -> str:
    if not c:
        return f"{name}: not measured"
    return (f"{name}: {_fmt(c['predicted_ms'], '.0f')} vs {_fmt(c['measured_ms'], '.0f')} ms "
            f"({100 * c['error']:+.0f}%)")


def _target_cells(r: dict) -> list[str]:
    ep = f"{r['ep']} ({r['ep_unit']})" if r["ep"] else "–"
    if r.get("fallback_from"):  # compress/fallback.py: the first EP ran no plan that fits
        ep += f", fallback: {r['fallback_from']} ran no plan that fits"
    cal = f"calibrated: {r['calibrated_on']}" if r["calibrated_on"] else ("uncalibrated (cost-model defaults)"
                                                                         if r["ep"] else "–")
    host = r["host_check"]
    host_cell = _check_cell("host", host) + (" (host profile uncalibrated)" if host and not host.get("calibrated_on")
                                              else "")
    checks = [_check_cell("device", r["device_check"]), host_cell] if r["device_check"] else [
        _check_cell("device", None), host_cell]
    return [r["device"], ep, _share_cell(r), cal, "; ".join(checks)]


def _html_table(cols, rows) -> str:
    h = "<table><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr></thead><tbody>"
    for cells in rows:
        h += "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>"
    return h + "</tbody></table>"


def _md_table(cols, rows) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(esc(c) for c in cells) + " |" for cells in rows]
    return "\n".join(out)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee;margin:0.5em 0}.note{color:#666;font-size:13px}
.warn{color:#a40}code{background:#f5f5f5;padding:0 3px}"""


def _assumptions(build: dict) -> list[str]:
    s = build.get("settings") or {}
    out = [
        "Measured: package bytes, host latency (ONNX Runtime, CPU, "
        f"{s.get('threads', 1)} thread(s), on {((build.get('host') or {}).get('cpu') or 'this host')}), peak RSS "
        "(fresh process), WER/BLEU/similarity through the simulated channel, server decode time on this host.",
        "Predicted: device latency and memory (roofline cost model over the device profile; see docs/profiles.md), "
        "link airtime.",
        "Link airtime = complex channel uses / symbol rate; " + (s.get("link_assumption") or
                                                                 "symbol rate = uplink Mb/s / 2 bits per complex use."),
    ]
    out.append(f"Accuracy: WER with the {build.get('normalizer') or 'basic'} text normaliser (docs/data.md); "
               "[brackets] and error bars are bootstrap 95% intervals over the test utterances "
               "(they cover the choice of utterances, not of voices or training runs).")
    out.append("Targets: the EP is the profile's first; its share of nodes and FLOPs is the cost model's partition "
               "(runtime/partition.py, predicted; docs/targets.md). Predicted vs measured: the cost model's latency "
               "over the measured p50 (error = predicted / measured - 1), on the host profile for every package "
               "(ORT, 1 thread) and on the device itself where it was measured (a device of class host).")
    if s.get("host_note"):
        out.append(s["host_note"])
    return out


def render_html(build: dict, rows: list[dict], plots: list[str]) -> str:
    e = html.escape
    title = f"semedge build report: {build.get('model', '?')}"
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>",
             f"<p class='note'>created {e(str(build.get('created', '')))} · weights {e(str(build.get('weight_hash', ''))[:12])} · "
             f"{'quick settings' if build.get('quick') else 'full settings'} · "
             f"{(build.get('settings') or {}).get('n_eval', '?')} test utterances · build took "
             f"{_fmt((build.get('timing') or {}).get('seconds'), '.0f', ' s')}</p>"]
    unfit = [r["device"] for r in rows if not r["fits"]]
    if unfit:
        parts.append(f"<p class='warn'>No plan fits the budgets of: {e(', '.join(unfit))}. "
                     "Their rows show the closest plan (not packaged unless stated).</p>")
    parts += ["<h2>Headline</h2>", _html_table(_HEAD_COLS, [_head_cells(r) for r in rows]),
              "<h2>Targets and the cost model</h2>", _html_table(_TARGET_COLS, [_target_cells(r) for r in rows])]
    captions = {
        "footprint_accuracy.png": "Footprint vs accuracy per device: every candidate plan; the Pareto front; the chosen plan circled.",
        "snr_wer.png": "WER vs SNR: one line per chosen package (devices sharing a package share a line) and the conventional baseline.",
        "snr_bleu.png": "BLEU vs SNR.",
        "snr_similarity.png": "Semantic similarity (all-MiniLM-L6-v2 cosine) vs SNR.",
        "latency_breakdown.png": "Latency breakdown per message: device half, link airtime, server decode.",
    }
    parts.append("<h2>Plots</h2>")
    for p in plots:
        parts.append(f"<figure><img src='{e(p)}' alt='{e(p)}'><figcaption class='note'>{e(captions.get(p, p))}</figcaption></figure>")
    parts += ["<h2>Per device</h2>", _html_table(_TABLE_COLS, [_table_cells(r) for r in rows])]
    notes = [r for r in rows if r.get("note")]
    if notes:
        parts.append("<ul>" + "".join(f"<li>{e(r['device'])}: {e(str(r['note']))}</li>" for r in notes) + "</ul>")
    parts.append("<h2>What is measured, what is predicted</h2><ul>"
                 + "".join(f"<li>{e(a)}</li>" for a in _assumptions(build)) + "</ul>")
    stages = build.get("stages") or {}
    if stages:
        parts.append("<h2>Stages</h2>" + _html_table(
            ("stage", "ran / skipped", "seconds"),
            [(k, "skipped (up to date)" if v.get("skipped") else "ran", _fmt(v.get("seconds"), ".1f")) for k, v in stages.items()]))
    parts.append("<p class='note'>Machine-readable: <a href='report.json'>report.json</a>, "
                 "<a href='../build.json'>build.json</a>, <a href='../plans.json'>plans.json</a>.</p></body></html>\n")
    return "\n".join(parts)


def render_md(build: dict, rows: list[dict], plots: list[str]) -> str:
    out = [f"# semedge build report: {build.get('model', '?')}", "",
           f"created {build.get('created', '')}, {(build.get('settings') or {}).get('n_eval', '?')} test utterances, "
           f"{'quick' if build.get('quick') else 'full'} settings.", ""]
    unfit = [r["device"] for r in rows if not r["fits"]]
    if unfit:
        out += [f"**No plan fits:** {', '.join(unfit)}.", ""]
    out += ["## Headline", "", _md_table(_HEAD_COLS, [_head_cells(r) for r in rows]), "",
            "## Targets and the cost model", "", _md_table(_TARGET_COLS, [_target_cells(r) for r in rows]), "",
            "## Plots", ""]
    out += [f"![{p}]({p})" for p in plots]
    out += ["", "## Per device", "", _md_table(_TABLE_COLS, [_table_cells(r) for r in rows]), "",
            "## What is measured, what is predicted", ""]
    out += [f"- {a}" for a in _assumptions(build)]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- entry point


def write_report(build_json: dict | str | Path, out_dir: str | Path) -> Path:
    """Write `out_dir/report/` (index.html, report.md, report.json, PNGs); returns the index.html path."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from semedge.core.errors import UserError

    if not isinstance(build_json, dict):
        p = Path(build_json)
        if not p.is_file():
            raise UserError(f"build file {p} does not exist", "run `semedge build` first; it writes build.json")
        try:
            build_json = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{p} is not valid JSON: {e}", "re-run `semedge build`") from None
    if not isinstance(build_json.get("devices"), dict):
        raise UserError("the build has no 'devices' object", "pass the dict semedge.pipeline.build returns (build.json)")
    rep = Path(out_dir) / "report"
    rep.mkdir(parents=True, exist_ok=True)
    if build_json.get("task", "speech") != "speech":  # a text or image build: its task's section
        from semedge.report_tasks import write_task_report

        return write_task_report(build_json, rep)
    rows = device_rows(build_json)
    foot = plot_footprint(build_json, rep / "footprint_accuracy.png")
    lines = snr_series(build_json)
    for m, _, _ in METRICS:
        plot_snr(build_json, m, rep / f"snr_{m}.png", lines)
    lat = plot_latency(build_json, rep / "latency_breakdown.png")
    plots = list(PLOTS)
    data = {"format": "semedge-report/1", "model": build_json.get("model"), "created": build_json.get("created"),
            "normalizer": build_json.get("normalizer") or "basic",
            "headline": [{k: r[k] for k in ("device", "fits", "chosen", "plan", "package_bytes", "predicted_latency_ms",
                                            "wer_at_snr", "wer_ci95_at_snr")} for r in rows],
            "devices": rows, "footprint_accuracy": foot, "snr_curves": lines, "latency_breakdown": lat,
            "assumptions": _assumptions(build_json), "plots": plots}
    write_atomic(rep / "report.json", (json.dumps(data, indent=1, default=str) + "\n").encode())
    write_atomic(rep / "report.md", render_md(build_json, rows, plots).encode())
    index = rep / "index.html"
    write_atomic(index, render_html(build_json, rows, plots).encode())
    return index
