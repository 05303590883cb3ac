"""The planner's workspace: candidates built (plan → ONNX) and what they cost, cached by content."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import time
from pathlib import Path

from semedge.compress.candidates import Cand
from semedge.compress.plan import TORCH_OPS, Plan, write_atomic
from semedge.compress.realise import RealiseFiles, realise
from semedge.compress.targets import CPU_EPS
from semedge.runtime.partition import formats_for, needs_fixed_shapes


def sha(*parts) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()


def codec_hash(codec) -> str:
    """sha256 of the JSC codec's config and weights."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(codec.cfg), sort_keys=True).encode())
    for k, v in sorted(codec.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


COSTS_VERSION = "qdq-3"  # in each cost cache key: bump when the cost model's figures change


def variants(cand: Cand, profiles) -> tuple[bool, bool]:
    """(fused, plain): which graphs of the candidate the devices need (`profiles` None: fused only)."""
    if profiles is None:
        return True, False
    takers = [p for p in profiles if cand.format in formats_for(p)]
    plain = any(p.first_ep.name not in CPU_EPS for p in takers)
    return (not plain or any(p.first_ep.name in CPU_EPS for p in takers)), plain


def _prediction(cost, prof) -> dict:
    """The planner's prediction entry for one device: latency, memory, the EP and its share of the FLOPs."""
    from semedge.runtime import costmodel

    part = costmodel.partition_report(cost, prof)
    return {"latency_ms": round(costmodel.predict_latency_ms(cost, prof), 2),
            # the budget is for the model, measured as peak RSS minus the runtime's own
            "memory_mb": round(costmodel.predict_model_memory_mb(cost, prof), 2),
            "process_memory_mb": round(costmodel.predict_memory_mb(cost, prof), 2),
            "weights_mb": round(cost.weight_bytes / 1e6, 2),
            "activations_mb": round(cost.peak_activation_bytes / 1e6, 2),
            "ep": part["first_ep"], "ep_flop_share": part["first_ep_flop_share"],
            "unresolved_nodes": len(cost.unresolved)}


class Workspace:
    """Builds candidates and caches what they cost (ONNX files under workdir/onnx/<model key>/,
    cost-model predictions in workdir/costs.json)."""

    def __init__(self, loaded, split, workdir: Path, calib):
        self.loaded, self.split = loaded, split
        self.calib = calib  # torch tensor [N, 80, 3000]: pruning ranks on it
        self.chash = codec_hash(split.codec)
        self.mkey = sha(loaded.weight_hash, self.chash)[:16]
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

    def files(self, plan: Plan, plain: bool = False) -> RealiseFiles:
        """The plan's graph by plan hash; its fp32 export by the hash of its torch steps (shared).
        plain: the unfused graph (no ORT contrib fusions), what accelerator EPs compile."""
        tplan = Plan.make(plan.ops(TORCH_OPS))
        tag = ".plain" if plain else ""
        return RealiseFiles(self.dir / f"{plan.hash()[:20]}{tag}.onnx", self.dir / f"{tplan.hash()[:20]}.fp32{tag}.onnx")

    def build(self, cand: Cand, profiles=None) -> Path:
        """plan → ONNX (compress/realise.py), cached by plan hash: the fused graph (when parity holds) for
        devices whose first EP is a CPU EP, the plain one for accelerator EPs (`profiles` None: fused only)."""
        calib = self.calib.numpy() if hasattr(self.calib, "numpy") else self.calib
        fused, plain = variants(cand, profiles)
        for want, opt in ((plain, False), (fused, True)):  # fused last: cand.path is the fused graph when built
            if want:
                r = realise(cand.plan, lambda: self.torch_split(cand.plan), self.files(cand.plan, not opt), calib=calib,
                            optimize=opt)
                self.built += int(r.built)
                cand.path, cand.bytes, cand.optimized = r.path, r.bytes, bool(r.optimized)
                cand.plain = r.path if not opt else cand.plain
        return cand.path

    def predict(self, cand: Cand, profiles, all_formats: bool = False) -> None:
        """Cost-model latency and memory on each profile whose first EP runs the candidate's format:
        the fused graph as ORT's CPU EP runs it, or the plain graph as written on an accelerator, with
        fixed input shapes where that EP needs them (the package for it gets them: compress/targets.py).
        all_formats: every profile (the host check: ORT's CPU EP runs every format)."""
        from semedge.runtime import costmodel

        costs: dict = {}
        changed = False
        for prof in profiles:
            if not all_formats and cand.format not in formats_for(prof):
                continue
            accel = prof.first_ep.name not in CPU_EPS
            path = cand.plain if accel else cand.path
            k = sha(self.mkey, COSTS_VERSION, cand.plan.hash(), path.name, cand.bytes, prof.model_dump_json())
            if k not in self.costs:
                if accel not in costs:
                    costs[accel] = costmodel.analyze(path, as_written=accel)
                cost = dataclasses.replace(costs[accel], dynamic=costs[accel].dynamic and not needs_fixed_shapes(prof))
                self.costs[k] = _prediction(cost, prof)
                changed = True
            cand.predicted[prof.name] = dict(self.costs[k])
        if changed:
            write_atomic(self.costs_path, json.dumps(self.costs, sort_keys=True, indent=0).encode())

    def each_built(self, cands: list[Cand], profiles):
        """Build and predict each candidate in turn; yields (candidate, seconds) as each is done."""
        for c in cands:
            t = time.time()
            self.build(c, profiles)
            self.predict(c, profiles)
            yield c, time.time() - t


class LazySplit:
    """A split-like object whose torch steps run only when the server half is needed (cache misses)."""

    def __init__(self, ws: Workspace, plan: Plan):
        self._ws, self._plan = ws, plan

    @property
    def loaded(self):
        return self._ws.loaded

    @property
    def server(self):
        return self._ws.torch_split(self._plan).server
