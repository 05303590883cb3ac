"""The device's HTTP client: channel symbols -> (simulated link) -> server -> text (or an image).

The body is one `.npy` array (np.save, no pickle), float16 or float32, shape
[tokens, k] or [batch, tokens, k]. The link (runtime.link.transmit) runs here,
on the device side, so a client-server run reproduces the in-process numbers.
Only numpy and httpx (Pillow, only to read an image answer: `answer_images`).

With `task` (the package's model.kind) the server checks the payload is for that task;
an image message also names its size (`image_size=(H, W)`) and is answered with PNGs.
"""

from __future__ import annotations

import io
import math

import numpy as np

from semedge.core.errors import UserError

NPY_TYPE = "application/x-npy"
LAYOUT_TYPE = "application/x-semedge-layout"  # as runtime.decode_api.LAYOUT_TYPE
LAYOUT_VERSION = "1"
DTYPES = ("float32", "float16")


def to_npy(symbols: np.ndarray, dtype: str = "float32") -> bytes:
    if dtype not in DTYPES:
        raise UserError(f"wire dtype {dtype!r} is not supported", f"use one of {', '.join(DTYPES)}")
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(symbols, dtype=dtype), allow_pickle=False)
    return buf.getvalue()


def to_layout(k: np.ndarray, stream: np.ndarray, dtype: str = "float32") -> bytes:
    """A layout message's body: np.save of k [T] (int32, each frame's k_t) then of stream [sum k]."""
    k = np.asarray(k)
    if k.ndim != 1 or k.dtype.kind not in "iu" or np.asarray(stream).shape != (int(k.sum()),):
        raise UserError(f"layout k {k.shape} {k.dtype} and stream {np.asarray(stream).shape} do not fit",
                        "pass runner.layout_message's k (ints, [T]) and stream ([sum k])")
    buf = io.BytesIO()
    np.save(buf, k.astype(np.int32), allow_pickle=False)
    return buf.getvalue() + to_npy(stream, dtype)


def _body(symbols: np.ndarray, layout, dtype: str) -> tuple[bytes, str]:
    """(body, content type): a plain .npy, or with `layout` (k_t per frame) the layout message;
    a layout whose frames all keep the same k' goes as the plain [T, k'] array (the same decode)."""
    if layout is None:
        return to_npy(symbols, dtype), NPY_TYPE
    k = np.asarray(layout)
    if k.size and (k == k[0]).all() and symbols.shape == (int(k.sum()),):
        return to_npy(symbols.reshape(len(k), int(k[0])), dtype), NPY_TYPE
    return to_layout(k, symbols, dtype), f"{LAYOUT_TYPE}; version={LAYOUT_VERSION}"


def apply_link(symbols: np.ndarray, channel: str, snr_db, rng: np.random.Generator | None = None) -> np.ndarray:
    """One message [tokens, k] or a layout's stream [sum k_t] (or a batch [B, tokens, k], one message
    each) through the channel."""
    from semedge.runtime.link import transmit

    x = np.asarray(symbols, dtype=np.float32)
    if x.ndim in (1, 2):
        return transmit(x[None], channel, snr_db, rng)[0]
    if x.ndim == 3:
        return transmit(x, channel, snr_db, rng)
    raise UserError(f"symbols have shape {x.shape}, expected [tokens, k] or [batch, tokens, k]", "pass the runner's output")


def send(
    server_url: str,
    package_id: str,
    symbols: np.ndarray,
    timeout: float = 60.0,
    *,
    channel: str | None = None,
    snr_db: float = math.inf,
    rng: np.random.Generator | None = None,
    dtype: str = "float32",
    client=None,
    token: str | None = None,
    ca: str | None = None,
    message_id: str | None = None,
    retries: int = 0,
    task: str | None = None,
    image_size: tuple[int, int] | None = None,
    layout: np.ndarray | None = None,
) -> dict:
    """POST symbols to `server_url`/v1/decode?package=ID; returns the server's JSON.

    With `channel` (e.g. "awgn"), the symbols go through runtime.link.transmit at
    `snr_db` first (the received symbols are what the server gets). `client`: an
    httpx.Client to reuse connections (`make_client`); else one is made with `token`
    and `ca`. Errors from the server raise ServerError with its status code and reason.
    `retries`: tries again after an unreachable server, a timeout or a 502/503/504, with the
    same `message_id` (X-Semedge-Message-Id; a random one if not given), so a server that
    already decoded the message answers it from its replay cache instead of decoding it twice.
    `task`: the payload's task (?task=; the server refuses a package of another task with 422);
    `image_size`: (height, width) in pixels of the image the symbols encode (image packages).
    `layout`: each frame's k_t (runner.LayoutMessage.k); `symbols` is then the 1-D stream of sum k_t
    symbols (LayoutMessage.stream), sent as a layout message (LAYOUT_TYPE; the link applies to the stream).
    """
    import time
    import uuid

    import httpx

    if channel is not None:
        symbols = apply_link(symbols, channel, snr_db, rng)
    body, ctype = _body(np.asarray(symbols), layout, dtype)
    url = server_url.rstrip("/") + "/v1/decode"
    params = {"package": package_id, **({"task": task} if task else {})}
    if image_size is not None:
        params.update(height=int(image_size[0]), width=int(image_size[1]))
    headers = {"content-type": ctype}
    if message_id or retries:
        headers[MESSAGE_ID_HEADER] = message_id or uuid.uuid4().hex
    for attempt in range(retries + 1):
        try:
            return _post_once(client, url, params, body, headers, timeout, token, ca, server_url)
        except (ServerError, UserError) as e:
            if attempt == retries or getattr(e, "status", 503) not in RETRY_STATUSES:
                raise
            time.sleep(min(2.0, 0.2 * 2 ** attempt))
    raise AssertionError("unreachable")


MESSAGE_ID_HEADER = "x-semedge-message-id"
RETRY_STATUSES = (502, 503, 504)  # and no answer at all (status None: connection error, timeout)


def _post_once(client, url, params, body, headers, timeout, token, ca, server_url) -> dict:
    """One POST; the JSON answer, ServerError for a refusal, UserError (status 503) when unreachable."""
    import httpx

    try:
        if client is None:
            with make_client(timeout, token=token, ca=ca) as c:
                r = c.post(url, params=params, content=body, headers=headers)
        else:
            r = client.post(url, params=params, content=body, headers=headers, timeout=timeout)
    except httpx.HTTPError as e:
        fix = ("pass the server's certificate with --ca (or check that --server names the host it was made for)"
               if "CERTIFICATE_VERIFY_FAILED" in str(e) else "start it with `semedge serve --packages DIR` and check --server")
        raise UserError(f"could not reach the server at {server_url} ({type(e).__name__}: {e})", fix) from None
    if r.status_code != 200:
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        raise ServerError(r.status_code, str(detail))
    return r.json()


def answer_images(answer: dict) -> list[np.ndarray]:
    """An image package's answer -> its reconstructions, uint8 [H, W, 3] each (decoded from PNG)."""
    import base64

    if "image" not in answer:
        raise UserError(f"the answer of package {answer.get('package')} holds no image (task {answer.get('task')})",
                        "send images to an image package")
    from PIL import Image

    out = []
    for b64 in answer["image"]:
        with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
            out.append(np.asarray(im.convert("RGB")))
    return out


def make_client(timeout: float = 60.0, *, token: str | None = None, ca: str | None = None):
    """An httpx.Client that sends `Authorization: Bearer TOKEN` (when given) and, with `ca`,
    trusts only that PEM certificate (or CA bundle) for HTTPS: the server's is pinned."""
    import os
    import ssl

    import httpx

    verify: ssl.SSLContext | bool = True
    if ca is not None:
        if not os.path.isfile(ca):
            raise UserError(f"CA file {ca} does not exist", "give the server's certificate (PEM) to --ca")
        try:
            verify = ssl.create_default_context(cafile=str(ca))
        except (OSError, ssl.SSLError) as e:
            raise UserError(f"CA file {ca} is not a PEM certificate ({e})", "give the server's certificate (PEM) to --ca") from None
    headers = {"authorization": f"Bearer {token.strip()}"} if token else {}
    return httpx.Client(timeout=timeout, headers=headers, verify=verify)


class ServerError(UserError):
    """The server refused a request: `status` is the HTTP code, `detail` its reason."""

    def __init__(self, status: int, detail: str):
        self.status = status
        self.detail = detail
        fix = {401: "give this device's token (--token or SEMEDGE_TOKEN; `semedge auth add` makes one)",
               403: "use a package this device's token is scoped to, or widen its packages in the auth file",
               429: "slow down: this device is over its rate or concurrency limit (see Retry-After)",
               404: "check the package id (GET /healthz lists the served packages)",
               413: "send fewer tokens per request", 422: "send the runner's output for this package",
               503: "retry later (the server is busy or shutting down)"}.get(status, "see the server's log")
        super().__init__(f"server answered {status}: {detail}", fix)
