"""The edge server: JSC decoder + the model's decoder behind HTTP (FastAPI + uvicorn).

Packages of every task (speech, text, image) are served side by side: the request names
the package, the package's manifest names its task (model.kind). One model object per
model source (+ LoRA adapters) is shared by every package built on it; an image
package's CNN decoder is shared by sha256 (semcom/image_server.py); each package brings
its own JSC decoder (core.layout: JSC_WEIGHTS + JSC_CONFIG).
Requests for one package are batched dynamically: an asyncio queue per package,
up to `max_batch` messages or `max_wait_ms` after the first, decoded in one
`ServerHalf.transcribe` call on the model's decode thread.

API (docs/runtime.md): POST /v1/decode?package=ID[&task=T][&height=H&width=W] with a .npy
body ([tokens, k] or [batch, tokens, k], float16/float32) -> JSON (text, or images as
base64 PNG); GET /healthz; GET /metrics (Prometheus text).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import Request  # module level: endpoint annotations are resolved by name

from semedge.core.errors import UserError
from semedge.core.layout import ADAPTERS, JSC_CONFIG, JSC_WEIGHTS, MANIFEST
from semedge.runtime.auth import AuthError
from semedge.runtime.decode_api import NPY_MAGIC, HTTPError, ReplayCache, decode_texts, handle_decode, parse_npy
from semedge.runtime.decode_api import IMAGE_TASK, MAX_IMAGE_TOKENS
from semedge.runtime.package import Package

log = logging.getLogger("semedge.server")

_LAT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class ServerConfig:
    max_body_bytes: int = 8 * 1024 * 1024  # larger bodies get 413
    max_batch: int = 8  # messages decoded together
    max_wait_ms: float = 20.0  # how long the first message of a batch waits for company
    max_messages_per_request: int = 32
    max_queue: int = 512  # queued messages per package before 503
    replay_ttl_s: float = 300.0  # answers kept by message id, so a retried message is not decoded twice
    max_new_tokens: int = 96
    max_text_tokens: int = 1024
    backend: str = "auto"  # decoder: "ct2" (CTranslate2; Whisper), "torch", or "auto" (ct2 for Whisper, else torch)
    compute_type: str = "int8"  # CTranslate2 weights: int8 or float32
    workers: int = 1  # batches decoded at the same time (CTranslate2 replicas; torch: threads sharing one model)
    threads: int = 1  # CPU threads per batch (CTranslate2 intra_threads)
    memory: str | None = None  # session memory rule (semcom/memory.py: fifo, fresh, value, corr, sums); None: no sessions
    memory_items: int = 8  # items per session memory
    memory_bytes: int = 4096  # text bytes per session memory
    max_sessions: int = 1024  # sessions kept (least recently used go first)
    session_idle_s: float = 900.0  # a session idle this long is forgotten
    kb: str | None = None  # knowledge-base folder (semcom/kb.py): passages retrieved into every prompt
    kb_passages: int = 2  # passages per message
    context_guard: bool = False  # answer the unprompted decode when the prompted one ran on or copied the prompt
    drain_s: float = 30.0  # on SIGTERM: how long accepted requests may take to finish before they are cut off

    def __post_init__(self):
        if self.backend not in ("auto", "ct2", "torch"):
            raise UserError(f"backend {self.backend!r} is unknown", "use auto, ct2 or torch")
        if self.compute_type not in ("int8", "float32"):
            raise UserError(f"compute type {self.compute_type!r} is unknown", "use int8 or float32")
        if self.workers < 1 or self.threads < 1:
            raise UserError("workers and threads must be >= 1", "e.g. --workers 2 --threads 1 on a 2-core host")
        if self.memory is not None:
            self.memory_config()  # a bad rule or bound fails at startup
        if self.kb_passages < 1:
            raise UserError(f"kb_passages={self.kb_passages} must be >= 1", "e.g. 2 passages per message")
        if not self.drain_s > 0:
            raise UserError(f"drain_s={self.drain_s} must be > 0", "e.g. --drain-s 30")

    def memory_config(self):
        from semedge.semcom.memory import MemoryConfig

        return MemoryConfig(rule=self.memory, max_items=self.memory_items, max_bytes=self.memory_bytes)


# ----------------------------------------------------------------------------- metrics


class Metrics:
    """Counters and histograms, rendered in the Prometheus text format (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.hist: dict[str, dict] = {}
        self.batch_sizes: dict[int, int] = {}

    def count(self, package: str, status: int) -> None:
        with self._lock:
            key = (package, status)
            self.requests[key] = self.requests.get(key, 0) + 1

    def observe(self, name: str, package: str, seconds: float) -> None:
        with self._lock:
            h = self.hist.setdefault(name, {}).setdefault(package, {"buckets": [0] * len(_LAT_BUCKETS), "sum": 0.0, "count": 0})
            for i, b in enumerate(_LAT_BUCKETS):
                if seconds <= b:
                    h["buckets"][i] += 1
            h["sum"] += seconds
            h["count"] += 1

    def batch(self, size: int) -> None:
        with self._lock:
            self.batch_sizes[size] = self.batch_sizes.get(size, 0) + 1

    def render(self) -> str:
        with self._lock:
            out = ["# HELP semedge_requests_total Decode requests by package and HTTP status.",
                   "# TYPE semedge_requests_total counter"]
            for (pkg, status), n in sorted(self.requests.items()):
                out.append(f'semedge_requests_total{{package="{pkg}",status="{status}"}} {n}')
            helps = {"semedge_decode_seconds": "Time to decode one batch (JSC decoder + generation).",
                     "semedge_queue_seconds": "Time a message waited before its batch started.",
                     "semedge_request_seconds": "Time from a request's arrival to its answer."}
            for name in sorted(self.hist):
                out += [f"# HELP {name} {helps.get(name, name)}", f"# TYPE {name} histogram"]
                for pkg, h in sorted(self.hist[name].items()):
                    for b, c in zip(_LAT_BUCKETS, h["buckets"]):
                        out.append(f'{name}_bucket{{package="{pkg}",le="{b}"}} {c}')
                    out.append(f'{name}_bucket{{package="{pkg}",le="+Inf"}} {h["count"]}')
                    out.append(f'{name}_sum{{package="{pkg}"}} {h["sum"]:.6f}')
                    out.append(f'{name}_count{{package="{pkg}"}} {h["count"]}')
            out += ["# HELP semedge_batch_size_total Decoded batches by size (messages per batch).",
                    "# TYPE semedge_batch_size_total counter"]
            for size, n in sorted(self.batch_sizes.items()):
                out.append(f'semedge_batch_size_total{{size="{size}"}} {n}')
            out.append("# HELP semedge_batch_size_max Largest batch decoded so far.")
            out.append("# TYPE semedge_batch_size_max gauge")
            out.append(f"semedge_batch_size_max {max(self.batch_sizes, default=0)}")
            return "\n".join(out) + "\n"


class Drain:
    """Decode requests accepted (handler entered) and answered (handler returned), for the SIGTERM
    drain: uvicorn stops listening, lets accepted requests finish, then the batchers stop.
    Touched only on the event loop (and `signalled` in its signal handler): no lock."""

    def __init__(self):
        self.accepted = self.answered = self.cut_off = 0
        self.in_flight_at_signal: int | None = None

    @contextlib.contextmanager
    def track(self):
        self.accepted += 1
        try:
            yield
        except BaseException:  # cancelled (drain timeout) or raised (a bug): not answered here
            self.cut_off += 1
            raise
        self.answered += 1

    def signalled(self) -> None:
        if self.in_flight_at_signal is None:
            self.in_flight_at_signal = self.accepted - self.answered - self.cut_off

    def summary(self) -> dict:
        return {"in_flight_at_signal": self.in_flight_at_signal, "accepted": self.accepted,
                "answered": self.answered, "cut_off": self.cut_off}


# ----------------------------------------------------------------------------- models


def load_jsc_decoder(pkg: Package):
    """The package's JSC decoder (torch) from JSC_CONFIG + JSC_WEIGHTS (server/jsc.json, .safetensors)."""
    import dataclasses

    from safetensors.torch import load_file

    from semedge.semcom.jsc import JSCConfig, JSCDecoder

    fix = "re-export the package (semedge export ...)"
    cfg_d = {"d_model": pkg.d_model, "k": pkg.k, "identity": pkg.identity}
    if "hidden" in pkg.manifest["jsc"]:
        cfg_d["hidden"] = pkg.manifest["jsc"]["hidden"]
    if pkg.has(JSC_CONFIG):
        try:
            raw = json.loads(pkg.file(JSC_CONFIG).read_text())
        except ValueError as e:
            raise UserError(f"package {pkg.path}: {JSC_CONFIG} is not valid JSON ({e})", fix) from None
        raw = raw.get("config", raw) if isinstance(raw, dict) else {}
        names = {f.name for f in dataclasses.fields(JSCConfig)}
        cfg_d.update({k: v for k, v in raw.items() if k in names})
    cfg = JSCConfig(**cfg_d)
    if cfg.k != pkg.k or cfg.d_model != pkg.d_model:
        raise UserError(f"package {pkg.path}: {JSC_CONFIG} (k={cfg.k}, d_model={cfg.d_model}) disagrees with "
                        f"{MANIFEST} (k={pkg.k}, d_model={pkg.d_model})", fix)
    dec = JSCDecoder(cfg)
    if pkg.has(JSC_WEIGHTS):
        state = load_file(str(pkg.file(JSC_WEIGHTS)))
        if any(k.startswith("decoder.") for k in state):
            state = {k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.")}
        try:
            dec.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise UserError(f"package {pkg.path}: {JSC_WEIGHTS} does not fit the JSC decoder ({e})", fix) from None
    elif not cfg.identity:
        raise UserError(f"package {pkg.path} has no {JSC_WEIGHTS} (needed for a learned JSC)", fix)
    return dec.eval()


@dataclass
class _Model:
    loaded: object
    silence: object  # torch [1500, d] or None
    executor: ThreadPoolExecutor  # `workers` decode threads per model
    ct2: object = None  # CT2Whisper shared by the packages on this model, or None (torch)


def _adapters_of(pkg: Package):
    """(sha256, LoRASpec, qlora) of the package's decoder adapters, or None."""
    if not pkg.has(ADAPTERS):
        return None
    from semedge.semcom.training.config import LoRASpec

    meta = json.loads(pkg.file(JSC_CONFIG).read_text())
    lo = meta.get("lora")
    if not isinstance(lo, dict):
        raise UserError(f"package {pkg.path} has {ADAPTERS} but no LoRA settings in {JSC_CONFIG}",
                        "re-export the package (semedge export --jsc CKPT ...)")
    return pkg.manifest["files"][ADAPTERS], LoRASpec.from_dict(lo), bool(meta.get("qlora"))


@dataclass
class _Served:
    package: Package
    half: object  # ServerHalf (speech, text) or ImageServerHalf (image)
    max_tokens: int
    model: _Model
    task: str = "speech"  # the manifest's model.kind
    queue: asyncio.Queue | None = None
    worker: asyncio.Task | None = None
    stats: dict = field(default_factory=dict)


class Registry:
    """Packages being served, with one shared model per model source."""

    def __init__(self, packages: list[Package], loader=None, config: ServerConfig | None = None, *, lazy: bool = False):
        """lazy: no packages now (a Ray replica loads each with load() when first asked for it)."""
        self.loader = loader or default_loader
        self.config = config or ServerConfig()
        self.models: dict[str, _Model] = {}
        self.bases: dict[str, object] = {}
        self.served: dict[str, _Served] = {}
        if not packages and not lazy:
            raise UserError("no packages to serve", "give a folder holding package folders (each with manifest.json)")
        for pkg in packages:
            pid = pkg.package_id
            if pid in self.served:
                raise UserError(f"package id {pid} appears twice ({self.served[pid].package.path} and {pkg.path})",
                                "serve each package once")
            self.served[pid] = self.load(pkg)

    def _model(self, pkg: Package) -> _Model:
        """The shared model for the package's source (+ its adapters), loaded on first use."""
        cfg, src = self.config, pkg.model_source
        adapters = _adapters_of(pkg)
        key = src if adapters is None else f"{src}+lora:{adapters[0][:16]}"
        if key in self.models:
            return self.models[key]
        from semedge.semcom.split import silence_encoding

        if src not in self.bases:
            self.bases[src] = self.loader(src)
        loaded = self.bases[src]
        if adapters is not None:
            from safetensors.torch import load_file

            from semedge.semcom.checkpoint import with_adapters

            state = {k: v.float() for k, v in load_file(str(pkg.file(ADAPTERS))).items()}
            loaded = with_adapters(loaded, adapters[1], adapters[2], state)
        silence = silence_encoding(loaded) if loaded.task.fills_silence else None
        backend = cfg.backend
        if backend == "auto":
            backend = "ct2" if getattr(loaded.model.config, "model_type", "") == "whisper" else "torch"
        engine = None
        if backend == "ct2":
            from semedge.semcom.ct2_backend import CT2Whisper

            engine = CT2Whisper(loaded, cfg.compute_type, threads=cfg.threads, workers=cfg.workers, progress=log.info)
        self.models[key] = _Model(loaded, silence, ThreadPoolExecutor(cfg.workers, thread_name_prefix="decode"), engine)
        return self.models[key]

    def _image_model(self, pkg: Package) -> _Model:
        """The CNN decoder the image package ships, loaded once per sha256 and shared."""
        from semedge.semcom.image_server import IMAGE_DECODER, load_image_decoder

        key = f"image-decoder:{pkg.manifest['files'].get(IMAGE_DECODER)}"
        if key not in self.models:
            sec = pkg.manifest.get("image")
            if not isinstance(sec, dict) or not isinstance(sec.get("config"), dict):
                raise UserError(f"package {pkg.path} is an image package without the manifest's image.config",
                                "re-export it: semedge export-image --out DIR")
            dec = load_image_decoder(pkg.file(IMAGE_DECODER), sec["config"])  # pkg.file: refuses an unlisted file
            if dec.net[0].in_channels != pkg.d_model:
                raise UserError(f"package {pkg.path}: image.config d={dec.net[0].in_channels} disagrees with "
                                f"model.d_model={pkg.d_model}", "re-export it: semedge export-image --out DIR")
            self.models[key] = _Model(dec, None, ThreadPoolExecutor(self.config.workers, thread_name_prefix="decode"))
        return self.models[key]

    def _load_image(self, pkg: Package) -> _Served:
        """An image package: its JSC decoder on the shared CNN decoder."""
        from semedge.semcom.image_codec import ImageServerHalf

        m = self._image_model(pkg)
        half = ImageServerHalf(load_jsc_decoder(pkg), m.loaded).eval()
        return _Served(pkg, half, MAX_IMAGE_TOKENS, m, task=IMAGE_TASK)

    def load(self, pkg: Package) -> _Served:
        """The package's server half (its JSC decoder on the shared model), checked against the model;
        the task says how long a message may be."""
        from semedge.semcom.split import ServerHalf

        if pkg.kind == IMAGE_TASK:
            return self._load_image(pkg)
        pid, src = pkg.package_id, pkg.model_source
        m = self._model(pkg)
        want = pkg.manifest["model"].get("weight_hash")
        if want and want != m.loaded.weight_hash:
            raise UserError(f"package {pid} was built for {src} with weights {want[:12]}…, but the server's "
                            f"{src} has weights {m.loaded.weight_hash[:12]}…",
                            "serve the model the package was exported from, or re-export the package")
        if m.loaded.kind != pkg.kind or m.loaded.d_model != pkg.d_model:
            raise UserError(f"package {pid} is a {pkg.kind} package with d_model={pkg.d_model}, but {src} is "
                            f"{m.loaded.kind} with d_model={m.loaded.d_model}", "re-export the package")
        half = ServerHalf(m.loaded, load_jsc_decoder(pkg), m.silence).eval()
        half.ct2 = m.ct2
        max_tokens = m.loaded.task.max_message_tokens(m.loaded, self.config.max_text_tokens)
        return _Served(pkg, half, max_tokens, m, task=pkg.kind)

    def close(self) -> None:
        for m in self.models.values():
            m.executor.shutdown(wait=False, cancel_futures=True)


def default_loader(source: str):
    """load_model(source); `tiny:ARCH:SEED` (packages of test models) rebuilds that tiny model."""
    from semedge.semcom.models import load_source

    return load_source(source)


def find_packages(directory, trust=None) -> list[Package]:
    """Every package under `directory` (itself, or its subfolders holding manifest.json), verified;
    with `trust` (signing.pub paths or keys), each must be signed by one of them (runtime/trust.py)."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise UserError(f"packages folder {d} does not exist", "give the folder that holds your exported packages")
    if (d / MANIFEST).is_file():
        return [Package.load(d, trust=trust)]
    pkgs = [Package.load(p.parent, trust=trust) for p in sorted(d.glob(f"*/{MANIFEST}"))]
    if not pkgs:
        raise UserError(f"no packages under {d} (no */manifest.json)", "export one with `semedge export` into that folder")
    return pkgs


# ----------------------------------------------------------------------------- app


@dataclass
class _Item:
    symbols: np.ndarray  # [tokens, k']
    future: asyncio.Future
    t_enqueued: float
    prompt: str = ""  # previous text from the session's memory
    size: tuple[int, int] | None = None  # image messages: (height, width) in pixels


class LocalHost:
    """The single-process host of the decode API: an asyncio queue per package, batches of up to
    `max_batch` messages (or `max_wait_ms` after the first) decoded on the model's threads."""

    def __init__(self, reg: Registry):
        self.reg, self.cfg, self.metrics = reg, reg.config, Metrics()
        self.cache = ReplayCache(reg.config.replay_ttl_s)
        self.sessions = None  # one memory per (package, session id): ?session=S (decode_api)
        if self.cfg.memory is not None:
            from semedge.semcom.memory import Sessions

            self.sessions = Sessions(self.cfg.memory_config(), self.cfg.max_sessions, self.cfg.session_idle_s)
        self.kb = None  # passages into every prompt (decode_api.context_prompt); `semedge kb add` updates it live
        if self.cfg.kb is not None:
            from semedge.semcom.kb import KnowledgeBase

            self.kb = KnowledgeBase(self.cfg.kb)

    def package_ids(self):
        return self.reg.served.keys()

    async def limits(self, pid: str) -> tuple[int, int]:
        s = self.reg.served[pid]
        return s.package.k, s.max_tokens

    def ladder_of(self, pid: str) -> tuple[int, ...] | None:
        """The package's nested-codec ladder (the k_t a layout message may use), None when not nested."""
        return self.reg.served[pid].package.ladder

    def task_of(self, pid: str) -> str:
        """The package's task (its manifest's model.kind): what payload it takes and what it answers."""
        return self.reg.served[pid].task

    def start(self) -> None:
        for s in self.reg.served.values():
            s.queue = asyncio.Queue()
            s.worker = asyncio.create_task(self._batch_worker(s))

    async def stop(self) -> None:
        for s in self.reg.served.values():
            s.worker.cancel()
        await asyncio.gather(*(s.worker for s in self.reg.served.values()), return_exceptions=True)
        self.reg.close()

    async def decode(self, pid: str, arr: np.ndarray, prompts: list[str] | None = None,
                     sizes: list[tuple[int, int]] | None = None) -> list:
        """Queue the messages; [(answer, queue_s, decode_s, batch)] each (answer: text, or base64 PNG)."""
        s, cfg = self.reg.served[pid], self.cfg
        if s.queue.qsize() + arr.shape[0] > cfg.max_queue:
            raise HTTPError(503, f"the queue for {pid} is full ({cfg.max_queue} messages)", {"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        items = [_Item(np.ascontiguousarray(m), loop.create_future(), now, prompts[i] if prompts else "",
                       sizes[i] if sizes else None) for i, m in enumerate(arr)]
        for it in items:
            s.queue.put_nowait(it)
        try:
            return await asyncio.gather(*(it.future for it in items))
        except asyncio.CancelledError:
            for it in items:
                it.future.cancel()
            raise

    async def _next_batch(self, s: _Served) -> list:
        """The first queued message and those that arrive within max_wait_ms, up to max_batch."""
        loop, cfg = asyncio.get_running_loop(), self.cfg
        items = [await s.queue.get()]
        deadline = loop.time() + cfg.max_wait_ms / 1000.0
        while len(items) < cfg.max_batch:
            try:
                items.append(s.queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                items.append(await asyncio.wait_for(s.queue.get(), left))
            except asyncio.TimeoutError:
                break
        return [it for it in items if not it.future.done()]  # client gone

    async def _batch_worker(self, s: _Served) -> None:
        slots = asyncio.Semaphore(self.cfg.workers)  # batches in flight for this package
        running: set[asyncio.Task] = set()
        try:
            while True:
                await slots.acquire()
                items = await self._next_batch(s)
                if not items:
                    slots.release()
                    continue
                task = asyncio.create_task(self._decode_batch(s, items))
                running.add(task)
                task.add_done_callback(lambda t: (running.discard(t), slots.release()))
        except asyncio.CancelledError:
            for t in running:
                t.cancel()
            raise

    async def _decode_batch(self, s: _Served, items: list) -> None:
        loop, pid = asyncio.get_running_loop(), s.package.package_id
        t0 = time.perf_counter()
        try:
            texts = await loop.run_in_executor(s.model.executor, _run_batch, s, items, self.cfg.max_new_tokens)
            err = None
        except Exception as e:  # noqa: BLE001 - reported to every waiting request
            log.exception("decode failed")
            texts, err = None, e
        t1 = time.perf_counter()
        self.metrics.batch(len(items))
        self.metrics.observe("semedge_decode_seconds", pid, t1 - t0)
        for i, it in enumerate(items):
            self.metrics.observe("semedge_queue_seconds", pid, t0 - it.t_enqueued)
            if it.future.done():
                continue
            if err is not None:
                it.future.set_exception(err)
            else:
                it.future.set_result((texts[i], t0 - it.t_enqueued, t1 - t0, len(items)))


def _run_batch(s: _Served, items: list, max_new_tokens: int) -> list[str]:
    """One batch on a decode thread: texts (speech, text) or base64 PNGs (image)."""
    msgs = [it.symbols for it in items]
    if s.task == IMAGE_TASK:
        from semedge.semcom.image_server import decode_images

        return decode_images(s.half, msgs, [it.size for it in items])
    prompts = [it.prompt for it in items] if any(it.prompt for it in items) else None
    return decode_texts(s.half, msgs, max_new_tokens, prompts)


def create_app(packages: list[Package], loader=None, config: ServerConfig | None = None, gate=None):
    """The FastAPI app serving `packages` (Package objects, verified); `loader(source)` -> LoadedModel.
    gate: a runtime.auth.Gate (bearer tokens, scopes, per-device limits), or None: no auth."""
    from fastapi import FastAPI, Query
    from fastapi.responses import JSONResponse, PlainTextResponse

    reg = Registry(packages, loader, config)
    host = LocalHost(reg)
    metrics = host.metrics

    @contextlib.asynccontextmanager
    async def lifespan(app):
        host.start()
        try:
            yield
        finally:
            await host.stop()

    app = FastAPI(title="semedge server", lifespan=lifespan)
    app.state.registry = reg
    app.state.metrics = metrics
    app.state.drain = drain = Drain()

    def fail(pkg_label: str, status: int, detail: str, headers: dict | None = None):
        metrics.count(pkg_label, status)
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    @app.post("/v1/decode")
    async def decode(request: Request, package: str = Query(..., max_length=200)):
        with drain.track():
            return await _gated(request, package)

    async def _gated(request: Request, package: str):
        if gate is None:
            return await _decode(request, package)
        try:  # runtime/auth.py: 401 / 403 / 429 before anything else is looked at
            lease = gate.admit(request.headers.get("authorization"), package)
        except AuthError as e:
            return fail(package if package in reg.served else "", e.status, e.detail, e.headers)
        with lease:
            return await _decode(request, package)

    async def _decode(request: Request, package: str):
        return await handle_decode(host, request, package)  # runtime/decode_api.py, shared with the Ray host

    @app.get("/healthz")
    async def healthz(request: Request):
        try:  # with auth: a valid token, and only the packages that device may use
            may = gate.identify(request.headers.get("authorization")).may_use if gate else (lambda pid: True)
        except AuthError as e:
            return JSONResponse({"detail": e.detail}, status_code=e.status, headers=e.headers)
        return {"status": "ok", "packages": {pid: {"model": s.package.model_source, "kind": s.package.kind,
                                                   "task": s.task, "k": s.package.k, "max_tokens": s.max_tokens,
                                                   "ladder": list(s.package.ladder or [])}
                                             for pid, s in reg.served.items() if may(pid)}}

    @app.get("/metrics")
    async def prom(request: Request):
        try:
            gate and gate.identify(request.headers.get("authorization"))
        except AuthError as e:
            return JSONResponse({"detail": e.detail}, status_code=e.status, headers=e.headers)
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


# ----------------------------------------------------------------------------- running


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e})", "choose another --port (or 0 for a free one)") from None
    return sock


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 120.0, **uvicorn_kw):
    """Run `app` with uvicorn on a background thread; yields the base URL; stops cleanly on exit.
    uvicorn_kw: more uvicorn.Config options (ssl_certfile/ssl_keyfile: the URL is https)."""
    import uvicorn

    sock = _bind(host, port)
    real_port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False, **uvicorn_kw))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="semedge-server", daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        if not thread.is_alive():
            sock.close()
            raise RuntimeError("the server thread stopped during startup (see the log above)")
        if time.monotonic() - t0 > startup_timeout:
            server.should_exit = True
            thread.join(10)
            sock.close()
            raise RuntimeError(f"the server did not start within {startup_timeout} s")
        time.sleep(0.01)
    try:
        yield f"{'https' if uvicorn_kw.get('ssl_certfile') else 'http'}://{host}:{real_port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def _draining_server(config, drain: Drain):
    """A uvicorn.Server that notes how many requests were in flight when SIGTERM/SIGINT came."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            drain.signalled()
            super().handle_exit(sig, frame)

    return Server(config)


def _run_until_drained(server, sock) -> None:
    """server.run until a signal; uvicorn then drains (closes the socket, waits up to
    timeout_graceful_shutdown for accepted requests) and re-raises SIGTERM, which lands here
    and ends the run cleanly (exit 0) instead of killing the process."""
    import signal

    old = signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, old)


def serve(packages_dir, host: str = "127.0.0.1", port: int = 8000, config: ServerConfig | None = None,
          log_level: str = "info", *, trust=None, auth=None, ssl_certfile=None, ssl_keyfile=None) -> dict:
    """Serve every package under `packages_dir` until SIGTERM or Ctrl+C (the `semedge serve` command);
    returns the drain's summary (Drain.summary). trust: signing.pub path(s) every package must be
    signed by; auth: the auth file (runtime/auth.py); ssl_certfile/ssl_keyfile: PEM files for HTTPS."""
    import uvicorn

    from semedge.runtime.auth import Gate, check_tls_files

    config = config or ServerConfig()
    tls = check_tls_files(ssl_certfile, ssl_keyfile)  # bad files fail before the model loads
    gate = Gate.from_file(auth) if auth is not None else None
    app = create_app(find_packages(packages_dir, trust=trust), config=config, gate=gate)
    sock = _bind(host, port)
    server = _draining_server(uvicorn.Config(app, log_level=log_level, lifespan="on", access_log=False,
                                             timeout_graceful_shutdown=config.drain_s, **tls), app.state.drain)
    _run_until_drained(server, sock)
    return app.state.drain.summary()


__all__ = ["ServerConfig", "Drain", "Metrics", "Registry", "create_app", "find_packages", "load_jsc_decoder", "parse_npy",
           "serve", "serve_in_thread"]
