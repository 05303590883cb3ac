"""`semedge serve --engine ray`: the decode API as a Ray Serve application (docs/scale.md).

Two deployments:

    HTTP ─► Ingress (FastAPI, runtime/decode_api.py: the same checks, codes and JSON as `semedge serve`)
              │  handle.options(multiplexed_model_id=PACKAGE).decode.remote(symbols)
              ▼
            Decoder × N replicas: each loads a model's weights once (shared by the packages on it);
              packages (JSC decoder + adapters) are multiplexed per replica (@serve.multiplexed,
              keyed by package id, least recently used evicted); @serve.batch groups messages.

Packages reach the replicas through Ray's object store (the driver reads each verified package
folder once; a replica writes it to a local temp folder and verifies its hashes again), so
replicas on other machines need no shared disk. Imported only by `serve --engine ray`.
"""


import asyncio
import contextlib
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from ray import serve

from semedge.core.errors import UserError
from semedge.runtime.auth import AuthError, Gate, load_auth
from semedge.runtime.decode_api import HTTPError, ReplayCache, decode_texts, handle_decode, health_body
from semedge.runtime.package import Package
from semedge.runtime.server import Metrics, Registry, ServerConfig, find_packages

log = logging.getLogger("semedge.ray_serve")
APP_NAME = "semedge"
MAX_PACKAGES_PER_REPLICA = 8  # multiplexed packages a replica keeps loaded (LRU)


# ----------------------------------------------------------------------------- packages to replicas


def package_blob(pkg: Package) -> dict[str, bytes]:
    """Every file of a package folder, by relative path (what a replica rebuilds it from)."""
    root = Path(pkg.path)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def materialise(pid: str, blob: dict[str, bytes], into: Path) -> Package:
    """Write the package's files under `into`/pid and load it (hashes checked again on this node)."""
    root = into / pid
    if not (root / "manifest.json").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=f".{pid}-", dir=into))
        for rel, data in blob.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        with contextlib.suppress(OSError):  # another replica on this node may have won the rename
            tmp.rename(root)
    return Package.load(root)


# ----------------------------------------------------------------------------- the decoder


@serve.deployment(name="Decoder")
class Decoder:
    """One replica: the shared models (loaded once) and the packages it was asked for (multiplexed)."""

    def __init__(self, blobs: dict, cfg: ServerConfig, threads: int | None = None):
        import torch

        torch.set_num_threads(max(1, threads or cfg.threads))
        self.cfg, self.blobs = cfg, blobs  # pid -> ObjectRef of package_blob()
        self.reg = Registry([], config=cfg, lazy=True)
        self.dir = Path(tempfile.mkdtemp(prefix="semedge-replica-"))
        self._batched.set_max_batch_size(cfg.max_batch)
        self._batched.set_batch_wait_timeout_s(cfg.max_wait_ms / 1000.0)

    @serve.multiplexed(max_num_models_per_replica=MAX_PACKAGES_PER_REPLICA)
    async def package(self, pid: str):
        blob = await self.blobs[pid]
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda: self.reg.load(materialise(pid, blob, self.dir)))

    async def limits(self) -> tuple[int, int]:
        s = await self.package(serve.get_multiplexed_model_id())
        return s.package.k, s.max_tokens

    async def decode(self, arr: np.ndarray) -> list:
        """[B, tokens, k'] of one request -> [(text, queue_s, decode_s, batch)] per message."""
        s = await self.package(serve.get_multiplexed_model_id())
        now = time.perf_counter()
        return list(await asyncio.gather(*(self._batched((s, np.ascontiguousarray(m), now)) for m in arr)))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _batched(self, items: list) -> list:
        """Messages that arrived together (any packages): one decode per package, on its model's threads."""
        loop = asyncio.get_running_loop()
        out: list = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for i, (s, _, _) in enumerate(items):
            groups.setdefault(id(s), []).append(i)
        for idx in groups.values():
            s = items[idx[0]][0]
            t0 = time.perf_counter()
            texts = await loop.run_in_executor(s.model.executor, decode_texts, s.half,
                                               [items[i][1] for i in idx], self.cfg.max_new_tokens)
            t1 = time.perf_counter()
            for i, text in zip(idx, texts):
                out[i] = (text, t0 - items[i][2], t1 - t0, len(idx))
        return out


# ----------------------------------------------------------------------------- the ingress

app = FastAPI(title="semedge server (Ray Serve)")


class RayHost:
    """The decode API's host on Ray: messages go to a Decoder replica chosen by package id."""

    def __init__(self, decoder, infos: dict, cfg: ServerConfig):
        self.decoder, self.infos, self.cfg = decoder, infos, cfg  # infos: pid -> {model, kind, k}
        self.metrics, self.cache = Metrics(), ReplayCache(cfg.replay_ttl_s)
        self.max_tokens: dict[str, int] = {}
        self.inflight = dict.fromkeys(infos, 0)

    def package_ids(self):
        return self.infos.keys()

    def ladder_of(self, pid: str) -> tuple[int, ...] | None:
        return self.infos[pid].get("ladder")

    async def limits(self, pid: str) -> tuple[int, int]:
        if pid not in self.max_tokens:  # asked of a replica once (text models: their position limit)
            _, self.max_tokens[pid] = await self._call(pid, "limits")
        return self.infos[pid]["k"], self.max_tokens[pid]

    async def _call(self, pid: str, method: str, *args):
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        h = self.decoder.options(multiplexed_model_id=pid)
        try:
            return await getattr(h, method).remote(*args)
        except (RayActorError, BackPressureError, DeploymentUnavailableError) as e:
            raise HTTPError(503, f"a decoder replica is unavailable ({type(e).__name__}); retry with the same "
                                 "X-Semedge-Message-Id", {"Retry-After": "1"}) from None

    async def decode(self, pid: str, arr: np.ndarray) -> list:
        n, cfg = int(arr.shape[0]), self.cfg
        if self.inflight[pid] + n > cfg.max_queue:
            raise HTTPError(503, f"the queue for {pid} is full ({cfg.max_queue} messages)", {"Retry-After": "1"})
        self.inflight[pid] += n
        try:
            results = await self._call(pid, "decode", arr)
        finally:
            self.inflight[pid] -= n
        self.metrics.batch(max(r[3] for r in results))
        self.metrics.observe("semedge_decode_seconds", pid, max(r[2] for r in results))
        for r in results:
            self.metrics.observe("semedge_queue_seconds", pid, r[1])
        return results


def refusal(e: AuthError) -> JSONResponse:
    return JSONResponse({"detail": e.detail}, status_code=e.status, headers=e.headers)


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    """The HTTP side. devices (runtime/auth.py, None: no auth): the same Gate as the single-process
    server, so 401 / 403 / 429 come first, in the same order, with the same JSON."""

    def __init__(self, decoder, infos: dict, cfg: ServerConfig, devices: dict | None = None):
        self.host = RayHost(decoder, infos, cfg)
        self.gate = Gate(devices) if devices is not None else None

    @app.post("/v1/decode")
    async def decode(self, request: Request, package: str = Query(..., max_length=200)):
        if self.gate is None:
            return await handle_decode(self.host, request, package)
        try:
            lease = self.gate.admit(request.headers.get("authorization"), package)
        except AuthError as e:
            self.host.metrics.count(package if package in self.host.infos else "", e.status)
            return refusal(e)
        with lease:
            return await handle_decode(self.host, request, package)

    def _may_use(self, request: Request):
        """With auth: the caller's scope test (AuthError 401 without a valid token); else: everything."""
        return self.gate.identify(request.headers.get("authorization")).may_use if self.gate else (lambda pid: True)

    @app.get("/healthz")
    async def healthz(self, request: Request):
        try:
            may = self._may_use(request)
        except AuthError as e:
            return refusal(e)
        out = {}
        for pid, info in self.host.infos.items():
            if not may(pid):
                continue
            try:
                _, max_tokens = await self.host.limits(pid)
            except HTTPError:
                max_tokens = None
            out[pid] = {**info, "max_tokens": max_tokens}
        return health_body(out)

    @app.get("/metrics")
    async def prom(self, request: Request):
        try:
            self._may_use(request)
        except AuthError as e:
            return refusal(e)
        return PlainTextResponse(self.host.metrics.render(), media_type="text/plain; version=0.0.4")


# ----------------------------------------------------------------------------- running


def replica_options(replicas: int | None, autoscale: tuple[int, int] | None, num_cpus: float, num_gpus: float,
                    cfg: ServerConfig) -> dict:
    """The Decoder's deployment options: a fixed count or autoscaling on ongoing requests."""
    opts = {"ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
            "max_ongoing_requests": max(4 * cfg.max_batch, 16)}
    if autoscale:
        lo, hi = autoscale
        opts["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi, "initial_replicas": lo,
                                      "target_ongoing_requests": cfg.max_batch}
    else:
        opts["num_replicas"] = replicas or 1
    return opts


def build_app(packages: list[Package], cfg: ServerConfig, replicas: int | None = 1,
              autoscale: tuple[int, int] | None = None, num_cpus: float = 1.0, num_gpus: float = 0.0,
              devices: dict | None = None):
    """The Ray Serve application (Ingress -> Decoder) for verified `packages`; needs ray.init() first.
    devices: runtime.auth.load_auth's result (bearer tokens, scopes, limits), or None: no auth."""
    if not packages:
        raise UserError("no packages to serve", "give a folder holding package folders (each with manifest.json)")
    blobs = {p.package_id: ray.put(package_blob(p)) for p in packages}
    infos = {p.package_id: {"model": p.model_source, "kind": p.kind, "k": p.k, "ladder": p.ladder} for p in packages}
    decoder = Decoder.options(**replica_options(replicas, autoscale, num_cpus, num_gpus, cfg)).bind(blobs, cfg)
    return Ingress.options(num_replicas=1, ray_actor_options={"num_cpus": 0},
                           max_ongoing_requests=cfg.max_queue).bind(decoder, infos, cfg, devices)


def start(packages_dir, host: str = "127.0.0.1", port: int = 8000, config: ServerConfig | None = None,
          address: str | None = None, trust=None, auth=None, **replica_kw) -> str:
    """Join (`address`) or start a Ray cluster, deploy the app, return its base URL.
    auth: the auth file (runtime/auth.py), read here so a bad one fails before Ray starts."""
    cfg = config or ServerConfig()
    devices = load_auth(auth) if auth is not None else None
    pkgs = find_packages(packages_dir, trust=trust) if trust else find_packages(packages_dir)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                 **({} if address else {"num_cpus": replica_kw.pop("cluster_cpus", None)}))
    replica_kw.pop("cluster_cpus", None)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(pkgs, cfg, devices=devices, **replica_kw), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def stop() -> None:
    """Remove the app and Serve's actors (the cluster stays up)."""
    with contextlib.suppress(Exception):
        serve.shutdown()


def serve_forever(packages_dir, **kw) -> None:
    """`semedge serve --engine ray`: deploy, then keep the driver (which owns the packages' objects) alive."""
    url = start(packages_dir, **kw)
    log.warning("serving on %s (Ray Serve); Ctrl-C stops", url)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop()


__all__ = ["Decoder", "Ingress", "RayHost", "build_app", "materialise", "package_blob", "replica_options",
           "serve_forever", "start", "stop"]
