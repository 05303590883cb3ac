"""The planner: per device, the most accurate compression plan that fits its budgets.

    plans = plan_devices("whisper-base", [load_profile("watch"), load_profile("jetson-agx-orin")],
                         out="build/plans.json")

Stages (docs/planner.md), each a function of its own module:
candidates (compress/candidates.py) → build + predict (compress/workspace.py, plan → ONNX by
compress/realise.py) → accuracy (compress/accuracy.py) → choose (compress/choose.py) →
realised check (compress/hostcheck.py).
1. Candidates: pruning x precision, and each student codec x precision (`candidate_space`),
   each built once (student/prune -> export -> quantize) and cached by content under `workdir/onnx/`.
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

import contextlib
import datetime as _dt
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from semedge.compress.accuracy import Evaluator, cheap_pass, full_pass, rank, shortlists
from semedge.compress.candidates import PRECISIONS, QUICK_PRECISIONS, Cand, candidate_space, make_candidates, precisions
from semedge.compress.choose import TIE_RULE, choose_device, fits, tie_diffs
from semedge.compress.fallback import apply_fallbacks, with_fallbacks
from semedge.compress.plan import Plan, describe, write_atomic
from semedge.compress.students import check_students, plan_codec, read_student, student_plans
from semedge.core.files import json_default
from semedge.compress.workspace import Workspace, codec_hash
from semedge.core.errors import UserError
from semedge.runtime.partition import formats_for

__all__ = ["FORMAT", "PRECISIONS", "QUICK_PRECISIONS", "TIE_RULE", "NoPlanFits", "PlannerConfig", "candidate_space",
           "codec_hash", "eval_snrs", "plan_devices", "run_planner", "tie_diffs"]

FORMAT = "semedge-plans/1"


class NoPlanFits(UserError):
    """Some requested device has no candidate that fits its budgets (plans.json still names the closest)."""

    exit_code = 3


# ---------------------------------------------------------------- configs


@dataclass(frozen=True)
class Budgets:
    """Budgets for every device, overriding the profiles' (None: the profile's)."""

    memory_mb: float | None = None
    latency_ms: float | None = None
    max_wer: float | None = None  # an accuracy budget: mean WER at the device's SNRs

    def __post_init__(self):
        for name, v in (("memory_mb", self.memory_mb), ("latency_ms", self.latency_ms)):
            if v is not None and not (isinstance(v, (int, float)) and v > 0):
                raise UserError(f"{name}={v!r} must be a positive number", f"e.g. --{name.replace('_', '-')} 64")


@dataclass(frozen=True)
class Sampling:
    """How much data each pass uses (successive halving)."""

    n_cheap: int
    n_full: int
    calib_split: str = "val"
    test_split: str = "test"
    full_share: float = 0.25  # at most this share of the candidates is evaluated in full
    shortlist: int = 2  # per device
    voices: str = "mix"  # voice families of the built-in splits (tasks.speech)
    data: str | None = None  # the user's audiofolder: calibration and host check both read it

    def __post_init__(self):
        if self.n_cheap > self.n_full:
            raise UserError(f"n_cheap={self.n_cheap} > n_full={self.n_full}", "the cheap pass uses fewer utterances than the full one")


@dataclass(frozen=True)
class PlannerConfig:
    sampling: Sampling
    budgets: Budgets = field(default_factory=Budgets)
    quick: bool = False
    workdir: Path = Path("build/planner")
    jsc: str | None = None
    threads: int = 1
    realise: bool = True  # measure the chosen plans on this host
    realise_runs: int = 20
    ray: object = None  # a compress.fanout.RaySpec: builds and evaluations as Ray tasks (None: serial)
    students: tuple = ()  # the user's student codec folders, beside the shipped ones (compress/students.py)


# ---------------------------------------------------------------- stages


def eval_snrs(snr_range, quick: bool = False) -> list[float]:
    """SNRs a device is evaluated at: its range's low end and midpoint, on a 5 dB grid (quick: low end)."""
    lo, hi = float(snr_range[0]), float(snr_range[1])
    lo5 = 5.0 * math.floor(lo / 5.0 + 1e-9)
    mid5 = 5.0 * math.floor((lo + hi) / 10.0 + 1e-9)
    return [lo5] if quick or mid5 <= lo5 else [lo5, mid5]


def check_profiles(profiles) -> list:
    profiles = list(profiles)
    if not profiles:
        raise UserError("no device profiles to plan for", "pass --profiles DIR and/or --devices a,b")
    names = [p.name for p in profiles]
    if len(set(names)) != len(names):
        raise UserError(f"device profiles repeat a name: {names}", "give each device once")
    return profiles


def device_entries(profiles, budgets: Budgets, quick: bool) -> dict[str, dict]:
    """Per device: its budgets (overrides applied), channel and the SNRs it is evaluated at."""
    devs = {}
    for prof in profiles:
        b = {"memory_mb": float(budgets.memory_mb or prof.memory_budget_mb),
             "latency_ms": float(budgets.latency_ms or prof.latency_budget_ms)}
        if budgets.max_wer is not None:
            b["wer"] = float(budgets.max_wer)
        devs[prof.name] = {"profile": prof.name, "device_class": prof.device_class, "budgets": b,
                           "ep": prof.first_ep.name, "formats": formats_for(prof),
                           "snr_db": [float(prof.link.snr_db[0]), float(prof.link.snr_db[1])],
                           "eval_snrs": eval_snrs(prof.link.snr_db, quick), "channel": prof.link.channel}
    return devs


@dataclass
class Context:
    """What every stage reads: the model, its split, the calibration data, the caches."""

    loaded: object
    split: object
    ckpt: object
    calib_utts: list
    ws: Workspace
    acc_cache: object
    segment_s: float | None = None  # user data: recordings longer than this are sent in segments


def load_context(model_source, cfg: PlannerConfig, say) -> Context:
    import torch

    from semedge.runtime.evaluate import AccuracyCache, speech_features
    from semedge.semcom.checkpoint import device_encoder, load_for_inference
    from semedge.semcom.models import load_source
    from semedge.semcom.split import build_split
    from semedge.core.segment import default_segment_s
    from semedge.runtime.evaluate import eval_utterances
    from semedge.semcom.tasks.speech import load_split

    loaded = model_source if hasattr(model_source, "weight_hash") else load_source(str(model_source))
    if not loaded.task.supports("link-eval"):
        raise UserError(f"the planner evaluates speech models; {loaded.source} is a {loaded.kind} model",
                        "plan a Whisper model (e.g. --model whisper-base)")
    receiver, ckpt = load_for_inference(loaded, cfg.jsc)
    split = build_split(receiver, ckpt.codec if ckpt is not None else None, encoder=device_encoder(ckpt))
    say(f"model {loaded.source}: k={split.k}, codec {'checkpoint ' + str(ckpt.path) if ckpt else 'identity (calibrated)'}")
    s = cfg.sampling
    calib_utts = eval_utterances(s.calib_split, s.n_full, s.voices, s.data)
    segment_s = default_segment_s(ckpt is None) if s.data else None
    train = load_split("train", 4, progress=False)
    calib = torch.from_numpy(speech_features(loaded, train))
    ws = Workspace(loaded, split, cfg.workdir, calib)
    return Context(loaded, split, ckpt, calib_utts, ws, AccuracyCache(cfg.workdir / "accuracy.json"), segment_s)


def space(loaded, cfg: PlannerConfig, plans: list[Plan] | None, profiles=()) -> list[Plan]:
    """The default candidate space (shipped students and cfg.students included), or the given plans
    with cfg.students' plans added; precisions only of the formats some profile's first EP runs."""
    formats = {f for p in profiles for f in formats_for(p)} or None
    if plans is None:
        return candidate_space(loaded, cfg.quick, cfg.students, formats)
    folders = list(dict.fromkeys(check_students(cfg.students, loaded)))
    return list(plans) + student_plans(folders, {q: PRECISIONS[q] for q in precisions(cfg.quick, formats)})


def build_candidates(builder, cands: list[Cand], profiles, devs: dict, say, on_candidate=None) -> None:
    """plan → ONNX for every candidate (cached), then the cost model's latency and memory per device.
    builder: the Workspace (serial) or a RayFanout (compress/fanout.py); both have each_built."""
    say(f"building {len(cands)} candidates (cache: {builder.dir})")
    for i, (c, secs) in enumerate(builder.each_built(cands, profiles), 1):
        n_fit = sum(fits(c, d, devs[d]["budgets"]) for d in devs)
        say(f"  [{i}/{len(cands)}] {c.cid}: {describe(c.plan)}  {c.bytes / 1e6:.1f} MB  "
            f"fits {n_fit}/{len(devs)} devices  ({secs:.0f} s)")
        if on_candidate:
            on_candidate("build", c.cid)


def choose(cands: list[Cand], devs: dict, ranked: dict, short: dict, n_cheap: int, say) -> None:
    """Fill each device entry with its choice (compress/choose.py)."""
    for d, info in devs.items():
        info.update(choose_device(d, info, cands, ranked[d], short[d], n_cheap))
        mark = info["chosen"] or f"NOTHING FITS ({info['failing_budget']} budget; closest {info['closest']})"
        say(f"device {d}: {mark}")


def plans_doc(ctx: Context, cfg: PlannerConfig, cands: list[Cand], devs: dict, timing: dict) -> dict:
    """The plans.json dict."""
    s = cfg.sampling
    return {
        "format": FORMAT, "model": ctx.loaded.source, "weight_hash": ctx.loaded.weight_hash, "task": "speech",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "codec": {"k": ctx.split.k, "hash": ctx.ws.chash, "checkpoint": str(ctx.ckpt.path) if ctx.ckpt else None},
        "calibration": {"split": s.calib_split, "n_cheap": s.n_cheap, "n_full": s.n_full, "test_split": s.test_split,
                        "voices": s.voices, "data": s.data, "quick": cfg.quick, "workdir": str(cfg.workdir)},
        "candidates": {c.cid: _cand_dict(c, ctx.split.k) for c in cands},
        "devices": devs,
        "timing": timing,
    }


def raise_if_unfit(result: dict, cands: list[Cand], out) -> None:
    """NoPlanFits (exit code 3) naming each device without a fitting plan and its closest plan."""
    devs = result["devices"]
    by_id = {c.cid: c for c in cands}
    bad = [d for d, info in devs.items() if not info["fits"]]
    if not bad:
        return
    parts = [_unfit_line(d, devs[d], by_id) for d in bad]
    err = NoPlanFits("no plan fits " + "; ".join(parts),
                     "raise the budget (--memory-mb / --latency-ms or the profile), or add smaller candidates"
                     + (f"; plans.json with the closest plans: {out}" if out else ""))
    err.result = result
    raise err


def _unfit_line(d: str, info: dict, by_id: dict[str, Cand]) -> str:
    near = info["closest"]
    if near is None:  # failing_budget "format"
        return f"{d}: no candidate is in a format {info['ep']} runs ({', '.join(info['formats'])})"
    return (f"{d}: {info['failing_budget']} budget fails; closest plan {near} "
            f"({describe(by_id[near].plan)}: {_pred_str(by_id[near].predicted[d])})")


# ---------------------------------------------------------------- the planner


def run_planner(model_source, profiles, cfg: PlannerConfig, plans: list[Plan] | None = None, out=None,
                say: Callable[[str], None] = lambda m: None, on_candidate=None) -> dict:
    """candidates → build → predict → accuracy → choose → realised check; the plans.json dict."""
    import torch

    from semedge.compress.hostcheck import check_on_host
    from semedge.runtime.evaluate import eval_utterances

    t0 = time.time()
    _quiet()
    profiles, alts = with_fallbacks(check_profiles(profiles))
    torch.set_num_threads(max(1, cfg.threads))
    ctx = load_context(model_source, cfg, say)
    plans = space(ctx.loaded, cfg, plans, profiles)
    if not plans:
        raise UserError("the candidate space is empty", "give at least one plan")
    cands = make_candidates(plans)
    devs = device_entries(profiles, cfg.budgets, cfg.quick)
    s = cfg.sampling
    with _fanout(cfg, ctx, say) as fan:  # Ray workers, or None: this process
        build_candidates(fan or ctx.ws, cands, profiles, devs, say, on_candidate)
        ev = fan or Evaluator(ctx.ws, ctx.calib_utts, ctx.acc_cache, cfg.threads, ctx.segment_s)
        cheap_pass(ev, cands, devs, s.n_cheap, say, on_candidate)
        ranked = rank(cands, devs)
        short, full = shortlists(ranked, len(cands), s.full_share, s.shortlist)
        full_pass(ev, cands, devs, short, full, s.n_full, say, on_candidate)
    choose(cands, devs, ranked, short, s.n_cheap, say)
    apply_fallbacks(devs, alts)
    for d, info in devs.items():
        if info.get("fallback"):
            say(f"device {d}: {info['chosen']} for {info['ep']} ({info['fallback']['reason']})")
    timing = {"plan_seconds": round(time.time() - t0, 1), "full_evaluations": ev.counts["full"],
              "cheap_evaluations": ev.counts["cheap"], "candidates": len(cands), "fully_evaluated": len(full),
              "fully_evaluated_share": round(len(full) / len(cands), 3), "built": ctx.ws.built,
              "accuracy_cache_hits": ctx.acc_cache.hits, "accuracy_cache_misses": ctx.acc_cache.misses}
    if cfg.realise:
        tr = time.time()
        test = ctx.calib_utts if s.data else eval_utterances(s.test_split, s.n_full, s.voices)
        check_on_host(ctx.ws, {c.cid: c for c in cands}, devs, s.data or s.test_split, test, ctx.acc_cache, cfg.threads,
                      say, runs=cfg.realise_runs, segment_s=ctx.segment_s)
        timing["realise_seconds"] = round(time.time() - tr, 1)
    timing["seconds"] = round(time.time() - t0, 1)
    result = plans_doc(ctx, cfg, cands, devs, timing)
    if out is not None:
        write_atomic(out, (json.dumps(result, indent=1, default=json_default) + "\n").encode())
    raise_if_unfit(result, cands, out)
    return result


def plan_devices(model_source, profiles, *, quick: bool = False, out=None, n_cheap: int | None = None,
                 n_full: int | None = None, candidates: list[Plan] | None = None, realise: bool = True,
                 workdir="build/planner", progress: bool = True, jsc: str | None = None,
                 memory_mb: float | None = None, latency_ms: float | None = None, max_wer: float | None = None,
                 calib_split: str = "val", test_split: str = "test", full_share: float = 0.25,
                 shortlist: int = 2, threads: int = 1, realise_runs: int | None = None,
                 voices: str = "mix", data: str | None = None, on_candidate: Callable[[str, str], None] | None = None,
                 ray=None, students=None) -> dict:
    """Plan every profile; returns the plans.json dict (written atomically to `out` when given).

    model_source: a model name/path or a LoadedModel. memory_mb / latency_ms override every
    device's budgets; max_wer adds an accuracy budget (mean WER at the device's SNRs).
    Raises NoPlanFits (exit code 3) after writing when a device has no fitting plan.
    ray: a compress.fanout.RaySpec to run builds and evaluations as Ray tasks (same results).
    students: student codec folders (compress/students.py) added to the candidates, each x the precisions.
    The keyword form of run_planner: the arguments grouped into a PlannerConfig.
    """
    check_profiles(profiles)  # before any loading: the first errors a user can make
    students = tuple(students or ())
    for p in students:
        read_student(p)  # a missing folder or a codec that is no student fails here, before any loading
    budgets = Budgets(memory_mb, latency_ms, max_wer)
    sampling = Sampling(n_cheap or (4 if quick else 8), n_full or (12 if quick else 40), calib_split, test_split,
                        full_share, shortlist, voices, None if data is None else str(data))
    cfg = PlannerConfig(sampling, budgets, quick, Path(workdir), jsc, threads, realise,
                        realise_runs or (5 if quick else 20), ray, students)
    return run_planner(model_source, profiles, cfg, candidates, out, _progress(progress), on_candidate)


# ---------------------------------------------------------------- helpers


def _fanout(cfg: PlannerConfig, ctx: Context, say):
    """The Ray fan-out (compress/fanout.py) when cfg.ray is set; else a context holding None."""
    if cfg.ray is None:
        return contextlib.nullcontext()
    from semedge.compress.fanout import RayFanout

    return RayFanout(cfg, ctx, say)


def _progress(enabled) -> Callable[[str], None]:
    if callable(enabled):
        return enabled

    def say(msg: str) -> None:
        if enabled:
            print(msg, file=sys.stderr, flush=True)

    return say


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


def _pred_str(p: dict) -> str:
    return f"predicted {p['memory_mb']:.3g} MB, {p['latency_ms']:.3g} ms"


def _cand_dict(c: Cand, k: int) -> dict:
    acc: dict[str, dict] = {}
    for key, v in c.accuracy.items():
        ch, snr = key.split("@")
        acc.setdefault(snr, {})
        acc[snr] = {**_public(v), "channel": ch} if not acc[snr] else acc[snr]
    codec = plan_codec(c.plan)
    return {"plan": c.plan.to_dict(), "describe": describe(c.plan), "plan_hash": c.plan.hash(),
            "k": codec["k"] if codec else k, "codec": codec,
            "bytes": c.bytes, "onnx": str(c.path), "optimized": c.optimized, "host": c.host, "format": c.format,
            "plain": str(c.plain) if c.plain else None,
            "predicted": c.predicted, "accuracy": acc,
            "accuracy_by_channel": {key: _public(v) for key, v in sorted(c.accuracy.items())}}


def _public(acc: dict) -> dict:
    """An accuracy entry for plans.json: per-utterance word errors stay in the cache."""
    return {k: v for k, v in acc.items() if k != "word_errors"}


