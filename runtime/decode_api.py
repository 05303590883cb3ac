"""The decode API's request path, shared by both hosts of the server half.

`semedge serve` (FastAPI + an asyncio batcher, runtime/server.py) and `semedge serve
--engine ray` (Ray Serve, runtime/ray_serve.py) differ only in how messages reach a
decoder. Everything a request goes through before and after that is here, once:
package lookup (404), body limits (400/413), .npy parsing (422), the message id and
its replay cache (409 on reuse with another body), the answer's JSON, the decode call.

A host is any object with `cfg` (ServerConfig), `metrics` (Metrics), `cache`
(ReplayCache), `package_ids()`, `async limits(pid) -> (k, max_tokens)` and
`async decode(pid, arr) -> [(text, queue_s, decode_s, batch)]`, which may raise
HTTPError (503 when its queue is full or a replica is gone). A host that keeps session
memories (`?session=S`, semcom/memory.py) also has `sessions` (a memory.Sessions) and takes
`decode(pid, arr, prompts)`; one with `kb` (semcom/kb.py) puts retrieved passages in every
message's prompt. The local host does both, the Ray host neither (422 for a session).

Several tasks on one host: a host with `task_of(pid)` (the local host) checks that the
payload fits the package's task before decoding (`check_task_params`, `check_image_tokens`):
`?task=T` must name the package's task; an image package needs `?height=H&width=W` (the
image's size in pixels) and T = ceil(H/4) * ceil(W/4) tokens, and answers base64 PNGs
(`decode(pid, arr, sizes=[(H, W), ...])`); a speech or text package refuses height/width.
Each mismatch is a 422 naming the field and the fix.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import time
from collections import OrderedDict

import numpy as np

NPY_MAGIC = b"\x93NUMPY"
IMAGE_TASK = "image"  # the task whose messages are images (semcom/tasks/image.py)
MAX_IMAGE_PIXELS = 16_000_000  # as semcom.tasks.image.MAX_PIXELS
MAX_IMAGE_TOKENS = MAX_IMAGE_PIXELS // 16  # one token per 4 x 4 pixels
IMAGE_STRIDE = 4  # pixels per token side (semcom.image_codec.STRIDE)
MESSAGE_ID_HEADER = "x-semedge-message-id"
LAYOUT_TYPE = "application/x-semedge-layout"  # a per-frame layout message (semcom/importance.py), see parse_layout
LAYOUT_VERSION = "1"
_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


class HTTPError(Exception):
    def __init__(self, status: int, detail: str, headers: dict | None = None):
        self.status = status
        self.detail = detail
        self.headers = headers  # e.g. Retry-After on 503
        super().__init__(detail)


def _npy_header(fp: io.BytesIO, part: str) -> tuple[tuple, bool, np.dtype]:
    """(shape, fortran, dtype) of the .npy array starting at fp's position; HTTPError(422) naming `part`."""
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(fp)
        if version in ((2, 0), (3, 0)):
            return np.lib.format.read_array_header_2_0(fp)
        raise ValueError(f"npy version {version}")
    except Exception as e:  # noqa: BLE001 - any malformed header
        raise HTTPError(422, f"{part} is not a valid .npy array ({e})") from None


def _npy_data(body: bytes, fp: io.BytesIO, shape: tuple, fortran: bool, dtype, part: str) -> np.ndarray:
    """The array's data after its header (fp moves past it); 422 when the body is too short."""
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    data = body[fp.tell(): fp.tell() + n]
    if len(data) != n:
        raise HTTPError(422, f"{part} holds {len(data)} data bytes, the header's shape needs {n}")
    fp.seek(fp.tell() + n)
    arr = np.frombuffer(data, dtype=dtype)
    return arr.reshape(shape[::-1]).transpose() if fortran else arr.reshape(shape)


def _float_dtype(dtype, part: str) -> None:
    if dtype.hasobject or dtype.kind != "f" or dtype.itemsize not in (2, 4):
        raise HTTPError(422, f"{part}: dtype {dtype} is not accepted: send float16 or float32")


def parse_npy(body: bytes, k: int, max_tokens: int, max_messages: int, what: str = "this package") -> np.ndarray:
    """A .npy body -> float32 [batch, tokens, k'] (1 <= k' <= k); HTTPError(422) with the reason.
    what: how refusals name the package (e.g. "package ID (speech task)")."""
    if not body.startswith(NPY_MAGIC):
        raise HTTPError(422, "body is not a .npy array (np.save, no pickle)")
    fp = io.BytesIO(body)
    shape, fortran, dtype = _npy_header(fp, "body")
    _float_dtype(dtype, "body")
    if len(shape) not in (2, 3):
        raise HTTPError(422, f"shape {shape} is not accepted: send [tokens, k] or [batch, tokens, k]")
    if len(shape) == 2:
        shape = (1, *shape)
    b, t, kk = shape
    if b < 1 or b > max_messages:
        raise HTTPError(422, f"batch of {b} messages: send 1 to {max_messages} per request")
    if t < 1 or t > max_tokens:
        raise HTTPError(422, f"{t} tokens per message: {what} takes 1 to {max_tokens}")
    if kk < 1 or kk > k:
        raise HTTPError(422, f"{kk} symbols per token: {what} has k={k} (send 1 to {k}, "
                             "the output of this package's own device runner)")
    expect = b * t * kk * dtype.itemsize
    if len(body) - fp.tell() != expect:
        raise HTTPError(422, f"body holds {len(body) - fp.tell()} data bytes, the header's shape needs {expect}")
    arr = _npy_data(body, fp, shape, fortran, dtype, "body").astype(np.float32)
    if not np.isfinite(arr).all():
        raise HTTPError(422, "symbols contain NaN or inf")
    return arr


def layout_version(content_type: str | None) -> str | None:
    """The layout format's version when the Content-Type is LAYOUT_TYPE (else None: a plain .npy body)."""
    media, *params = [p.strip() for p in (content_type or "").split(";")]
    if media.lower() != LAYOUT_TYPE:
        return None
    opts = dict(p.split("=", 1) for p in params if "=" in p)
    return opts.get("version", "").strip('"')


def parse_layout(body: bytes, ladder: tuple[int, ...] | None, max_tokens: int, what: str,
                 version: str = LAYOUT_VERSION) -> np.ndarray:
    """A layout message (LAYOUT_TYPE: .npy k [T] ints, then .npy stream [sum k] floats) -> float32
    [1, T, k], frame t's first k[t] symbols from the stream, zero above; HTTPError(422) naming the field."""
    from semedge.semcom.importance import unpack

    if version != LAYOUT_VERSION:
        raise HTTPError(422, f"content-type {LAYOUT_TYPE} version={version!r} is unknown: this server reads "
                             f"version={LAYOUT_VERSION} (update the client, or send a plain .npy [tokens, k'])")
    if ladder is None:
        raise HTTPError(422, f"layout sent, but {what} is not a nested codec (its manifest has no jsc.ladder): send a "
                             "plain .npy [tokens, k'] (--k N), or re-export from a codec trained with --rate-min")
    fp = io.BytesIO(body)
    shape, fortran, dtype = _npy_header(fp, "layout part 1 (k)")
    if dtype.kind not in "iu" or len(shape) != 1 or not 1 <= shape[0] <= max_tokens:
        raise HTTPError(422, f"layout part 1 (k) has dtype {dtype} and shape {shape}: send each frame's k_t as "
                             f"integers, shape [tokens] with 1 to {max_tokens} tokens ({what})")
    k = _npy_data(body, fp, shape, fortran, dtype, "layout part 1 (k)").astype(np.int64)
    off = np.flatnonzero(~np.isin(k, ladder))
    if off.size:
        t = int(off[0])
        raise HTTPError(422, f"layout k[{t}]={int(k[t])} is not on the ladder of {what} {list(ladder)}: send each "
                             "frame's k_t from the package's jsc.ladder (GET /healthz lists it)")
    shape, fortran, dtype = _npy_header(fp, "layout part 2 (stream)")
    _float_dtype(dtype, "layout part 2 (stream)")
    if len(shape) != 1 or shape[0] != int(k.sum()):
        raise HTTPError(422, f"layout part 2 (stream) has shape {shape}, but k sums to {int(k.sum())}: send "
                             "x[t, :k_t] of every frame in frame order, [sum k] symbols")
    stream = _npy_data(body, fp, shape, fortran, dtype, "layout part 2 (stream)").astype(np.float32)
    if fp.tell() != len(body):
        raise HTTPError(422, f"layout body holds {len(body) - fp.tell()} bytes after its two arrays: send k then stream")
    if not np.isfinite(stream).all():
        raise HTTPError(422, "layout part 2 (stream) contains NaN or inf")
    return unpack(stream, k, ladder[-1])[None]


def _pixels(params, name: str, pid: str) -> int:
    """The query parameter `name` (height or width) as a whole number of pixels; 422 otherwise."""
    raw = params.get(name)
    if raw is None:
        raise HTTPError(422, f"{name} is missing: package {pid} serves the image task; add ?height=H&width=W "
                             "(the image's size in pixels)")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_IMAGE_PIXELS:
        raise HTTPError(422, f"{name}={raw!r} is not a whole number of pixels: send the image's {name}, e.g. {name}=32")
    return int(raw)


def check_task_params(task: str, params, pid: str) -> tuple[int, int] | None:
    """The query's task fields against the package's `task`, before the body is read:
    (height, width) for an image package, None for others; HTTPError(422) naming the field and the fix."""
    asked = params.get("task")
    if asked is not None and asked != task:
        raise HTTPError(422, f"task={asked!r}, but package {pid} serves the {task} task: send {asked} payloads to a "
                             f"{asked} package (GET /healthz lists each package's task)")
    if task != IMAGE_TASK:
        given = [n for n in ("height", "width") if n in params]
        if given:
            raise HTTPError(422, f"{'/'.join(given)} given, but package {pid} serves the {task} task, not images: "
                                 "send an image to an image package, or drop height/width")
        return None
    h, w = _pixels(params, "height", pid), _pixels(params, "width", pid)
    if h * w > MAX_IMAGE_PIXELS:
        raise HTTPError(422, f"height x width = {h * w} pixels is over the limit of {MAX_IMAGE_PIXELS}: downscale the image")
    return h, w


def check_image_tokens(arr: np.ndarray, size: tuple[int, int], pid: str) -> None:
    """An image message carries one token per 4 x 4 pixels of its padded size; 422 otherwise."""
    h, w = size
    rows, cols = -(-h // IMAGE_STRIDE), -(-w // IMAGE_STRIDE)
    if arr.shape[1] != rows * cols:
        raise HTTPError(422, f"{arr.shape[1]} tokens per message do not fit height={h} x width={w}: package {pid} "
                             f"(image task) takes {rows} x {cols} = {rows * cols} tokens (one per {IMAGE_STRIDE} x "
                             f"{IMAGE_STRIDE} pixels); send DeviceRunner.encode_image's output with the image's own size")


def check_content_length(header: str | None, limit: int) -> None:
    """400 for a Content-Length that is not a number, 413 over `limit` (before the body is read)."""
    if header is None:
        return
    try:
        n = int(header)
    except ValueError:
        raise HTTPError(400, "Content-Length is not a number") from None
    if n > limit:
        raise HTTPError(413, f"body of {n} bytes is over the limit of {limit} bytes")


async def read_body(request, limit: int) -> bytes:
    """The streamed body; 413 as soon as it grows past `limit` (chunked bodies included)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def message_id(request) -> str | None:
    """The request's X-Semedge-Message-Id (1-128 of [A-Za-z0-9-_.:]), or None; 422 if malformed."""
    mid = request.headers.get(MESSAGE_ID_HEADER)
    if mid is None:
        return None
    if not 1 <= len(mid) <= 128 or not set(mid) <= _ID_CHARS:
        raise HTTPError(422, f"{MESSAGE_ID_HEADER} must be 1 to 128 characters of A-Z a-z 0-9 - _ . :")
    return mid


class ReplayCache:
    """Answers by (package, message id) for `ttl_s`, so a retried message is answered, not decoded twice.

    A repeat that arrives while the first is still decoding waits for that decode. Only
    200 answers are kept (a failed message may be retried and decoded). Single event loop.
    """

    def __init__(self, ttl_s: float = 300.0, max_entries: int = 100_000):
        self.ttl_s, self.max_entries = ttl_s, max_entries
        self._done: OrderedDict[tuple, tuple[float, str, dict]] = OrderedDict()  # key -> (expiry, body sha, answer)
        self._pending: dict[tuple, tuple[str, asyncio.Future]] = {}
        self.replays = 0

    def _expire(self, now: float) -> None:
        while self._done and (len(self._done) > self.max_entries or next(iter(self._done.values()))[0] < now):
            self._done.popitem(last=False)

    async def lookup(self, key: tuple, digest: str) -> dict | None:
        """The cached answer for `key` (awaiting one in flight), or None: then the caller decodes and calls done()."""
        self._expire(time.monotonic())
        hit = self._done.get(key)
        if hit is None and key in self._pending:
            d, fut = self._pending[key]
            if d == digest:
                try:
                    answer = await asyncio.shield(fut)
                except Exception:  # noqa: BLE001 - the first try failed: this one decodes
                    answer = None
                if answer is not None:
                    self.replays += 1
                    return answer
                return await self.lookup(key, digest)
            hit = (0.0, d, None)
        if hit is not None:
            if hit[1] != digest:
                raise HTTPError(409, f"message id {key[1]!r} was used for another body; give each message its own id")
            self.replays += 1
            return hit[2]
        self._pending[key] = (digest, asyncio.get_running_loop().create_future())
        return None

    def done(self, key: tuple, answer: dict | None) -> None:
        """Record the decode of `key`: its 200 answer, or None when it failed."""
        digest, fut = self._pending.pop(key)
        if answer is not None:
            self._done[key] = (time.monotonic() + self.ttl_s, digest, answer)
        if not fut.done():
            fut.set_result(answer)


def decode_texts(half, messages: list[np.ndarray], max_new_tokens: int, prompts: list[str] | None = None) -> list[str]:
    """One batch through the server half (JSC decoder + generation), on the calling thread;
    prompts: previous text per message (a session's memory), or None."""
    import torch

    with torch.inference_mode():
        return half.transcribe([torch.from_numpy(m) for m in messages], max_new_tokens=max_new_tokens, prompts=prompts)


def answer_body(results: list, pid: str, tokens: int, total_s: float, task: str | None = None,
                size: tuple[int, int] | None = None) -> dict:
    """The 200 JSON: texts (or, for an image package, base64 PNGs under "image" with their
    height and width), timings (ms; the slowest message's queue and decode), batch size."""
    out = {"image": [r[0] for r in results], "format": "png", "height": size[0], "width": size[1]} \
        if task == IMAGE_TASK else {"text": [r[0] for r in results]}
    if task is not None:
        out["task"] = task
    return {
        **out,
        "timings_ms": {"queue": round(1000 * max(r[1] for r in results), 3),
                       "decode": round(1000 * max(r[2] for r in results), 3),
                       "total": round(1000 * total_s, 3)},
        "batch": max(r[3] for r in results),
        "package": pid,
        "tokens": tokens,
    }


def session_memory(host, pid: str, sid: str | None):
    """The session's memory (semcom/memory.py) for ?session=S, or None without one; 422 when the
    host keeps no memory (`semedge serve --memory RULE`) or the id is malformed."""
    if sid is None:
        return None
    sessions = getattr(host, "sessions", None)
    if sessions is None:
        raise HTTPError(422, "session given, but this server keeps no memory: start it with semedge serve --memory fifo "
                             "(the local engine), or send no session")
    from semedge.core.errors import UserError

    try:
        return sessions.get(pid, sid)
    except UserError as e:
        raise HTTPError(422, f"{e}") from None


async def _decode_with_context(host, pid: str, arr: np.ndarray, mem) -> list:
    """Messages one after another, each with a prompt: passages from the host's knowledge base
    (`kb`, semcom/kb.py) then the session memory's text, each decode stored in the memory.
    The KB and corr search with a first-pass decode of the message (no prompt); with
    cfg.context_guard the answer is that first pass when semcom.memory.keep_prompted refuses
    the prompted decode."""
    from semedge.semcom.memory import keep_prompted

    loop, results = asyncio.get_running_loop(), []
    kb, guard = getattr(host, "kb", None), getattr(host.cfg, "context_guard", False)
    for m in arr:
        first = kb is not None or guard or (mem is not None and mem.needs_query)
        plain = (await host.decode(pid, m[None]))[0] if first else None
        query = plain[0] if first else None
        prompt = await loop.run_in_executor(None, context_prompt, host, mem, query)  # embeds: off the event loop
        r = (await host.decode(pid, m[None], [prompt]))[0]
        if guard and prompt and not keep_prompted(query, r[0], prompt):
            r = plain  # the prompted decode ran on or copied the prompt: the first pass stands
        if mem is not None:
            await loop.run_in_executor(None, mem.add, r[0])
        results.append(r)
    return results


def context_prompt(host, mem, query: str | None) -> str:
    """The decoder's previous text: the best KB passages, then the memory (Whisper keeps the prompt's end)."""
    parts = []
    kb = getattr(host, "kb", None)
    if kb is not None and query:
        recent = mem.texts()[-1:] if mem is not None else []
        parts += [h.text for h in kb.search(" ".join(recent + [query]), host.cfg.kb_passages)]
    if mem is not None:
        parts.append(mem.prompt(query))
    return " ".join(p for p in parts if p)


async def _decode_once(host, request, pid: str) -> dict:
    """Body -> symbols -> the host's decoder -> answer, through the replay cache when the request has an id."""
    t_start = time.perf_counter()
    cfg = host.cfg
    check_content_length(request.headers.get("content-length"), cfg.max_body_bytes)
    mid = message_id(request)
    task = host.task_of(pid) if hasattr(host, "task_of") else None  # None: a host of speech/text only (Ray)
    size = check_task_params(task, request.query_params, pid) if task is not None else None
    if size is not None and request.query_params.get("session") is not None:
        raise HTTPError(422, f"session given, but package {pid} answers images, not text: send no session")
    mem = session_memory(host, pid, request.query_params.get("session"))
    k, max_tokens = await host.limits(pid)
    body = await read_body(request, cfg.max_body_bytes)
    what = f"package {pid}" + (f" ({task} task)" if task else "")
    version = layout_version(request.headers.get("content-type"))
    if version is None:
        arr = parse_npy(body, k, max_tokens, cfg.max_messages_per_request, what)
    else:
        ladder = host.ladder_of(pid) if hasattr(host, "ladder_of") else None
        arr = parse_layout(body, ladder, max_tokens, what, version)
    if size is not None:
        check_image_tokens(arr, size, pid)
    key = (pid, mid)
    if mid is not None:
        cached = await host.cache.lookup(key, hashlib.sha256(body).hexdigest())
        if cached is not None:
            return {**cached, "replayed": True}
    answer = None
    try:
        if size is not None:  # images: no prompt, no knowledge base
            results = await host.decode(pid, arr, sizes=[size] * arr.shape[0])
        elif mem is None and getattr(host, "kb", None) is None:
            results = await host.decode(pid, arr)
        else:
            results = await _decode_with_context(host, pid, arr, mem)
        answer = answer_body(results, pid, int(arr.shape[1]), time.perf_counter() - t_start, task, size)
        return answer
    finally:
        if mid is not None:
            host.cache.done(key, answer)


async def handle_decode(host, request, package: str):
    """POST /v1/decode?package=ID on either host: the JSON answer, or a JSONResponse with the refusal."""
    from fastapi.responses import JSONResponse

    if package not in host.package_ids():
        host.metrics.count("", 404)
        return JSONResponse({"detail": f"unknown package {package!r}; served: {sorted(host.package_ids())}"}, 404)
    t0 = time.perf_counter()
    try:
        out = await _decode_once(host, request, package)
    except HTTPError as e:
        host.metrics.count(package, e.status)
        return JSONResponse({"detail": e.detail}, status_code=e.status, headers=e.headers)
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - a decode that failed answers 500 with its reason
        host.metrics.count(package, 500)
        return JSONResponse({"detail": f"decode failed: {type(e).__name__}: {e}"}, status_code=500)
    host.metrics.count(package, 200)
    host.metrics.observe("semedge_request_seconds", package, time.perf_counter() - t0)
    return out


def health_body(limits: dict) -> dict:
    """GET /healthz: {pid: {model, kind, k, max_tokens}} for every served package."""
    return {"status": "ok", "packages": limits}


__all__ = ["HTTPError", "IMAGE_TASK", "LAYOUT_TYPE", "LAYOUT_VERSION", "MESSAGE_ID_HEADER", "ReplayCache", "answer_body", "check_content_length",
           "check_image_tokens", "check_task_params", "decode_texts",
           "handle_decode", "health_body", "layout_version", "message_id", "parse_layout", "parse_npy", "read_body"]
