"""The report's section for a text or image build (`semedge build --task text|image`).

semedge.report.write_report calls `write_task_report` for a build record whose `task` is not
speech; it writes under out/report/:

    index.html, report.md, report.json   the task's section: its metric at the device's SNRs, per device
    task_snr.png                         the metric vs SNR per chosen package, + the task's baseline
    task_footprint.png                   every candidate: bytes vs the metric, per planner condition
    task_latency.png                     device (host-measured and predicted) and link (predicted) per device
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from semedge.core.files import write_atomic
from semedge.report import _CSS, _fmt, _html_table, _md_table, _mb, _save_fig
from semedge.semcom.stats import fmt_ci

PLOTS = ("task_snr.png", "task_footprint.png", "task_latency.png")
NAMES = {"psnr": "PSNR (dB)", "ssim": "SSIM", "similarity": "semantic similarity", "bleu": "BLEU", "wer": "WER"}
COLS = ("device", "fits", "plan", "package", "precision", "metric at the device's SNRs [95% CI]",
        "device latency: host p50 (measured) / device (predicted)", "peak RSS (host, measured)",
        "predicted model memory (device; the budget's measure)", "link airtime (predicted)")


def _metric(build: dict) -> str:
    return (build.get("metric") or {}).get("primary") or "psnr"


def _acc_cell(r: dict, m: str) -> str:
    parts = []
    for s, a in (r.get("accuracy") or {}).items():
        ci = a.get(f"{m}_ci95")
        parts.append(f"{a.get('channel', r['channel'])} {s} dB: " + (fmt_ci(ci) if ci else _fmt(a.get(m))))
    return "; ".join(parts) or "–"


def row_cells(name: str, r: dict, m: str) -> list[str]:
    pkg, host, pred, lat = r.get("package") or {}, r.get("host") or {}, r.get("predicted") or {}, r.get("latency") or {}
    return [name, "yes" if r["fits"] else f"no ({r.get('failing_budget')})", r.get("describe") or "–",
            _mb(pkg.get("bytes")) if pkg else "not built", pkg.get("precision") or "–", _acc_cell(r, m),
            f"{_fmt(host.get('latency_ms_p50'), '.2f', ' ms')} / {_fmt(pred.get('latency_ms'), '.2f', ' ms')}",
            _fmt(host.get("peak_rss_mb"), ".0f", " MB"), _fmt(pred.get("model_memory_mb", pred.get("memory_mb")), ".0f", " MB"),
            _fmt(lat.get("link_ms_predicted"), ".2f", " ms")]


def plot_snr(build: dict, path: Path) -> list[dict]:
    """The metric vs SNR per chosen package (error bars: 95% CI) and the baseline per channel."""
    import matplotlib.pyplot as plt

    m = _metric(build)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    lines = []
    for name, r in build["devices"].items():
        c = r.get("curve")
        if not c:
            continue
        cis = c.get(f"{m}_ci95") or [None] * len(c["snrs"])
        err = [[v - ci["ci95"][0] if ci else 0 for v, ci in zip(c[m], cis)], [ci["ci95"][1] - v if ci else 0 for v, ci in zip(c[m], cis)]]
        ax.errorbar(c["snrs"], c[m], yerr=err, marker="o", capsize=3, label=f"{name}: {r.get('describe')} ({c['channel']})")
        lines.append({"device": name, "channel": c["channel"], "snrs": c["snrs"], m: c[m]})
    for ch, b in ((build.get("baseline") or {}).get("curves") or {}).items():
        if m in b:
            ax.plot(b["snrs"], b[m], "k--", marker="s", label=f"{b.get('name', 'baseline')} ({ch})")
            lines.append({"baseline": b.get("name"), "channel": ch, "snrs": b["snrs"], m: b[m]})
    _finish(fig, ax, path, "SNR (dB)", NAMES.get(m, m) + " (measured)", bool(lines))
    return lines


def plot_footprint(build: dict, path: Path) -> list[dict]:
    """Every candidate: ONNX bytes vs the metric, one series per planner condition (channel@SNR)."""
    import matplotlib.pyplot as plt

    m = _metric(build)
    pts = [{"candidate": cid, "bytes": c["bytes"], "condition": cond, m: a[m]}
           for cid, c in (build.get("plans") or {}).get("candidates", {}).items()
           for cond, a in (c.get("accuracy_by_channel") or {}).items()]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for cond in sorted({p["condition"] for p in pts}):
        sel = [p for p in pts if p["condition"] == cond]
        ax.scatter([p["bytes"] / 1e6 for p in sel], [p[m] for p in sel], label=cond)
        for p in sel:
            ax.annotate(p["candidate"], (p["bytes"] / 1e6, p[m]), fontsize=6)
    _finish(fig, ax, path, "device graph (MB, measured)", NAMES.get(m, m) + " (measured)", bool(pts))
    return pts


def _finish(fig, ax, path: Path, xlabel: str, ylabel: str, legend: bool) -> None:
    """Labels, grid, the legend outside the axes when there is something to name, then save."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    _save_fig(fig, path)


def plot_latency(build: dict, path: Path) -> list[dict]:
    """Per packaged device: the device half (host-measured, device-predicted) and the link airtime (predicted)."""
    import matplotlib.pyplot as plt

    rows = [{"device": n, **r["latency"]} for n, r in build["devices"].items() if r.get("latency")]
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.5 * max(1, len(rows))))
    for i, r in enumerate(rows):
        ax.barh(i - 0.2, r["device_ms_host"], 0.4, color="tab:blue", label="device, host (measured)" if i == 0 else None)
        ax.barh(i + 0.2, r["device_ms_predicted"], 0.4, color="tab:orange", label="device (predicted)" if i == 0 else None)
        ax.barh(i + 0.2, r["link_ms_predicted"], 0.4, left=r["device_ms_predicted"], color="tab:green",
                label="link airtime (predicted)" if i == 0 else None)
    ax.set_yticks(range(len(rows)), [r["device"] for r in rows])
    ax.set_xlabel("ms per message")
    if rows:
        ax.legend(fontsize=7)
    _save_fig(fig, path)
    return rows


def _notes(build: dict) -> list[str]:
    m, cl = _metric(build), build.get("cost_length") or {}
    b = build.get("baseline") or {}
    tie = next((i.get("tie_rule") for i in ((build.get("plans") or {}).get("devices") or {}).values() if i.get("tie_rule")), "")
    out = [f"Task {build['task']}: primary metric {NAMES.get(m, m)} (higher is better); the planner's tie rule: {tie}.",
           f"Measured: package bytes, host latency and peak RSS (ORT, 1 thread) at {cl.get('what', '?')} per message, "
           f"the metric through the simulated channel on {(build.get('settings') or {}).get('n_eval')} test examples; "
           "[brackets] and error bars: bootstrap 95% intervals over those examples.",
           "Predicted: device latency and memory (cost model over the device profile, at the same message size), link airtime "
           f"({(build.get('settings') or {}).get('link_assumption', '')}).",
           "Baseline: " + (", ".join(f"{v.get('name')} ({ch}, {v.get('channel_uses_per_patch')} channel uses per 32 x 32 patch, "
                                      "as the codec)" for ch, v in (b.get("curves") or {}).items()) or b.get("note") or "none")]
    return out


def render_html(build: dict, name_rows: list, plots) -> str:
    e, m = html.escape, _metric(build)
    title = f"semedge build report: {build['task']} task ({build.get('model')})"
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>",
             f"<h2>Task: {e(build['task'])}</h2>", _html_table(COLS, [row_cells(n, r, m) for n, r in name_rows])]
    parts += [f"<figure><img src='{e(p)}' alt='{e(p)}'></figure>" for p in plots]
    parts.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in _notes(build)) + "</ul>")
    parts += [f"<p class='note'>{e(n)}: {e(str(r['note']))}</p>" for n, r in name_rows if r.get("note")]
    parts.append("<p class='note'><a href='report.json'>report.json</a> · <a href='../build.json'>build.json</a></p></body></html>\n")
    return "\n".join(parts)


def render_md(build: dict, name_rows: list, plots) -> str:
    m = _metric(build)
    out = [f"# semedge build report: {build['task']} task ({build.get('model')})", "", f"## Task: {build['task']}", "",
           _md_table(COLS, [row_cells(n, r, m) for n, r in name_rows]), ""]
    out += [f"![{p}]({p})" for p in plots] + [""] + [f"- {n}" for n in _notes(build)]
    return "\n".join(out) + "\n"


def write_task_report(build: dict, rep: Path) -> Path:
    """rep/index.html, report.md, report.json and the task's plots; the index path."""
    name_rows = list(build["devices"].items())
    data = {"format": "semedge-report/1", "task": build["task"], "model": build.get("model"), "metric": _metric(build),
            "snr_curves": plot_snr(build, rep / PLOTS[0]), "footprint_accuracy": plot_footprint(build, rep / PLOTS[1]),
            "latency": plot_latency(build, rep / PLOTS[2]), "plots": list(PLOTS),
            "devices": [dict(zip(COLS, row_cells(n, r, _metric(build)))) for n, r in name_rows]}
    write_atomic(rep / "report.json", (json.dumps(data, indent=1, default=str) + "\n").encode())
    write_atomic(rep / "report.md", render_md(build, name_rows, PLOTS).encode())
    write_atomic(rep / "index.html", render_html(build, name_rows, PLOTS).encode())
    return rep / "index.html"
