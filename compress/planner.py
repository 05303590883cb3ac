"""The planner: per device, the most accurate compression plan that fits its budgets.

    plans = plan_devices("whisper-base", [load_profile("watch"), load_profile("jetson-agx-orin")],
                         out="build/plans.json")

Steps (docs/planner.md):
1. Candidates: pruning x precision (`candidate_space`), each built once (prune ->
   export -> quantize) and cached by content under `workdir/onnx/`.
2. Bytes are the ONNX file's size (exact); peak memory and latency per device come
   from the cost model (runtime/costmodel.py) on that file.
3. Accuracy does not depend on the device, only on (plan, channel, SNR, data): it is
   measured through the link (runtime/evaluate.py) once per condition any device needs,
   and cached by content hash in `workdir/accuracy.json`.
   Successive halving: every candidate that fits some device gets a cheap score
   (n_cheap utterances at each such device's lowest SNR); only the best few per device
   (at most 25% of the candidates in all) are evaluated in full (n_full utterances at
   every SNR the device is evaluated at).
4. Per device: among the fully evaluated candidates that fit, those not significantly
   worse than the lowest mean WER at 95% (paired bootstrap, `tie_diffs`) are tied, and the
   least compressed of them wins; else `closest` (the plan nearest the budgets) and
   `NoPlanFits` (exit code 3), raised after plans.json is written.
5. Realised check: the chosen ONNX measured on this host (p50, peak RSS) and evaluated
   on the test split, beside the predictions.
"""

from __future__ import annotations

import datetime as _dt
import gc
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from semedge.compress.plan import TORCH_OPS, Plan, describe, write_atomic
from semedge.semcom.errors import UserError
from semedge.semcom.stats import fmt_ci, paired_wer_diff, wer_ci

FORMAT = "semedge-plans/1"

# Precisions of the device half (quantize_onnx configs; None = fp32).
PRECISIONS: dict[str, dict | None] = {
    "fp32": None,
    "fp16": {"mode": "fp16"},
    "int8": {"mode": "int8_dynamic", "other_weights": "int8"},
    "int4-b128": {"mode": "int4", "block_size": 128, "other_weights": "int8"},
    "int4-b32": {"mode": "int4", "block_size": 32, "other_weights": "int8"},
    "int4-mixed": {"mode": "int4", "block_size": 64, "keep_fp32": ["critical"]},
}
QUICK_PRECISIONS = ("fp32", "fp16", "int8", "int4-b32", "int4-mixed")


# Ties: a plan whose WER is not significantly worse than the best plan's at 95% (paired
# bootstrap over the same utterances and channel noise) is tied with it, and among tied
# plans the less compressed (a priori no less accurate) wins. Replaces fixed thresholds.
TIE_RULE = "not significantly worse than the best at 95% (paired bootstrap over the same utterances and noise)"


def _prunings(n_layers: int, quick: bool) -> dict[str, dict | None]:
    p: dict[str, dict | None] = {"dense": None, "h25f25": {"heads": 0.25, "ffn": 0.25},
                                 "h50f50": {"heads": 0.5, "ffn": 0.5}}
    if n_layers >= 4 and not quick:  # first and last layer stay, so 2 of >= 4 can go
        p["drop2"] = {"layers": round(2 / n_layers, 4)}
    return p


class NoPlanFits(UserError):
    """Some requested device has no candidate that fits its budgets (plans.json still names the closest)."""

    exit_code = 3


def candidate_space(loaded, quick: bool = False) -> list[Plan]:
    """pruning {dense, heads+ffn 25%, 50%, drop 2 layers} x precision {fp32, fp16, int8, int4 b128/b32,
    int4 with fp32 critical parts}: 24 plans for a 6-layer encoder; quick: 15.
    Distillation is not in the space: it needs training (give `candidates=` with a distill step to include it)."""
    n_layers = int(getattr(loaded.model.config, "encoder_layers", 0) or 0)
    precs = QUICK_PRECISIONS if quick else tuple(PRECISIONS)
    out = []
    for pname, pcfg in _prunings(n_layers, quick).items():
        for qname in precs:
            steps = []
            if pcfg:
                steps.append({"op": "prune", "config": pcfg})
            if PRECISIONS[qname]:
                steps.append({"op": "quantize_onnx", "config": PRECISIONS[qname]})
            out.append(Plan.make(steps, f"{pname}.{qname}"))
    return out


# ---------------------------------------------------------------- helpers


def _sha(*parts) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()


def codec_hash(codec) -> str:
    """sha256 of the JSC codec's config and weights."""
    import dataclasses

    h = hashlib.sha256(json.dumps(dataclasses.asdict(codec.cfg), sort_keys=True).encode())
    for k, v in sorted(codec.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def eval_snrs(snr_range, quick: bool = False) -> list[float]:
    """SNRs a device is evaluated at: its range's low end and midpoint, on a 5 dB grid (quick: low end)."""
    lo, hi = float(snr_range[0]), float(snr_range[1])
    lo5 = 5.0 * math.floor(lo / 5.0 + 1e-9)
    mid5 = 5.0 * math.floor((lo + hi) / 10.0 + 1e-9)
    return [lo5] if quick or mid5 <= lo5 else [lo5, mid5]


def _key(snr: float) -> str:
    return f"{snr:g}"


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def _progress(enabled) -> Callable[[str], None]:
    if callable(enabled):
        return enabled

    def say(msg: str) -> None:
        if enabled:
            print(msg, file=sys.stderr, flush=True)

    return say


@dataclass
class Cand:
    cid: str
    plan: Plan
    path: Path | None = None
    bytes: int = 0
    optimized: bool = True
    predicted: dict = field(default_factory=dict)  # device -> {"latency_ms", "memory_mb"}
    accuracy: dict = field(default_factory=dict)  # "channel@snr" -> {"wer", ..., "level"}
    host: dict | None = None


class _Workspace:
    """Builds candidates and caches what they cost (ONNX files, cost-model predictions)."""

    def __init__(self, loaded, split, workdir: Path, calib, say):
        self.loaded, self.split, self.say = loaded, split, say
        self.calib = calib  # torch tensor [N, 80, 3000]: pruning ranks on it
        self.mkey = _sha(loaded.weight_hash, codec_hash(split.codec))[:16]
        self.dir = workdir / "onnx" / self.mkey
        self.dir.mkdir(parents=True, exist_ok=True)
        self.splits: dict[str, object] = {}
        self.costs_path = workdir / "costs.json"
        try:
            self.costs = json.loads(self.costs_path.read_text()) if self.costs_path.exists() else {}
        except json.JSONDecodeError:
            self.costs = {}
        self.built = 0

    def torch_split(self, plan: Plan):
        """The split after the plan's torch steps (the server's silence encoding follows the pruned encoder)."""
        from semedge.compress.plan import apply_torch_steps

        tplan = Plan.make(plan.ops(TORCH_OPS))
        th = tplan.hash()
        if th not in self.splits:
            self.splits.clear()  # one pruned copy at a time: each is a whole model
            gc.collect()
            self.splits[th] = apply_torch_steps(self.split, tplan, self.calib) if tplan.steps else self.split
        return self.splits[th]

    def build(self, cand: Cand) -> Path:
        """prune -> export (fused when parity holds) -> quantize; cached by plan hash."""
        from semedge.compress.plan import apply_onnx_steps
        from semedge.export.onnx import ExportParityError, export_device_half

        out = self.dir / f"{cand.plan.hash()[:20]}.onnx"
        meta = out.with_suffix(".json")
        if out.exists() and meta.exists():
            cand.path, cand.bytes = out, out.stat().st_size
            cand.optimized = json.loads(meta.read_text()).get("optimized", True)
            return out
        tplan = Plan.make(cand.plan.ops(TORCH_OPS))
        base = self.dir / f"{tplan.hash()[:20]}.fp32.onnx"
        bmeta = base.with_suffix(".json")
        if not (base.exists() and bmeta.exists()):
            sp = self.torch_split(cand.plan)
            try:
                export_device_half(sp, base, optimize=True)
                opt = True
            except ExportParityError:  # the attention fusion assumes the config's head count; pruned layers differ
                export_device_half(sp, base, optimize=False)
                opt = False
            write_atomic(bmeta, json.dumps({"optimized": opt}).encode())
        opt = json.loads(bmeta.read_text())["optimized"]
        calib = self.calib.numpy() if hasattr(self.calib, "numpy") else self.calib
        apply_onnx_steps(base, out, cand.plan, calib=calib)
        write_atomic(meta, json.dumps({"optimized": opt, "plan": cand.plan.to_dict()}).encode())
        self.built += 1
        cand.path, cand.bytes, cand.optimized = out, out.stat().st_size, opt
        return out

    def predict(self, cand: Cand, profiles) -> None:
        """Cost-model latency and memory per profile (the graph analysed once per candidate)."""
        from semedge.runtime import costmodel

        cost = None
        changed = False
        for prof in profiles:
            k = _sha(self.mkey, "model-memory", cand.plan.hash(), cand.bytes, prof.model_dump_json())
            if k not in self.costs:
                cost = cost or costmodel.analyze(cand.path)
                self.costs[k] = {"latency_ms": round(costmodel.predict_latency_ms(cost, prof), 2),
                                 # the budget is for the model, measured as peak RSS minus the runtime's own
                                 "memory_mb": round(costmodel.predict_model_memory_mb(cost, prof), 2),
                                 "process_memory_mb": round(costmodel.predict_memory_mb(cost, prof), 2),
                                 "weights_mb": round(cost.weight_bytes / 1e6, 2),
                                 "activations_mb": round(cost.peak_activation_bytes / 1e6, 2)}
                changed = True
            cand.predicted[prof.name] = dict(self.costs[k])
        if changed:
            write_atomic(self.costs_path, json.dumps(self.costs, sort_keys=True, indent=0).encode())


# ---------------------------------------------------------------- the planner


def _closest(cands: list[Cand], dev: str, budgets: dict) -> tuple[Cand, str]:
    """The candidate nearest the budgets (smallest worst ratio predicted/budget) and the budget it fails."""
    def over(c):
        p = c.predicted[dev]
        return max(p["memory_mb"] / budgets["memory_mb"], p["latency_ms"] / budgets["latency_ms"])

    best = min(cands, key=lambda c: (over(c), c.bytes))
    p = best.predicted[dev]
    mem_ok = any(c.predicted[dev]["memory_mb"] <= budgets["memory_mb"] for c in cands)
    lat_ok = any(c.predicted[dev]["latency_ms"] <= budgets["latency_ms"] for c in cands)
    if not mem_ok:
        failing = "memory"
    elif not lat_ok:
        failing = "latency"
    else:  # each budget is met by some plan, not both by one: name the one the closest plan misses most
        failing = "memory" if p["memory_mb"] / budgets["memory_mb"] >= p["latency_ms"] / budgets["latency_ms"] else "latency"
    return best, failing


def _pareto(points: dict[str, tuple[float, float, float]]) -> list[str]:
    """Ids not dominated in (bytes, latency, WER), all minimised."""
    out = []
    for a, pa in points.items():
        dominated = any(all(x <= y for x, y in zip(pb, pa)) and any(x < y for x, y in zip(pb, pa))
                        for b, pb in points.items() if b != a)
        if not dominated:
            out.append(a)
    return sorted(out, key=lambda c: points[c])


def plan_devices(model_source, profiles, *, quick: bool = False, out=None, n_cheap: int | None = None,
                 n_full: int | None = None, candidates: list[Plan] | None = None, realise: bool = True,
                 workdir="build/planner", progress: bool = True, jsc: str | None = None,
                 memory_mb: float | None = None, latency_ms: float | None = None, max_wer: float | None = None,
                 calib_split: str = "val", test_split: str = "test", full_share: float = 0.25,
                 shortlist: int = 2, threads: int = 1, realise_runs: int | None = None,
                 on_candidate: Callable[[str, str], None] | None = None) -> dict:
    """Plan every profile; returns the plans.json dict (written atomically to `out` when given).

    model_source: a model name/path or a LoadedModel. memory_mb / latency_ms override every
    device's budgets; max_wer adds an accuracy budget (mean WER at the device's SNRs).
    Raises NoPlanFits (exit code 3) after writing when a device has no fitting plan.
    """
    import torch

    from semedge.runtime.evaluate import AccuracyCache, device_messages, evaluate_onnx, speech_features, trim_memory
    from semedge.semcom.checkpoint import load_for_inference
    from semedge.semcom.models import load_model
    from semedge.semcom.split import build_split
    from semedge.semcom.tasks.speech import load_split

    t0 = time.time()
    say = _progress(progress)
    _quiet()
    profiles = list(profiles)
    if not profiles:
        raise UserError("no device profiles to plan for", "pass --profiles DIR and/or --devices a,b")
    names = [p.name for p in profiles]
    if len(set(names)) != len(names):
        raise UserError(f"device profiles repeat a name: {names}", "give each device once")
    for name, v in (("memory_mb", memory_mb), ("latency_ms", latency_ms)):
        if v is not None and not (isinstance(v, (int, float)) and v > 0):
            raise UserError(f"{name}={v!r} must be a positive number", f"e.g. --{name.replace('_', '-')} 64")
    n_cheap = n_cheap or (4 if quick else 8)
    n_full = n_full or (12 if quick else 40)
    if n_cheap > n_full:
        raise UserError(f"n_cheap={n_cheap} > n_full={n_full}", "the cheap pass uses fewer utterances than the full one")
    workdir = Path(workdir)
    torch.set_num_threads(max(1, threads))

    loaded = model_source if hasattr(model_source, "weight_hash") else load_model(str(model_source))
    if loaded.kind != "speech":
        raise UserError(f"the planner evaluates speech models; {loaded.source} is a {loaded.kind} model",
                        "plan a Whisper model (e.g. --model whisper-base)")
    receiver, ckpt = load_for_inference(loaded, jsc)
    from semedge.semcom.checkpoint import device_encoder

    split = build_split(receiver, ckpt.codec if ckpt is not None else None, encoder=device_encoder(ckpt))
    say(f"model {loaded.source}: k={split.k}, codec {'checkpoint ' + str(ckpt.path) if ckpt else 'identity (calibrated)'}")

    calib_utts = load_split(calib_split, n_full, progress=False)
    train = load_split("train", 4, progress=False)
    calib = torch.from_numpy(speech_features(loaded, train))
    ws = _Workspace(loaded, split, workdir, calib, say)
    acc_cache = AccuracyCache(workdir / "accuracy.json")
    chash = codec_hash(split.codec)

    plans = list(candidates) if candidates is not None else candidate_space(loaded, quick)
    if not plans:
        raise UserError("the candidate space is empty", "give at least one plan")
    cands: list[Cand] = []
    seen = set()
    for p in plans:
        cid = p.name or p.hash()[:12]
        if cid in seen:
            cid = f"{cid}-{p.hash()[:8]}"
        seen.add(cid)
        cands.append(Cand(cid, p))

    # -- devices and their budgets
    devs = {}
    for prof in profiles:
        budgets = {"memory_mb": float(memory_mb or prof.memory_budget_mb),
                   "latency_ms": float(latency_ms or prof.latency_budget_ms)}
        if max_wer is not None:
            budgets["wer"] = float(max_wer)
        devs[prof.name] = {"profile": prof.name, "device_class": prof.device_class, "budgets": budgets,
                           "snr_db": [float(prof.link.snr_db[0]), float(prof.link.snr_db[1])],
                           "eval_snrs": eval_snrs(prof.link.snr_db, quick), "channel": prof.link.channel}

    # -- build + predict
    say(f"building {len(cands)} candidates (cache: {ws.dir})")
    for i, c in enumerate(cands, 1):
        tb = time.time()
        ws.build(c)
        ws.predict(c, profiles)
        fits = [d for d in devs if _fits(c, d, devs[d]["budgets"])]
        say(f"  [{i}/{len(cands)}] {c.cid}: {describe(c.plan)}  {c.bytes / 1e6:.1f} MB  "
            f"fits {len(fits)}/{len(devs)} devices  ({time.time() - tb:.0f} s)")
        if on_candidate:
            on_candidate("build", c.cid)

    # -- accuracy: cheap for every candidate that fits some device, at each such device's lowest SNR
    base_parts = {"weights": loaded.weight_hash, "codec": chash}
    messages: dict[str, list] = {}
    n_cheap_evals = n_full_evals = 0
    full_cids: set[str] = set()

    def evaluate(c: Cand, channel: str, snrs: list[float], n: int, level: str):
        nonlocal n_cheap_evals, n_full_evals
        utts = calib_utts[:n]
        need = [s for s in snrs if f"{channel}@{_key(s)}" not in c.accuracy
                or c.accuracy[f"{channel}@{_key(s)}"]["n"] < n]
        if not need:
            return
        def msgs():  # device outputs, kept per candidate for the next condition
            have = messages.get(c.cid, [])
            if len(have) < n:
                have = messages[c.cid] = device_messages(c.path, loaded, utts, threads)
            return have[:n]

        res = evaluate_onnx(c.path, _LazySplit(ws, c.plan), utts, channel, need, threads=threads, cache=acc_cache,
                            key_parts={**base_parts, "plan": c.plan.hash()}, messages=msgs)
        for s, r in res.items():
            c.accuracy[f"{channel}@{_key(s)}"] = {**{k: r[k] for k in ("wer", "bleu", "similarity", "n")},
                                                  "wer_ci95": r.get("wer_ci95"), "word_errors": r.get("word_errors"),
                                                  "level": level, "cached": r.get("cached", False)}
        if level == "cheap":
            n_cheap_evals += len(need)
        else:
            n_full_evals += len(need)

    cheap_need: dict[str, set] = {}
    for d, info in devs.items():
        for c in cands:
            if _fits(c, d, info["budgets"]):
                cheap_need.setdefault(c.cid, set()).add((info["channel"], info["eval_snrs"][0]))
    say(f"cheap accuracy: {len(cheap_need)} candidates x {n_cheap} utterances")
    by_id = {c.cid: c for c in cands}
    for i, cid in enumerate([c.cid for c in cands if c.cid in cheap_need], 1):
        c = by_id[cid]
        tc = time.time()
        for ch in sorted({ch for ch, _ in cheap_need[cid]}):
            evaluate(c, ch, sorted({s for cc, s in cheap_need[cid] if cc == ch}), n_cheap, "cheap")
        trim_memory()
        conds = ", ".join(f"{k} WER {v['wer']:.3f}" for k, v in sorted(c.accuracy.items()))
        say(f"  [{i}/{len(cheap_need)}] {cid}: {conds}  ({time.time() - tc:.0f} s)")
        if on_candidate:
            on_candidate("cheap", cid)

    # -- shortlists: round-robin over devices by cheap WER, at most full_share of the candidates in all
    cap = max(1, int(math.floor(full_share * len(cands) + 1e-9)))
    ranked = {}
    for d, info in devs.items():
        lo = f"{info['channel']}@{_key(info['eval_snrs'][0])}"
        feas = [c for c in cands if _fits(c, d, info["budgets"])]
        # cheap WER on a few utterances is noisy: the plans tied with the best (TIE_RULE) come
        # first, less compressed (a priori no less accurate) first; then the rest by WER
        diffs = tie_diffs({c.cid: c.accuracy[lo]["word_errors"] for c in feas},
                          {c.cid: c.accuracy[lo]["wer"] for c in feas})
        ranked[d] = sorted(feas, key=lambda c: (0, -c.bytes, 0.0) if not diffs[c.cid]["worse"]
                           else (1, c.accuracy[lo]["wer"], c.predicted[d]["latency_ms"]))
    short: dict[str, list[str]] = {d: [] for d in devs}
    for r in range(max(1, shortlist)):
        for d in devs:
            if len(ranked[d]) > r:
                cid = ranked[d][r].cid
                if cid in full_cids or len(full_cids) < cap:
                    full_cids.add(cid)
                    short[d].append(cid)
    say(f"full accuracy: {len(full_cids)} of {len(cands)} candidates x {n_full} utterances")
    for i, cid in enumerate(sorted(full_cids), 1):
        c = by_id[cid]
        tc = time.time()
        conds: dict[str, set] = {}
        for d, info in devs.items():
            if cid in short[d]:
                conds.setdefault(info["channel"], set()).update(info["eval_snrs"])
        for ch, snrs in sorted(conds.items()):
            evaluate(c, ch, sorted(snrs), n_full, "full")
        trim_memory()
        say(f"  [{i}/{len(full_cids)}] {cid}: " + ", ".join(
            f"{k} WER {v['wer']:.3f}" for k, v in sorted(c.accuracy.items()) if v["level"] == "full")
            + f"  ({time.time() - tc:.0f} s)")
        if on_candidate:
            on_candidate("full", cid)

    # -- choose per device
    for d, info in devs.items():
        b = info["budgets"]
        rejected = {}
        lo = f"{info['channel']}@{_key(info['eval_snrs'][0])}"

        def full_wer(c):
            ks = [f"{info['channel']}@{_key(s)}" for s in info["eval_snrs"]]
            if all(k in c.accuracy and c.accuracy[k]["level"] == "full" for k in ks):
                return _mean(c.accuracy[k]["wer"] for k in ks)
            return None

        ok = []
        for c in cands:
            p = c.predicted[d]
            why = []
            if p["memory_mb"] > b["memory_mb"]:
                why.append(f"memory {p['memory_mb']:.0f} MB > budget {b['memory_mb']:g} MB")
            if p["latency_ms"] > b["latency_ms"]:
                why.append(f"latency {p['latency_ms']:.0f} ms > budget {b['latency_ms']:g} ms")
            if why:
                rejected[c.cid] = "; ".join(why) + " (predicted)"
                continue
            w = full_wer(c)
            if w is None:
                best_cheap = ranked[d][0].accuracy[lo]["wer"] if ranked[d] else float("nan")
                rejected[c.cid] = (f"accuracy: cheap WER {c.accuracy[lo]['wer']:.3f} at {info['channel']} "
                                   f"{_key(info['eval_snrs'][0])} dB (n={n_cheap}) vs best {best_cheap:.3f}: not shortlisted")
                continue
            if "wer" in b and w > b["wer"]:
                rejected[c.cid] = f"accuracy: WER {w:.3f} > budget {b['wer']:g}"
                continue
            ok.append((w, p["latency_ms"], c.bytes, c.cid))
        ok.sort()
        if ok:
            # tied with the most accurate (TIE_RULE): the least compressed (largest file)
            ks = [f"{info['channel']}@{_key(s)}" for s in info["eval_snrs"]]
            errs = {o[3]: _summed_errors(by_id[o[3]], ks) for o in ok}
            diffs = tie_diffs(errs, {o[3]: o[0] for o in ok})
            best = max((o for o in ok if not diffs[o[3]]["worse"]), key=lambda o: (o[2], -o[0]))
            chosen = best[3]
            for w, _, _, cid in ok:
                if cid != chosen:
                    rejected[cid] = _tie_reason(w, best[0], diffs[cid], info["eval_snrs"])
            info.update(fits=True, chosen=chosen, closest=None, failing_budget=None, wer=round(best[0], 5),
                        wer_ci95=wer_ci(errs[chosen]), vs_best=diffs[chosen], tie_rule=TIE_RULE,
                        vs_best_by_plan={o[3]: diffs[o[3]] for o in ok})
        else:
            feasible = [c for c in cands if _fits(c, d, b)]
            if feasible:  # memory and latency are met, the accuracy budget is not
                closest = min(feasible, key=lambda c: (full_wer(c) if full_wer(c) is not None else 9e9, c.bytes))
                failing = "accuracy"
            else:
                closest, failing = _closest(cands, d, b)
            info.update(fits=False, chosen=None, closest=closest.cid, failing_budget=failing)
        pts = {c.cid: (c.bytes, c.predicted[d]["latency_ms"], c.accuracy[lo]["wer"])
               for c in cands if c.cid not in rejected or "accuracy" in rejected[c.cid] if lo in c.accuracy}
        info["pareto"] = _pareto(pts)
        info["pareto_accuracy"] = f"WER at {info['channel']} {_key(info['eval_snrs'][0])} dB (n={n_cheap}, feasible plans)"
        info["shortlist"] = short[d]
        info["rejected"] = rejected
        info["predicted"] = dict(by_id[info["chosen"] or info["closest"]].predicted[d])
        info["realised"] = None
        mark = info["chosen"] or f"NOTHING FITS ({failing} budget; closest {info['closest']})"
        say(f"device {d}: {mark}")

    timing = {"plan_seconds": round(time.time() - t0, 1), "full_evaluations": n_full_evals,
              "cheap_evaluations": n_cheap_evals, "candidates": len(cands), "fully_evaluated": len(full_cids),
              "fully_evaluated_share": round(len(full_cids) / len(cands), 3), "built": ws.built,
              "accuracy_cache_hits": acc_cache.hits, "accuracy_cache_misses": acc_cache.misses}

    # -- realised check on this host
    if realise:
        tr = time.time()
        _realise(ws, by_id, devs, loaded, test_split, n_full, acc_cache, base_parts, threads, say,
                 runs=realise_runs or (5 if quick else 20))
        timing["realise_seconds"] = round(time.time() - tr, 1)
    timing["seconds"] = round(time.time() - t0, 1)

    result = {
        "format": FORMAT, "model": loaded.source, "weight_hash": loaded.weight_hash, "task": "speech",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "codec": {"k": split.k, "hash": chash, "checkpoint": str(ckpt.path) if ckpt else None},
        "calibration": {"split": calib_split, "n_cheap": n_cheap, "n_full": n_full, "test_split": test_split,
                        "quick": quick, "workdir": str(workdir)},
        "candidates": {c.cid: _cand_dict(c, split.k) for c in cands},
        "devices": devs,
        "timing": timing,
    }
    if out is not None:
        write_atomic(out, (json.dumps(result, indent=1, default=_json_default) + "\n").encode())
    bad = [d for d, info in devs.items() if not info["fits"]]
    if bad:
        parts = [f"{d}: {devs[d]['failing_budget']} budget fails; closest plan {devs[d]['closest']} "
                 f"({describe(by_id[devs[d]['closest']].plan)}: {_pred_str(by_id[devs[d]['closest']].predicted[d])})"
                 for d in bad]
        err = NoPlanFits("no plan fits " + "; ".join(parts),
                         "raise the budget (--memory-mb / --latency-ms or the profile), or add smaller candidates"
                         + (f"; plans.json with the closest plans: {out}" if out else ""))
        err.result = result
        raise err
    return result


def _quiet() -> None:
    """ORT's 4-bit quantizer logs every node at INFO; transformers warns per generate call."""
    import logging
    import warnings

    try:
        import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401
    except ImportError:
        pass
    for name in ("onnxruntime.quantization.matmul_nbits_quantizer", "onnxruntime.quantization", "onnxruntime"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    root = logging.getLogger()  # ORT's quantizers call basicConfig(level=INFO) on the root logger
    if root.level < logging.WARNING:
        root.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")


class _LazySplit:
    """A split-like object whose torch steps run only when the server half is needed (cache misses)."""

    def __init__(self, ws: _Workspace, plan: Plan):
        self._ws, self._plan = ws, plan

    @property
    def loaded(self):
        return self._ws.loaded

    @property
    def server(self):
        return self._ws.torch_split(self._plan).server


def tie_diffs(errors: dict[str, list], wers: dict[str, float]) -> dict[str, dict]:
    """Per candidate: the paired bootstrap of its WER minus the best one's (semcom.stats.paired_wer_diff)
    on the utterances both have (a shorter list is a prefix: same utterances, same noise).
    `worse` False means tied with the best (TIE_RULE). errors: per-utterance [errors, words]."""
    if not wers:
        return {}
    best = min(wers, key=lambda cid: (wers[cid], cid))
    out = {}
    for cid, e in errors.items():
        m = min(len(e), len(errors[best]))
        out[cid] = paired_wer_diff(errors[best][:m], e[:m])
    return out


def _summed_errors(c: Cand, keys: list[str]) -> list[list[int]]:
    """Per utterance: [errors, words] summed over the conditions `keys` (its WER is the mean over them)."""
    lists = [c.accuracy[k]["word_errors"] for k in keys]
    m = min(len(x) for x in lists)
    return [[sum(x[i][0] for x in lists), sum(x[i][1] for x in lists)] for i in range(m)]


def _tie_reason(w: float, w_chosen: float, diff: dict, snrs) -> str:
    verdict = ("significantly worse than the best at 95%" if diff["worse"]
               else "tied with the best (not significantly worse at 95%); the least compressed tied plan is chosen")
    return (f"accuracy: WER {w:.3f} vs chosen {w_chosen:.3f} (full, mean over {snrs} dB); "
            f"minus the best: {fmt_ci(diff)}, {verdict}")


def _fits(c: Cand, d: str, b: dict) -> bool:
    p = c.predicted[d]
    return p["memory_mb"] <= b["memory_mb"] and p["latency_ms"] <= b["latency_ms"]


def _pred_str(p: dict) -> str:
    return f"predicted {p['memory_mb']:.3g} MB, {p['latency_ms']:.3g} ms"


def _cand_dict(c: Cand, k: int) -> dict:
    acc: dict[str, dict] = {}
    for key, v in c.accuracy.items():
        ch, snr = key.split("@")
        acc.setdefault(snr, {})
        acc[snr] = {**_public(v), "channel": ch} if not acc[snr] else acc[snr]
    return {"plan": c.plan.to_dict(), "describe": describe(c.plan), "plan_hash": c.plan.hash(), "k": k,
            "bytes": c.bytes, "onnx": str(c.path), "optimized": c.optimized, "host": c.host,
            "predicted": c.predicted, "accuracy": acc,
            "accuracy_by_channel": {key: _public(v) for key, v in sorted(c.accuracy.items())}}


def _public(acc: dict) -> dict:
    """An accuracy entry for plans.json: per-utterance word errors stay in the cache."""
    return {k: v for k, v in acc.items() if k != "word_errors"}


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _realise(ws, by_id, devs, loaded, test_split, n, acc_cache, base_parts, threads, say, runs) -> None:
    """Measure each chosen ONNX on this host and evaluate it on the test split; fill devices[d]["realised"]."""
    from semedge.runtime.evaluate import evaluate_onnx
    from semedge.runtime.profiler import peak_rss, time_onnx
    from semedge.semcom.tasks.speech import load_split

    test = load_split(test_split, n, progress=False)
    for d, info in devs.items():
        if not info["chosen"]:
            continue
        c = by_id[info["chosen"]]
        if c.host is None:
            say(f"realised: measuring {c.cid} on this host ({runs} runs, peak RSS in a fresh process)")
            lat = time_onnx(c.path, threads=threads, runs=runs, warmup=1)
            rss = peak_rss(c.path, threads=threads)
            peak = max(rss["peak_mb"].values())
            c.host = {"latency_ms_p50": lat["p50_ms"], "cpu_ms_p50": lat.get("cpu_p50_ms"), "peak_rss_mb": peak,
                      "baseline_rss_mb": rss["baseline_mb"],
                      "model_rss_mb": round(peak - rss["baseline_mb"], 2), "threads": threads, "runs": runs}
        res = evaluate_onnx(c.path, _LazySplit(ws, c.plan), test, info["channel"], info["eval_snrs"], threads=threads,
                            cache=acc_cache, key_parts={**base_parts, "plan": c.plan.hash()})
        host_pred = _host_prediction(ws, c)
        p = c.predicted[d]
        info["realised"] = {
            "plan": c.cid, "bytes": c.bytes, "host_latency_ms_p50": c.host["latency_ms_p50"],
            "host_cpu_ms_p50": c.host["cpu_ms_p50"], "peak_rss_mb": c.host["peak_rss_mb"],
            "model_rss_mb": c.host["model_rss_mb"], "predicted_latency_ms": p["latency_ms"],
            "predicted_memory_mb": p["memory_mb"], "host_predicted": host_pred,
            "fits_memory_measured": c.host["model_rss_mb"] <= info["budgets"]["memory_mb"],
            "wer": {_key(s): r["wer"] for s, r in res.items()},
            "wer_ci95": {_key(s): r.get("wer_ci95") for s, r in res.items()},
            "wer_calibration": {_key(s): c.accuracy.get(f"{info['channel']}@{_key(s)}", {}).get("wer")
                                for s in info["eval_snrs"]},
            "test_split": test_split, "n": len(test), "package": None,
        }
        say(f"realised {d}: {c.cid} {c.bytes / 1e6:.1f} MB, host p50 {c.host['latency_ms_p50']:.0f} ms, "
            f"model RSS {c.host['model_rss_mb']:.0f} MB (budget {info['budgets']['memory_mb']:g}), "
            f"test WER {info['realised']['wer']}")


def _host_prediction(ws, c: Cand) -> dict | None:
    """The cost model's prediction for this host (the `host` profile), beside the host measurement."""
    try:
        from semedge.runtime.profiles import load_profile

        host = load_profile("host")
    except UserError:
        return None
    probe = Cand(c.cid, c.plan, c.path, c.bytes)  # a copy: a device may itself be named "host"
    ws.predict(probe, [host])
    return probe.predicted["host"]
