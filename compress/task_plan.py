"""The planner for the text and image tasks: per device, the most accurate plan that fits its budgets.

    subj = open_subject("image", None, workdir="build/planner")
    plans = plan_task(subj, [load_profile("watch")], out="build/plans.json")

The same stages as the speech planner (compress/planner.py), on the task's device half
(compress/task_subjects.py) and its own metric:
1. candidates: precision {fp32, fp16, int8, int4} (text: x encoder pruning), each built once
   (prune -> export -> quantize), cached by plan hash under workdir/onnx/;
2. bytes are the ONNX file's size; peak memory and latency per device come from the cost
   model (runtime/costmodel.py) at the task's message size (COST_LENGTH);
3. accuracy through the link (numpy channel, runtime/evaluate.receive, the same noise for
   every candidate) at every SNR a device is evaluated at, for every candidate that fits
   some device (the spaces are small: no successive halving), cached in workdir/task_accuracy.json;
4. per device: among the plans that fit, those not significantly worse than the most accurate
   at 95% (paired bootstrap over the same examples and noise, on the task's primary metric:
   PSNR for image, similarity for text) are tied, and the least compressed wins; else the
   closest plan and NoPlanFits (exit 3) after plans.json is written;
5. the chosen graphs timed on this host (ORT, 1 thread) beside the predictions.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from semedge.compress.candidates import Cand, make_candidates
from semedge.compress.choose import closest, cond_key, fits, pareto
from semedge.compress.plan import describe, write_atomic
from semedge.compress.planner import FORMAT, Budgets, NoPlanFits, check_profiles, device_entries
from semedge.core.files import json_default

TASK_TIE_RULE = ("not significantly worse than the most accurate at 95% on the primary metric "
                 "(paired bootstrap over the same examples and noise); the least compressed tied plan wins")
ACCURACY_VERSION = 1  # bump when how a task's accuracy is computed changes (invalidates the cache)


def predict(subject, cand: Cand, profiles) -> None:
    """Bytes of the graph and the cost model's latency / memory per device, at the task's message size."""
    from semedge.runtime import costmodel

    cost = costmodel.analyze(cand.path, length=subject.length)
    cand.bytes = cand.path.stat().st_size
    for prof in profiles:
        cand.predicted[prof.name] = {
            "latency_ms": round(costmodel.predict_latency_ms(cost, prof), 3),
            "memory_mb": round(costmodel.predict_model_memory_mb(cost, prof), 2),
            "process_memory_mb": round(costmodel.predict_memory_mb(cost, prof), 2),
            "weights_mb": round(cost.weight_bytes / 1e6, 3), "activations_mb": round(cost.peak_activation_bytes / 1e6, 3)}


def _signature(path) -> tuple:
    """(op-type counts, initializer bytes) of a graph: equal for a graph a quantize step left unchanged."""
    import collections

    import onnx

    m = onnx.load(str(path))
    return (sorted(collections.Counter(n.op_type for n in m.graph.node).items()),
            sum(len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes for t in m.graph.initializer))


def drop_no_ops(subject, cands: list[Cand]) -> tuple[list[Cand], dict[str, str]]:
    """Candidates whose quantize step changed nothing in the graph (e.g. int4 with the critical layers
    kept fp32, on a CNN or a 2-layer encoder: every quantizable weight is critical) are dropped:
    they are the unquantized plan again, and would win every tie by a few bytes of metadata."""
    from semedge.compress.plan import ONNX_OPS, TORCH_OPS, Plan

    keep, dropped = [], {}
    for c in cands:
        base = subject.export_fp32(Plan.make(c.plan.ops(TORCH_OPS))) if c.plan.ops(ONNX_OPS) else None
        if base is not None and _signature(c.path) == _signature(base):
            dropped[c.cid] = "its quantize step leaves the graph as it was (every quantizable weight kept fp32)"
        else:
            keep.append(c)
    return keep, dropped


def conditions(cands: list[Cand], devs: dict) -> dict[str, set]:
    """Candidate id -> {(channel, snr)} the devices it fits are evaluated at."""
    need: dict[str, set] = {}
    for info in devs.values():
        for c in cands:
            if fits(c, info["profile"], info["budgets"]):
                need.setdefault(c.cid, set()).update((info["channel"], s) for s in info["eval_snrs"])
    return need


def summarise(subject, values: dict, n: int) -> dict:
    """One condition's figures: each metric's mean with its bootstrap 95% interval (per-example
    lists), or the corpus figure (BLEU, WER); `per_example` keeps the primary metric's values."""
    from semedge.semcom.stats import mean_ci

    out = {"n": n}
    for m in subject.metrics:
        v = values[m]
        if isinstance(v, list):
            ci = mean_ci(v)
            out[m], out[f"{m}_ci95"] = round(float(ci["value"]), 5), ci
        else:
            out[m], out[f"{m}_ci95"] = round(float(v), 5), values.get(f"{m}_ci95")
    out["per_example"] = [round(float(x), 5) for x in values[subject.metric]]
    return out


def accuracy(subject, cand: Cand, conds, n: int, cache, seed: int = 0) -> None:
    """The candidate's figures at each (channel, snr) in `conds` (cached by content), into cand.accuracy."""
    from semedge.runtime.evaluate import cache_key, receive

    inputs, refs = subject.examples(n)
    msgs = None
    for ch, snr in sorted(conds):
        key = cache_key(task_accuracy=ACCURACY_VERSION, task=subject.task, subject=subject.key, plan=cand.plan.hash(),
                        channel=ch, snr=float(snr), n=n, seed=seed)
        hit = cache.get(key)
        if hit is None:
            msgs = msgs if msgs is not None else subject.messages(cand.path, inputs)
            hit = summarise(subject, subject.score(receive(msgs, ch, snr, seed), refs), n)
            cache.put(key, hit)
        cand.accuracy[cond_key(ch, snr)] = hit


def device_score(subject, c: Cand, info: dict) -> tuple[float, list[float]]:
    """(mean primary metric over the device's SNRs, per-example values over those SNRs concatenated)."""
    accs = [c.accuracy[cond_key(info["channel"], s)] for s in info["eval_snrs"]]
    return float(np.mean([a[subject.metric] for a in accs])), [x for a in accs for x in a["per_example"]]


def choose(subject, cands: list[Cand], d: str, info: dict) -> dict:
    """The device entry's choice (TASK_TIE_RULE), why the others lost, the Pareto set."""
    from semedge.semcom.stats import paired_mean_diff

    b, m = info["budgets"], subject.metric
    ok = [c for c in cands if fits(c, d, b)]
    rejected = {c.cid: _over(c.predicted[d], b) for c in cands if c not in ok}
    pts = {c.cid: (c.bytes, c.predicted[d]["latency_ms"], -device_score(subject, c, info)[0]) for c in ok}
    out = {"metric": m, "higher_is_better": True, "tie_rule": TASK_TIE_RULE, "pareto": pareto(pts), "realised": None}
    if not ok:
        near, failing = closest(cands, d, b)
        return {**out, "fits": False, "chosen": None, "closest": near.cid, "failing_budget": failing,
                "rejected": rejected, "predicted": dict(near.predicted[d]), "score": None}
    scores = {c.cid: device_score(subject, c, info) for c in ok}
    best = max(ok, key=lambda c: (scores[c.cid][0], c.bytes))
    diffs = {c.cid: paired_mean_diff(scores[best.cid][1], scores[c.cid][1], higher_is_better=True) for c in ok}
    chosen = max((c for c in ok if not diffs[c.cid]["worse"]), key=lambda c: (c.bytes, scores[c.cid][0]))
    for c in ok:
        if c is not chosen:
            verdict = "significantly worse than the best at 95%" if diffs[c.cid]["worse"] else "tied; less compressed plan chosen"
            rejected[c.cid] = f"accuracy: {m} {scores[c.cid][0]:.3f} vs chosen {scores[chosen.cid][0]:.3f}: {verdict}"
    return {**out, "fits": True, "chosen": chosen.cid, "closest": None, "failing_budget": None, "rejected": rejected,
            "predicted": dict(chosen.predicted[d]), "score": round(scores[chosen.cid][0], 5),
            "vs_best": diffs[chosen.cid]}


def _over(p: dict, b: dict) -> str:
    why = [f"memory {p['memory_mb']:.1f} MB > budget {b['memory_mb']:g} MB" if p["memory_mb"] > b["memory_mb"] else "",
           f"latency {p['latency_ms']:.1f} ms > budget {b['latency_ms']:g} ms" if p["latency_ms"] > b["latency_ms"] else ""]
    return "; ".join(w for w in why if w) + " (predicted)"


def host_check(subject, cands: list[Cand], devs: dict, runs: int) -> None:
    """The chosen graphs on this host: ORT p50 (1 thread) at the task's message size, beside the prediction."""
    from semedge.runtime.profiler import time_onnx

    by_id = {c.cid: c for c in cands}
    measured: dict[str, dict] = {}
    for info in devs.values():
        cid = info.get("chosen")
        if cid is None:
            continue
        if cid not in measured:
            t = time_onnx(by_id[cid].path, length=subject.length, threads=1, runs=runs, warmup=1)
            measured[cid] = {"latency_ms_p50": t["p50_ms"], "cpu_p50_ms": t.get("cpu_p50_ms"), "runs": t["runs"],
                             "length": subject.length}
            by_id[cid].host = measured[cid]
        info["realised"] = {"host": measured[cid]}


def _cand_dict(c: Cand) -> dict:
    acc: dict[str, dict] = {}
    for key, v in sorted(c.accuracy.items()):
        ch, snr = key.split("@")
        acc.setdefault(snr, {**v, "channel": ch})
    return {"plan": c.plan.to_dict(), "describe": describe(c.plan), "plan_hash": c.plan.hash(), "bytes": c.bytes,
            "onnx": str(c.path), "host": c.host, "predicted": c.predicted, "accuracy": acc,
            "accuracy_by_channel": dict(sorted(c.accuracy.items()))}


def plans_doc(subject, cands: list[Cand], devs: dict, quick: bool, n: int, workdir: Path, timing: dict) -> dict:
    return {"format": FORMAT, "task": subject.task, "model": subject.source, "weight_hash": subject.weight_hash,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "codec": {"k": subject.k}, "metric": {"primary": subject.metric, "higher_is_better": True,
                                                 "all": list(subject.metrics)},
            "cost_length": {"length": subject.length, "what": f"{subject.length} x {subject.length} pixels"
                            if subject.task == "image" else f"{subject.length} tokens"},
            "calibration": {"test_split": "test", "n": n, "quick": quick, "workdir": str(workdir)},
            "candidates": {c.cid: _cand_dict(c) for c in cands}, "devices": devs, "timing": timing}


def plan_task(subject, profiles, *, quick: bool = False, out=None, n_eval: int | None = None,
              memory_mb: float | None = None, latency_ms: float | None = None, realise: bool = True,
              candidates=None, say: Callable[[str], None] = lambda m: None) -> dict:
    """Plan every profile for `subject`'s task; the plans.json dict (written atomically to `out`).
    candidates: plans to search instead of the task's space. Raises NoPlanFits (exit 3) after
    writing when some device has no fitting plan."""
    from semedge.runtime.evaluate import AccuracyCache

    t0 = time.time()
    profiles = check_profiles(profiles)
    n = n_eval or (16 if quick else 64 if subject.task == "image" else 24)
    devs = device_entries(profiles, Budgets(memory_mb, latency_ms), quick)
    cands = make_candidates(list(candidates) if candidates else subject.plans(quick))
    say(f"{subject.task}: {len(cands)} candidates on {subject.source} (k={subject.k}; cache {subject.workdir})")
    for c in cands:
        c.path = subject.build(c.plan)
        predict(subject, c, profiles)
        say(f"  {c.cid}: {describe(c.plan)}  {c.bytes / 1e6:.3f} MB")
    cands, dropped = drop_no_ops(subject, cands)
    for cid, why in dropped.items():
        say(f"  {cid}: dropped ({why})")
    cache = AccuracyCache(subject.workdir / "task_accuracy.json")
    for c in cands:
        conds = conditions(cands, devs).get(c.cid)
        if conds:
            accuracy(subject, c, conds, n, cache)
            say(f"  {c.cid}: " + ", ".join(f"{k} {subject.metric} {v[subject.metric]:.3f}" for k, v in sorted(c.accuracy.items())))
    for d, info in devs.items():
        info.update(choose(subject, cands, d, info))
        say(f"device {d}: {info['chosen'] or 'NOTHING FITS (' + str(info['failing_budget']) + ' budget)'}")
    if realise:
        host_check(subject, cands, devs, runs=5 if quick else 20)
    doc = plans_doc(subject, cands, devs, quick, n, subject.workdir, {"seconds": round(time.time() - t0, 1),
                                                                       "candidates": len(cands)})
    doc["dropped"] = dropped
    if out is not None:
        write_atomic(out, (json.dumps(doc, indent=1, default=json_default) + "\n").encode())
    _raise_if_unfit(doc, out)
    return doc


def _raise_if_unfit(doc: dict, out) -> None:
    bad = {d: i for d, i in doc["devices"].items() if not i["fits"]}
    if not bad:
        return
    parts = [f"{d}: {i['failing_budget']} budget fails; closest plan {i['closest']} (predicted "
             f"{i['predicted']['memory_mb']:.3g} MB, {i['predicted']['latency_ms']:.3g} ms)" for d, i in bad.items()]
    err = NoPlanFits("no plan fits " + "; ".join(parts), "raise the budget (--memory-mb / --latency-ms or the profile)"
                     + (f"; plans.json with the closest plans: {out}" if out else ""))
    err.result = doc
    raise err
