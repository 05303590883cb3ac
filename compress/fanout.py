"""The planner's builds, cost predictions and accuracy evaluations as Ray tasks (`semedge plan --ray`).

    cfg = PlannerConfig(..., ray=RaySpec(address=None, workers=2))   # run_planner fans out

Each worker is a Ray actor that loads the planner's context once (model, split, calibration
data: planner.load_context) and reads the same content-hash caches as a serial run
(WORKDIR/onnx/, costs.json, accuracy.json). Workers write the ONNX files themselves (one
file per plan hash); the fp32 exports that plans share are made first, one task per distinct
set of torch steps, so no two workers write the same file. New cost and accuracy entries go
back to the driver, which alone writes the two JSON caches. Measurements are the serial
run's: same files, same seeds, one thread each; only the timings differ. WORKDIR must be
on a disk every worker sees (one machine, or a shared filesystem on a cluster).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from semedge.compress.plan import TORCH_OPS, Plan, write_atomic
from semedge.core.errors import UserError
from semedge.compress.workspace import variants


@dataclass(frozen=True)
class RaySpec:
    """Where the planner's tasks run: a cluster to join (None: start a local one) and how many workers."""

    address: str | None = None
    workers: int = 2

    def __post_init__(self):
        if not (isinstance(self.workers, int) and self.workers >= 1):
            raise UserError(f"--ray-workers {self.workers} must be at least 1", "e.g. --ray-workers 2")


def ray_spec(ray: bool, address: str | None, workers: int | None) -> RaySpec | None:
    """The CLI's --ray/--address/--ray-workers as a RaySpec (None: serial)."""
    if not ray:
        if address or workers:
            raise UserError("--address and --ray-workers need --ray", "add --ray")
        return None
    return RaySpec(address, 2 if workers is None else workers)


class PlanWorker:
    """A Ray actor: the planner's context loaded once; exports, builds, predicts and evaluates candidates."""

    def __init__(self, source: str, cfg, weight_hash: str):
        import torch

        from semedge.compress.planner import _quiet, load_context

        _quiet()
        torch.set_num_threads(max(1, cfg.threads))
        self.cfg = cfg
        self.ctx = load_context(source, cfg, lambda m: None)
        if self.ctx.loaded.weight_hash != weight_hash:
            raise UserError(f"a Ray worker loaded {source} with other weights than the driver",
                            "plan a model every node loads the same way (a name or a path on a shared disk)")
        # the driver writes the shared costs.json; this worker's own writes go to a scratch copy
        self.ctx.ws.costs_path = Path(tempfile.mkdtemp(prefix="semedge-plan-")) / "costs.json"

    def export_base(self, plan: Plan) -> float:
        """The fp32 export of the plan's torch steps (shared by the plans that have them)."""
        from semedge.compress.realise import export_base

        t, ws = time.time(), self.ctx.ws
        export_base(lambda: ws.torch_split(plan), ws.files(plan), optimize=True)
        return time.time() - t

    def build(self, cand, profiles) -> tuple:
        """(the candidate built and predicted, 1 if its file was built, the new cost entries, seconds)."""
        t, ws = time.time(), self.ctx.ws
        built, before = ws.built, set(ws.costs)
        ws.build(cand, profiles)
        ws.predict(cand, profiles)
        return cand, ws.built - built, {k: v for k, v in ws.costs.items() if k not in before}, time.time() - t

    def evaluate(self, cand, conds: list, n: int, level: str) -> tuple:
        """(the candidate with its accuracy, counts per level, cache hits, misses, new cache entries, seconds)."""
        from semedge.compress.accuracy import Evaluator
        from semedge.runtime.evaluate import AccuracyCache

        cache = AccuracyCache(self.cfg.workdir / "accuracy.json")  # what the driver has written so far
        cache.path = None  # read-only here
        before = set(cache.data)
        ev = Evaluator(self.ctx.ws, self.ctx.calib_utts, cache, self.cfg.threads, self.ctx.segment_s)
        ((c, secs),) = ev.each([(cand, conds)], n, level)
        new = {k: v for k, v in cache.data.items() if k not in before}
        return c, ev.counts, cache.hits, cache.misses, new, secs


def portable(cfg):
    """The config with absolute paths: Ray workers do not share the driver's working folder."""
    jsc = cfg.jsc
    if jsc and Path(jsc).exists():
        jsc = str(Path(jsc).resolve())
    data = cfg.sampling.data and str(Path(cfg.sampling.data).resolve())
    return dataclasses.replace(cfg, workdir=cfg.workdir.resolve(), jsc=jsc, ray=None,
                               sampling=dataclasses.replace(cfg.sampling, data=data))


class RayFanout:
    """The driver's side: a pool of PlanWorkers; each_built and each stand in for Workspace.each_built and
    Evaluator.each, merging what workers return into the driver's candidates and caches."""

    def __init__(self, cfg, ctx, say):
        import ray
        from ray.util import ActorPool

        spec: RaySpec = cfg.ray
        self.ctx, self.dir = ctx, ctx.ws.dir
        self.counts = {"cheap": 0, "full": 0}
        self.started = not ray.is_initialized()
        if self.started:
            ray.init(address=spec.address, include_dashboard=False, logging_level=logging.WARNING,
                     **({} if spec.address else {"num_cpus": spec.workers}))
        say(f"ray: {spec.workers} planner workers on {spec.address or 'a local cluster'}")
        self.actors = []
        try:
            worker = ray.remote(num_cpus=1)(PlanWorker)
            self.actors = [worker.remote(ctx.loaded.source, portable(cfg), ctx.loaded.weight_hash)
                           for _ in range(spec.workers)]
        except BaseException:  # __exit__ will not run: stop what was started here
            self.__exit__()
            raise
        self.pool = ActorPool(self.actors)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        import ray

        for a in self.actors:
            ray.kill(a)
        if self.started:
            ray.shutdown()

    def _send(self, c):
        """A copy of the candidate whose file path a worker can open."""
        return dataclasses.replace(c, path=c.path.resolve()) if c.path is not None else c

    def each_built(self, cands: list, profiles):
        """Shared exports first, then each candidate's ONNX steps and costs; yields (candidate, seconds)."""
        bases = {Plan.make(c.plan.ops(TORCH_OPS)).hash(): c.plan for c in cands
                 if variants(c, profiles)[0] and not self._cached(c)}  # the fused exports; plain ones build in the task
        list(self.pool.map_unordered(lambda a, p: a.export_base.remote(p), list(bases.values())))
        by_id, ws = {c.cid: c for c in cands}, self.ctx.ws
        for done, built, costs, secs in self.pool.map_unordered(lambda a, c: a.build.remote(c, profiles), cands):
            c = by_id[done.cid]
            c.path, c.bytes, c.optimized, c.predicted = self.dir / done.path.name, done.bytes, done.optimized, done.predicted
            c.plain = self.dir / done.plain.name if done.plain is not None else None
            if not c.path.is_file():
                raise UserError(f"a Ray worker wrote {done.path}, which this machine does not see",
                                "put --workdir on a filesystem every node mounts, or plan without --ray")
            ws.built += built
            self._merge_costs(costs)
            yield c, secs

    def _cached(self, c) -> bool:
        f = self.ctx.ws.files(c.plan).onnx
        return f.is_file() and f.with_suffix(".json").is_file()

    def _merge_costs(self, costs: dict) -> None:
        ws = self.ctx.ws
        if costs:
            ws.costs.update(costs)
            write_atomic(ws.costs_path, json.dumps(ws.costs, sort_keys=True, indent=0).encode())

    def each(self, jobs: list, n: int, level: str):
        """Each job (candidate, [(channel, snrs)]) on a worker; yields (candidate, seconds) as each is done."""
        by_id, acc = {c.cid: c for c, _ in jobs}, self.ctx.acc_cache
        submit = lambda a, j: a.evaluate.remote(self._send(j[0]), j[1], n, level)  # noqa: E731
        for done, counts, hits, misses, new, secs in self.pool.map_unordered(submit, jobs):
            by_id[done.cid].accuracy = done.accuracy
            self.counts[level] += counts[level]
            acc.hits += hits
            acc.misses += misses
            for k, v in sorted(new.items()):
                acc.put(k, v)
            yield by_id[done.cid], secs
