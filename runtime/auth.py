"""Authenticated devices: bearer tokens (stored as sha256), package scopes, per-device limits.

The auth file (YAML, `semedge serve --auth FILE`; `semedge auth add` writes it):

    limits: {rate_per_s: 20, burst: 40, max_concurrent: 4}     # optional defaults for every device
    devices:
      phone-1:
        token_sha256: 9f86d0…                                   # sha256 of the token, never the token
        packages: ["whisper-base-*"]                            # package ids or fnmatch patterns; "*": all
        rate_per_s: 5                                           # optional, overrides limits

`Gate` does the per-request checks, in this order, for any HTTP host (the FastAPI server
in runtime/server.py, a Ray Serve host): who is calling (401), may it use this package
(403), is it within its request rate and concurrency (429 with Retry-After). Plain
Python and a lock: no web framework, no torch.
"""

from __future__ import annotations

import math
import re
import secrets
import threading
import time
from dataclasses import dataclass, field, fields, replace
from fnmatch import fnmatchcase
from pathlib import Path

from semedge.core.errors import UserError
from semedge.core.files import sha256_bytes, write_atomic

TOKEN_PREFIX = "sek_"
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ADD = "semedge auth add NAME --auth FILE"


@dataclass(frozen=True)
class Limits:
    rate_per_s: float = 20.0  # requests per second, sustained (token bucket)
    burst: int = 40  # requests allowed at once above the rate
    max_concurrent: int = 4  # requests in flight at once


@dataclass(frozen=True)
class Device:
    name: str
    token_sha256: str
    packages: tuple[str, ...]
    limits: Limits = field(default_factory=Limits)

    def may_use(self, package_id: str) -> bool:
        return any(fnmatchcase(package_id, p) for p in self.packages)


class AuthError(Exception):
    """A refused request: HTTP `status`, JSON `detail`, and headers (WWW-Authenticate, Retry-After)."""

    def __init__(self, status: int, detail: str, headers: dict | None = None):
        self.status, self.detail, self.headers = status, detail, dict(headers or {})
        super().__init__(detail)


# ----------------------------------------------------------------------------- the file


def new_token() -> str:
    """A fresh bearer token (256 random bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return sha256_bytes(token.strip())


def _limits(raw: dict, where: str, base: Limits) -> Limits:
    """Override `base` with the limit keys of `raw` (each checked)."""
    out = base
    for f in fields(Limits):
        if f.name not in raw:
            continue
        v = raw[f.name]
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and math.isfinite(v)
        if not ok or (f.type in ("int", int) and int(v) != v):
            raise UserError(f"{where}.{f.name} is {v!r}, not a positive {'integer' if f.type in ('int', int) else 'number'}",
                            f"e.g. {f.name}: {getattr(Limits(), f.name)}")
        out = replace(out, **{f.name: type(getattr(base, f.name))(v)})
    return out


def _device(name, raw, where: str, base: Limits) -> Device:
    allowed = {"token_sha256", "packages"} | {f.name for f in fields(Limits)}
    if not isinstance(name, str) or not _NAME.match(name):
        raise UserError(f"{where}: device name {name!r} is not 1-64 letters, digits, '.', '_' or '-'", "rename it")
    if not isinstance(raw, dict):
        raise UserError(f"{where}.{name} is not a mapping", f"give token_sha256 and packages (or use `{_ADD}`)")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise UserError(f"{where}.{name}.{unknown[0]} is not a known field", f"allowed: {', '.join(sorted(allowed))}")
    digest = raw.get("token_sha256")
    if not isinstance(digest, str) or not _HEX64.match(digest):
        raise UserError(f"{where}.{name}.token_sha256 is not 64 lowercase hex digits",
                        f"store sha256(token), not the token; `{_ADD}` writes it")
    pk = raw.get("packages")
    if not isinstance(pk, list) or not pk or not all(isinstance(p, str) and p for p in pk):
        raise UserError(f"{where}.{name}.packages is not a non-empty list of package ids",
                        'e.g. packages: ["whisper-base-*"], or ["*"] for every package')
    return Device(name, digest, tuple(pk), _limits(raw, f"{where}.{name}", base))


def parse_auth(data, source: str = "auth file") -> dict[str, Device]:
    """The devices of an auth file's parsed YAML (UserError naming the field otherwise)."""
    if not isinstance(data, dict) or not isinstance(data.get("devices"), dict) or not data["devices"]:
        raise UserError(f"{source}: no `devices:` mapping with at least one device", f"add one with `{_ADD}`")
    unknown = sorted(set(data) - {"devices", "limits"})
    if unknown:
        raise UserError(f"{source}: top-level field {unknown[0]!r} is not known", "allowed: devices, limits")
    lim = data.get("limits") or {}
    if not isinstance(lim, dict) or set(lim) - {f.name for f in fields(Limits)}:
        raise UserError(f"{source}: limits must map rate_per_s, burst, max_concurrent to numbers",
                        "e.g. limits: {rate_per_s: 20, burst: 40, max_concurrent: 4}")
    base = _limits(lim, f"{source}: limits", Limits())
    devices = {n: _device(n, raw, f"{source}: devices", base) for n, raw in data["devices"].items()}
    seen: dict[str, str] = {}
    for d in devices.values():
        if d.token_sha256 in seen:
            raise UserError(f"{source}: devices {seen[d.token_sha256]} and {d.name} have the same token",
                            f"give each device its own token (`{_ADD}`)")
        seen[d.token_sha256] = d.name
    return devices


def _read_yaml(path: Path):
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"auth file {path} is not valid YAML ({' '.join(str(e).split())})", "fix the YAML syntax") from None


def load_auth(path: str | Path) -> dict[str, Device]:
    """Read and check an auth file; a missing or bad one is a UserError naming the field."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"auth file {p} does not exist", f"create it with `{_ADD.replace('FILE', str(p))}`")
    return parse_auth(_read_yaml(p), f"auth file {p}")


def add_device(path: str | Path, name: str, packages: list[str]) -> str:
    """Append device `name` to the auth file (created 0600 when missing); returns its fresh token.
    Only the token's sha256 is stored. Comments in the file are not kept."""
    import yaml

    p = Path(path).expanduser()
    data = _read_yaml(p) if p.is_file() else {"devices": {}}
    if not isinstance(data, dict) or not isinstance(data.get("devices", {}), dict):
        raise UserError(f"auth file {p} has no `devices:` mapping", "fix the file or give a new --auth path")
    data.setdefault("devices", {})
    if name in data["devices"]:
        raise UserError(f"device {name} is already in {p}", "choose another name, or remove its entry first")
    token = new_token()
    data["devices"][name] = {"token_sha256": token_hash(token), "packages": list(packages)}
    parse_auth(data, f"auth file {p}")  # the result must load
    write_atomic(p, yaml.safe_dump(data, sort_keys=False), mode=0o600)
    return token


# ----------------------------------------------------------------------------- per request


class _Bucket:
    def __init__(self, limits: Limits):
        self.limits, self.level, self.t, self.inflight = limits, float(limits.burst), time.monotonic(), 0

    def take(self) -> float:
        """0 when a request may go now (one taken), else the seconds until one may."""
        now = time.monotonic()
        self.level = min(self.limits.burst, self.level + (now - self.t) * self.limits.rate_per_s)
        self.t = now
        if self.level >= 1.0:
            self.level -= 1.0
            return 0.0
        return (1.0 - self.level) / self.limits.rate_per_s


class Lease:
    """One admitted request; `with gate.admit(...) as lease:` frees its concurrency slot on exit."""

    def __init__(self, gate: "Gate", device: Device):
        self.gate, self.device = gate, device

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.gate._release(self.device)


class Gate:
    """The checks one request passes, for any host: identify (401), scope (403), limits (429)."""

    def __init__(self, devices: dict[str, Device]):
        self.devices = dict(devices)
        self._by_hash = {d.token_sha256: d for d in self.devices.values()}
        self._buckets = {n: _Bucket(d.limits) for n, d in self.devices.items()}
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: str | Path) -> "Gate":
        return cls(load_auth(path))

    def identify(self, authorization: str | None) -> Device:
        """The device whose token is in `Authorization: Bearer TOKEN`; AuthError(401) otherwise."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError(401, "missing bearer token: send `Authorization: Bearer TOKEN`",
                            {"WWW-Authenticate": "Bearer"})
        device = self._by_hash.get(token_hash(token))
        if device is None:
            raise AuthError(401, "unknown or revoked token", {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return device

    def admit(self, authorization: str | None, package_id: str) -> Lease:
        """Identify the caller, check its scope and limits, and hold one of its concurrency slots."""
        device = self.identify(authorization)
        if not device.may_use(package_id):
            raise AuthError(403, f"device {device.name} may not use package {package_id!r}")
        with self._lock:
            b = self._buckets[device.name]
            if b.inflight >= device.limits.max_concurrent:
                raise AuthError(429, f"device {device.name} has {b.inflight} requests in flight "
                                f"(max_concurrent {device.limits.max_concurrent})", {"Retry-After": "1"})
            wait = b.take()
            if wait > 0:
                raise AuthError(429, f"device {device.name} is over its rate of {device.limits.rate_per_s:g} "
                                "requests/s", {"Retry-After": str(max(1, math.ceil(wait)))})
            b.inflight += 1
        return Lease(self, device)

    def _release(self, device: Device) -> None:
        with self._lock:
            self._buckets[device.name].inflight -= 1


def check_tls_files(certfile, keyfile) -> dict:
    """uvicorn's ssl options for a PEM certificate + key, checked (both or neither; each readable)."""
    if certfile is None and keyfile is None:
        return {}
    if certfile is None or keyfile is None:
        raise UserError("TLS needs both --ssl-certfile and --ssl-keyfile", "give both PEM files, or neither for plain HTTP")
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(str(certfile), str(keyfile))
    except (OSError, ssl.SSLError) as e:
        raise UserError(f"cannot load the TLS certificate {certfile} with key {keyfile} ({e})",
                        "give a PEM certificate and its matching unencrypted PEM private key") from None
    return {"ssl_certfile": str(certfile), "ssl_keyfile": str(keyfile)}


def write_self_signed(folder, common_name: str = "semedge local") -> tuple:
    """(cert.pem, key.pem) in `folder`: a self-signed CA certificate for 127.0.0.1, valid a day.
    For local tests and benchmarks (the client pins it with --ca); not for a deployment."""
    import datetime as dt
    import ipaddress
    from pathlib import Path

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_p, key_p = Path(folder) / "cert.pem", Path(folder) / "key.pem"
    cert_p.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_p.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
    return cert_p, key_p
