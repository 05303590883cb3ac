"""Signed packages: Ed25519 over the exact bytes of a package's manifest.json.

The manifest lists the sha256 of every file, so a signature over it covers the whole
package: change one byte of device.onnx and its hash no longer matches; rewrite the
hash too and the signature no longer matches. The signature sits beside the manifest
in `signature.json` (core.layout.SIGNATURE), which the manifest does not list.

    new_keypair(folder)                      # folder/signing.key (0600) + folder/signing.pub
    sign_package(pkg_dir, "keys/signing.key")
    check_signature(pkg_dir, "keys/signing.pub")   # UntrustedPackage unless signed by that key

Keys are PEM (PKCS#8 private, SubjectPublicKeyInfo public), unencrypted: protect
signing.key with file permissions. Device side: `cryptography` only, no torch.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path

from semedge.core.errors import UserError
from semedge.core.files import sha256_bytes, write_atomic
from semedge.core.layout import MANIFEST, SIGNATURE

SIG_FORMAT = "semedge-signature/1"
KEY_FILE = "signing.key"
PUB_FILE = "signing.pub"
_RESIGN = "sign it with the builder's key (semedge keys sign PKG --key signing.key, or semedge export ... --sign KEY)"


class UntrustedPackage(UserError):
    """A package that --trust refuses: unsigned, signed by another key, or changed after signing."""


def key_id(public_key) -> str:
    """First 16 hex digits of the sha256 of the raw 32-byte public key (printed, and stored in signatures)."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return sha256_bytes(raw)[:16]


def new_keypair(folder: str | Path) -> tuple[Path, Path, str]:
    """Write folder/signing.key (0600) and folder/signing.pub; refuse to overwrite. -> (key, pub, key id)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    folder = Path(folder).expanduser()
    key_path, pub_path = folder / KEY_FILE, folder / PUB_FILE
    for p in (key_path, pub_path):
        if p.exists():
            raise UserError(f"{p} already exists; a new key would replace the one your packages are signed with",
                            "choose another --out folder, or remove the old key files yourself")
    folder.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    pub = private.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    write_atomic(key_path, pem, mode=0o600)
    write_atomic(pub_path, pub)
    return key_path, pub_path, key_id(private.public_key())


def _read_pem(path: str | Path, what: str) -> bytes:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{what} {p} does not exist", "make a key pair with `semedge keys new --out DIR`")
    return p.read_bytes()


def load_private_key(path: str | Path):
    """An Ed25519 private key from a PEM file (UserError naming the file otherwise)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data = _read_pem(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise UserError(f"signing key {path} is not an unencrypted PEM private key ({e})",
                        f"give the {KEY_FILE} written by `semedge keys new`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UserError(f"signing key {path} is not an Ed25519 key", "make one with `semedge keys new --out DIR`")
    return key


def load_public_key(path: str | Path):
    """An Ed25519 public key from a PEM file (UserError naming the file otherwise)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    data = _read_pem(path, "trusted key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise UserError(f"trusted key {path} is not a PEM public key ({e})",
                        f"give the builder's {PUB_FILE} (not {KEY_FILE})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise UserError(f"trusted key {path} is not an Ed25519 key", f"give the {PUB_FILE} from `semedge keys new`")
    return key


def signature_record(manifest_bytes: bytes, private_key) -> dict:
    """The contents of signature.json for these manifest bytes."""
    sig = private_key.sign(manifest_bytes)
    return {"format": SIG_FORMAT, "algorithm": "ed25519", "key_id": key_id(private_key.public_key()),
            "manifest_sha256": sha256_bytes(manifest_bytes), "signature": base64.b64encode(sig).decode()}


def write_signature(folder: str | Path, private_key) -> dict:
    """Sign folder/manifest.json with `private_key`; write folder/signature.json atomically."""
    folder = Path(folder)
    rec = signature_record((folder / MANIFEST).read_bytes(), private_key)
    write_atomic(folder / SIGNATURE, json.dumps(rec, indent=2, sort_keys=True) + "\n")
    return rec


def _read_signature(root: Path) -> dict:
    path = root / SIGNATURE
    if not path.is_file():
        raise UntrustedPackage(f"package {root} is not signed (no {SIGNATURE}) and --trust requires a signature", _RESIGN)
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UntrustedPackage(f"package {root}: {SIGNATURE} is not valid JSON ({e})", _RESIGN) from None
    if not isinstance(rec, dict) or rec.get("format") != SIG_FORMAT or rec.get("algorithm") != "ed25519":
        raise UntrustedPackage(f"package {root}: {SIGNATURE} is not a {SIG_FORMAT} ed25519 record", _RESIGN)
    return rec


def check_signature(folder: str | Path, trusted, manifest_bytes: bytes | None = None) -> str:
    """Refuse (UntrustedPackage) unless folder/manifest.json (or `manifest_bytes`, the copy the
    caller will parse) is signed by one of `trusted` (public keys, or paths to signing.pub
    files). Returns the signer's key id."""
    from cryptography.exceptions import InvalidSignature

    root = Path(folder).expanduser()
    keys = [load_public_key(k) if isinstance(k, (str, os.PathLike)) else k for k in _as_list(trusted)]
    rec = _read_signature(root)
    by_id = {key_id(k): k for k in keys}
    signer = rec.get("key_id")
    if signer not in by_id:
        raise UntrustedPackage(f"package {root} is signed by key {signer}, not by a trusted key ({', '.join(by_id)})",
                               "get the package from its trusted builder, or pass that builder's signing.pub to --trust")
    try:
        sig = base64.b64decode(str(rec.get("signature", "")), validate=True)
        data = (root / MANIFEST).read_bytes() if manifest_bytes is None else manifest_bytes
        by_id[signer].verify(sig, data)
    except (InvalidSignature, binascii.Error, ValueError):
        raise UntrustedPackage(f"package {root}: {SIGNATURE} does not match {MANIFEST} (changed after signing)",
                               "re-export and sign the package, then copy the whole folder") from None
    return signer


def _as_list(trusted) -> list:
    if trusted is None:
        return []
    return list(trusted) if isinstance(trusted, (list, tuple)) else [trusted]
