"""Profiler: latency percentiles, peak RSS (isolated subprocess), per-op-type profile.

The ONNX part imports only numpy and onnxruntime (it runs on the device).
The PyTorch part (`profile_torch`, `torch_peak_rss`) imports torch inside.
Timing rule: PyTorch and ONNX Runtime thread pools fight over few cores, so
never alternate them call by call in one process; time each in its own block
or process.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from semedge.core.frames import N_FRAMES, N_SAMPLES
from semedge.core.errors import UserError

_ORT_NP = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def session(model_path: str | Path, threads: int = 1, providers: list[str] | None = None,
            profile_prefix: str | None = None, provider_options: list[dict] | None = None):
    """An ORT session with `threads` intra-op threads, sequential execution.

    providers without provider_options: the ones this build lacks are dropped (CPU at worst);
    with provider_options (from runtime.providers.provider_plan) they are used as given.
    """
    import onnxruntime as ort

    p = Path(model_path)
    if not p.is_file():
        raise UserError(f"{p}: no such ONNX file", "give the path to a .onnx model or a package folder")
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    if provider_options is None:
        avail = set(ort.get_available_providers())
        provs = [pr for pr in (providers or ["CPUExecutionProvider"]) if pr in avail] or ["CPUExecutionProvider"]
        provider_options = [{} for _ in provs]
    else:
        provs = list(providers)
    try:
        return ort.InferenceSession(str(p), so, providers=provs, provider_options=provider_options)
    except Exception as e:
        raise UserError(f"{p}: ONNX Runtime cannot load it with {provs[0]} ({str(e).splitlines()[0][:200]})",
                        "re-export the model, check its opset, or check the --ep options")


def input_lengths(sess) -> bool:
    """True when some input has a symbolic non-batch dim (so the input length can vary)."""
    return any(isinstance(d, str) or d is None for i in sess.get_inputs() for d in i.shape[1:])


def make_inputs(sess, length: int | None = None, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds: fixed dims kept, a symbolic first dim -> batch, other symbolic dims -> length
    (speech `frames` without a length: 3000)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in sess.get_inputs():
        dims = []
        for i, d in enumerate(inp.shape):
            if isinstance(d, int) and d > 0:
                dims.append(d)
            elif i == 0:
                dims.append(batch)
            elif d == "frames" and length is None:
                dims.append(N_FRAMES)  # speech: the worst case, a full 30 s window (as the cost model)
            elif d == "samples" and length is None:
                dims.append(N_SAMPLES)  # PCM (log-mel front end in the graph): 30 s, the same worst case
            elif length is None:
                raise UserError(f"input '{inp.name}' has a symbolic dim '{d}'", "give an input length")
            else:
                dims.append(int(length))
        dt = _ORT_NP.get(inp.type)
        if dt is None:
            raise UserError(f"input '{inp.name}' has type {inp.type}", "use float, int or bool inputs")
        if "mask" in inp.name.lower():
            feeds[inp.name] = np.ones(dims, dt)
        elif np.issubdtype(dt, np.integer):
            feeds[inp.name] = rng.integers(0, 100, size=dims).astype(dt)
        else:
            feeds[inp.name] = rng.standard_normal(dims).astype(dt)
    return feeds


def _percentiles(times_ms: list[float]) -> dict:
    a = np.asarray(times_ms)
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 4), "p95_ms": round(float(np.percentile(a, 95)), 4),
        "p99_ms": round(float(np.percentile(a, 99)), 4), "mean_ms": round(float(a.mean()), 4),
        "min_ms": round(float(a.min()), 4), "runs": int(a.size),
    }


def timed_runs(sess, feeds: dict, n: int) -> tuple[list[float], list[float]]:
    """Wall-clock and thread CPU milliseconds of `n` runs of one session."""
    wall, cpu = [], []
    for _ in range(n):
        c0, t0 = time.thread_time(), time.perf_counter()
        sess.run(None, feeds)
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.thread_time() - c0) * 1e3)
    return wall, cpu


def time_onnx(model_path, length: int | None = None, threads: int = 1, runs: int = 20, warmup: int = 3,
              providers: list[str] | None = None, sess=None) -> dict:
    """Latency percentiles of one model after `warmup` runs, over `runs` runs."""
    s = sess or session(model_path, threads, providers)
    feeds = make_inputs(s, length)
    for _ in range(max(0, warmup)):
        s.run(None, feeds)
    times, cpu = timed_runs(s, feeds, max(1, runs))
    out = _percentiles(times)
    # with 1 thread ORT computes in the calling thread: its CPU time is the latency
    # without contention from other processes (wall time includes their share)
    out["cpu_p50_ms"] = round(float(np.percentile(cpu, 50)), 4)
    out.update(threads=threads, length=length)
    return out


def _node_events(events: list[dict]) -> list[dict]:
    """ORT profile events of node kernels (one per node per run)."""
    return [ev for ev in events
            if ev.get("cat") == "Node" and str(ev.get("name", "")).endswith("_kernel_time")]


def summarize_ops(events: list[dict], top: int | None = 10) -> list[dict]:
    """Sum ORT profile node events by op type: total ms, share, node-runs and the EP(s) that ran them."""
    tot: dict[str, list] = {}
    for ev in _node_events(events):
        args = ev.get("args", {})
        d = tot.setdefault(args.get("op_name", "?"), [0.0, 0, set()])
        d[0] += ev.get("dur", 0) / 1e3
        d[1] += 1
        d[2].add(str(args.get("provider", "?")))
    total = sum(v[0] for v in tot.values()) or 1.0
    rows = [{"op": k, "ms": round(v[0], 3), "share": round(v[0] / total, 4), "count": int(v[1]),
             "providers": sorted(v[2])} for k, v in tot.items()]
    rows.sort(key=lambda r: -r["ms"])
    return rows[:top] if top else rows


def summarize_providers(events: list[dict]) -> dict[str, dict]:
    """Which EP ran which nodes, from the profile: per provider, its nodes (names), node-runs, ms, share."""
    out: dict[str, dict] = {}
    for ev in _node_events(events):
        prov = str(ev.get("args", {}).get("provider", "?"))
        d = out.setdefault(prov, {"nodes": set(), "ms": 0.0})
        d["nodes"].add(str(ev["name"]).removesuffix("_kernel_time"))
        d["ms"] += ev.get("dur", 0) / 1e3
    total = sum(d["ms"] for d in out.values()) or 1.0
    return {p: {"n_nodes": len(d["nodes"]), "nodes": sorted(d["nodes"]), "ms": round(d["ms"], 3),
                "share": round(d["ms"] / total, 4)} for p, d in out.items()}


def op_profile(model_path, length: int | None = None, threads: int = 1, runs: int = 5,
               providers: list[str] | None = None, top: int | None = 10,
               provider_options: list[dict] | None = None, with_providers: bool = False):
    """ONNX Runtime's per-operator profile of `runs` runs (after one warm-up), by op type.

    with_providers: (ops, per-EP node assignment) instead of ops alone.
    """
    with tempfile.TemporaryDirectory() as d:
        s = session(model_path, threads, providers, profile_prefix=str(Path(d) / "ort"),
                    provider_options=provider_options)
        feeds = make_inputs(s, length)
        s.run(None, feeds)
        for _ in range(runs):
            s.run(None, feeds)
        prof = s.end_profiling()
        events = json.loads(Path(prof).read_text())
    # the warm-up run is included: shares barely move
    ops = summarize_ops(events, top)
    return (ops, summarize_providers(events)) if with_providers else ops


# ---------------------------------------------------------------- peak RSS in a subprocess


def _maxrss_mb() -> float:
    """Peak RSS of this process (MB). VmHWM on Linux: ru_maxrss can carry the parent's peak over exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1e6 if sys.platform == "darwin" else r / 1024.0  # bytes on macOS, KiB on Linux


def _rss_child(args: dict) -> dict:
    base = _maxrss_mb()
    s = session(args["model"], args.get("threads", 1), args.get("providers"),
                provider_options=args.get("provider_options"))
    loaded = _maxrss_mb()
    out = {}
    for length in args.get("lengths") or [None]:
        feeds = make_inputs(s, length)
        for _ in range(2):
            s.run(None, feeds)
        out[str(length)] = round(_maxrss_mb(), 2)
    return {"baseline_mb": round(base, 2), "after_load_mb": round(loaded, 2), "peak_mb": out}


def _run_child(mode: str, args: dict, timeout: float = 600) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(args.get("threads", 1)))
    cmd = [sys.executable, "-m", "semedge.runtime.profiler", mode, json.dumps(args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"profiling subprocess failed: {last[:300]}", "run the model alone to see the error")
    return json.loads(r.stdout.strip().splitlines()[-1])


def peak_rss(model_path, lengths: list[int | None] | None = None, threads: int = 1,
             providers: list[str] | None = None, provider_options: list[dict] | None = None) -> dict:
    """Peak RSS (MB) of a fresh process that imports ORT, loads the model and runs it.

    Peaks are cumulative: lengths run in the given order, so give them ascending.
    """
    return _run_child("rss", {"model": str(model_path), "lengths": list(lengths or [None]),
                              "threads": threads, "providers": providers,
                              "provider_options": provider_options})


# ---------------------------------------------------------------- bench (on the target)


def _host_info() -> dict:
    import onnxruntime as ort

    return {"machine": platform.machine(), "system": platform.system(), "node": platform.node(),
            "cpu": _cpu_name(), "cores": _cores(), "onnxruntime": ort.__version__,
            "python": platform.python_version(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def bench_onnx(model_path, lengths: list[int | None] | None = None, runs: int = 20, warmup: int = 3,
               threads: int = 1, providers: list[str] | None = None, rss: bool = True,
               provider_options: list[dict] | None = None) -> dict:
    """Latency (p50/p95/p99) and peak RSS per input length of one ONNX model on this machine."""
    s = session(model_path, threads, providers, provider_options=provider_options)
    if lengths and not input_lengths(s):
        lengths = [None]  # fixed-shape model: one entry
    lengths = list(lengths or [None])
    rows = []
    for length in lengths:
        r = time_onnx(model_path, length, threads, runs, warmup, sess=s)
        rows.append(r)
    s_providers = s.get_providers()  # what the session registered, in order
    del s
    if rss:
        mem = peak_rss(model_path, sorted(lengths, key=lambda v: -1 if v is None else v), threads, providers,
                       provider_options)
        for r in rows:
            r["peak_rss_mb"] = mem["peak_mb"][str(r["length"])]
        base = mem["baseline_mb"]
    else:
        base = None
    return {"model": str(model_path), "threads": threads, "providers": list(s_providers),
            "provider_options": provider_options, "baseline_rss_mb": base, "host": _host_info(), "results": rows}


# ---------------------------------------------------------------- PyTorch (server half)


def profile_torch(fn, inputs: tuple, threads: int = 1, runs: int = 20, warmup: int = 3,
                  op_summary: bool = True, top: int = 10) -> dict:
    """Latency percentiles of `fn(*inputs)` under torch.inference_mode, and a per-op summary."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        with torch.inference_mode():
            for _ in range(max(0, warmup)):
                fn(*inputs)
            times = []
            for _ in range(max(1, runs)):
                t0 = time.perf_counter()
                fn(*inputs)
                times.append((time.perf_counter() - t0) * 1e3)
            out = _percentiles(times)
            out["threads"] = threads
            if op_summary:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(3):
                        fn(*inputs)
                rows = [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()]
                total = sum(r[1] for r in rows) or 1.0
                rows.sort(key=lambda r: -r[1])
                out["ops"] = [{"op": k, "ms": round(ms, 3), "share": round(ms / total, 4), "count": int(c)}
                              for k, ms, c in rows[:top]]
    finally:
        torch.set_num_threads(old)
    return out


def _torch_child(args: dict) -> dict:
    import importlib

    import torch

    torch.set_num_threads(int(args.get("threads", 1)))
    base = _maxrss_mb()
    mod, _, name = args["factory"].partition(":")
    fn, inputs = getattr(importlib.import_module(mod), name)(*args.get("args", []))
    loaded = _maxrss_mb()
    with torch.inference_mode():
        for _ in range(2):
            fn(*inputs)
    return {"baseline_mb": round(base, 2), "after_load_mb": round(loaded, 2), "peak_mb": round(_maxrss_mb(), 2)}


def torch_peak_rss(factory: str, args: list | None = None, threads: int = 1) -> dict:
    """Peak RSS of a fresh process running `factory(*args) -> (fn, inputs)` ("pkg.mod:func")."""
    return _run_child("torch-rss", {"factory": factory, "args": list(args or []), "threads": threads})


# ---------------------------------------------------------------- host measurement


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gemm_model(path: Path, m: int, k: int, n: int, kind: str) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if kind == "int8":
        a = helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])
        w = numpy_helper.from_array(rng.integers(-127, 127, (k, n)).astype(np.int8), "w")
        node = helper.make_node("MatMulInteger", ["a", "w"], ["y"])
        y = helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])
    else:
        dt, npdt = (TensorProto.FLOAT16, np.float16) if kind == "fp16" else (TensorProto.FLOAT, np.float32)
        a = helper.make_tensor_value_info("a", dt, [m, k])
        w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(npdt), "w")
        node = helper.make_node("MatMul", ["a", "w"], ["y"])
        y = helper.make_tensor_value_info("y", dt, [m, n])
    g = helper.make_graph([node], "gemm", [a], [y], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def gemm_gflops(kind: str = "fp32", threads: int = 1, m: int = 256, k: int = 1024, n: int = 1024,
                seconds: float = 1.0) -> float:
    """Best achieved GFLOP/s (GOP/s for int8) of one ORT MatMul on this machine."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"gemm_{kind}.onnx"
        _gemm_model(p, m, k, n, kind)
        s = session(p, threads)
        feeds = make_inputs(s)
        for _ in range(3):
            s.run(None, feeds)
        best, t_end = float("inf"), time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            s.run(None, feeds)
            best = min(best, time.perf_counter() - t0)
    return 2.0 * m * k * n / best / 1e9


def mem_bandwidth_gbs(mb: int = 256, reps: int = 5) -> float:
    """Copy bandwidth (read + write bytes / s) of a large numpy array, best of `reps`."""
    a = np.ones(mb * 1024 * 1024 // 8, np.float64)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.nbytes / best / 1e9


def _total_ram_mb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e6
    except (ValueError, OSError, AttributeError):
        return 4096.0


def measure_host(threads: int | None = None, seconds: float = 1.0):
    """A `host` DeviceProfile from measurements of this machine (GEMM peaks, bandwidth, cores, EPs)."""
    import onnxruntime as ort

    from semedge.runtime.profiles import EXECUTION_PROVIDERS, DeviceProfile
    from semedge.runtime.providers import canonical_ep

    cores = _cores()
    threads = int(threads or cores)
    if threads > cores:
        raise UserError(f"--threads {threads} > {cores} cores available", f"use --threads 1..{cores}")
    fp32 = gemm_gflops("fp32", threads, seconds=seconds)
    int8 = gemm_gflops("int8", threads, seconds=seconds)
    try:
        fp16 = gemm_gflops("fp16", threads, seconds=seconds)
    except UserError:  # no fp16 MatMul kernel on this CPU build
        fp16 = fp32
    bw = mem_bandwidth_gbs()
    eps = [canonical_ep(p) for p in ort.get_available_providers()]  # ORT's priority order
    eps = [e for e in eps if e in EXECUTION_PROVIDERS] or ["CPU"]
    date = _dt.date.today().isoformat()
    machine = f"{_cpu_name()}, {cores} cores, {platform.system()} {platform.machine()}"
    prof = DeviceProfile(
        name="host", device_class="host", description=f"this machine ({machine})",
        memory_budget_mb=round(_total_ram_mb() * 0.25), peak_gflops={
            "fp32": round(fp32, 2), "fp16": round(fp16, 2), "int8": round(int8, 2)},
        mem_bandwidth_gbs=round(bw, 2), cores=cores, threads=threads, execution_providers=eps,
        latency_budget_ms=1000, link={"uplink_mbps": 100, "snr_db": [10, 25], "channel": "awgn"},
        sources=[f"measured by `semedge profiles measure-host` on {date}: {machine}, onnxruntime {ort.__version__}"],
        measured_on=f"{date} {machine}",
    )
    return prof


if __name__ == "__main__":  # child modes for isolated measurements
    _mode, _args = sys.argv[1], json.loads(sys.argv[2])
    _res = _rss_child(_args) if _mode == "rss" else _torch_child(_args)
    print(json.dumps(_res))
