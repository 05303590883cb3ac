"""Signed packages (runtime/trust.py): keys, signing, and the manifest-rewrite attack refused by --trust.

The packages here are hand-made (a tiny ONNX graph + a manifest with its hashes), so no
model is built; the CLI is run through the installed `semedge` script (exit-code contract).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import zipfile
from pathlib import Path

import pytest

from semedge.core.files import sha256_file
from semedge.core.layout import MANIFEST, SIGNATURE
from semedge.export.package import sign_package
from semedge.runtime.package import Package
from semedge.runtime.trust import UntrustedPackage, check_signature, new_keypair

from _tinyonnx import tiny_encoder
from test_cli_contract import clean, one_line_error, run


def _write_manifest(root: Path) -> None:
    files = {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*"))
             if p.is_file() and p.name not in (MANIFEST, SIGNATURE)}
    man = {"format": "semedge-package/1", "package_id": "tiny-00000000",
           "model": {"kind": "text", "d_model": 32, "source": "tiny:bart:0"},
           "jsc": {"k": 32}, "onnx": {"file": "device.onnx"}, "files": files}
    (root / MANIFEST).write_text(json.dumps(man, indent=2, sort_keys=True) + "\n")


def make_package(root: Path) -> Path:
    """A package folder the runtime accepts: a tiny ONNX graph and a manifest with its hash."""
    root.mkdir(parents=True)
    tiny_encoder(root / "device.onnx", d=32, ffn=64, layers=1)
    _write_manifest(root)
    return root


def rewrite_attack(root: Path) -> None:
    """What an attacker with write access does: change device.onnx, then fix its hash in the manifest."""
    onnx = root / "device.onnx"
    data = bytearray(onnx.read_bytes())
    data[-1] ^= 0x01  # one byte of the last initializer
    onnx.write_bytes(bytes(data))
    _write_manifest(root)


def serve_error(r, *words: str) -> None:
    """`semedge serve` prints `serving ...` first; then the one error line, exit 2."""
    clean(r)
    assert r.returncode == 2, (r.returncode, r.stderr)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(w in last for w in words), r.stderr


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    own = new_keypair(d / "own")
    other = new_keypair(d / "other")
    return own, other


@pytest.fixture
def signed(tmp_path, keys):
    pkg = make_package(tmp_path / "pkg")
    sign_package(pkg, keys[0][0])
    return pkg


def test_new_keypair_files_and_no_overwrite(keys):
    key, pub, kid = keys[0]
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert b"PRIVATE KEY" in key.read_bytes() and b"PUBLIC KEY" in pub.read_bytes() and len(kid) == 16
    with pytest.raises(Exception, match="already exists"):
        new_keypair(key.parent)


def test_signed_package_loads_with_trust(signed, keys):
    pkg = Package.load(signed, trust=keys[0][1])
    assert pkg.package_id == "tiny-00000000"
    assert check_signature(signed, [keys[1][1], keys[0][1]]) == keys[0][2]  # any of several keys


def test_manifest_rewrite_attack_passes_hashes_but_not_trust(signed, keys):
    rewrite_attack(signed)
    Package.load(signed)  # the hashes alone cannot tell: the attack succeeds without --trust
    with pytest.raises(UntrustedPackage, match="changed after signing"):
        Package.load(signed, trust=keys[0][1])


def test_unsigned_and_wrongly_signed_are_refused(tmp_path, keys):
    pkg = make_package(tmp_path / "pkg")
    with pytest.raises(UntrustedPackage, match="not signed"):
        Package.load(pkg, trust=keys[0][1])
    sign_package(pkg, keys[1][0])
    with pytest.raises(UntrustedPackage, match=f"signed by key {keys[1][2]}, not by a trusted key"):
        Package.load(pkg, trust=keys[0][1])
    (pkg / SIGNATURE).write_text("{not json")
    with pytest.raises(UntrustedPackage, match="not valid JSON"):
        Package.load(pkg, trust=keys[0][1])


def test_sign_package_checks_hashes_and_rewrites_the_zip(tmp_path, keys):
    pkg = make_package(tmp_path / "pkg")
    with zipfile.ZipFile(tmp_path / "pkg.zip", "w") as z:
        z.write(pkg / MANIFEST, f"pkg/{MANIFEST}")
    sign_package(pkg, keys[0][0])
    assert f"pkg/{SIGNATURE}" in zipfile.ZipFile(tmp_path / "pkg.zip").namelist()
    (pkg / "device.onnx").write_bytes(b"changed")  # hash no longer matches: not signed
    with pytest.raises(Exception, match="does not match its sha256"):
        sign_package(pkg, keys[0][0])


def test_public_key_as_signing_key_is_a_clear_error(tmp_path, keys):
    pkg = make_package(tmp_path / "pkg")
    with pytest.raises(Exception, match="not an unencrypted PEM private key"):
        sign_package(pkg, keys[0][1])


# ----------------------------------------------------------------------------- the CLI


def test_cli_keys_new_refuses_to_overwrite(tmp_path):
    r = run("keys", "new", "--out", str(tmp_path / "k"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "k" / "signing.key").is_file() and (tmp_path / "k" / "signing.pub").is_file()
    one_line_error(run("keys", "new", "--out", str(tmp_path / "k")), 2, "already exists")


def test_cli_keys_sign_then_bench_with_trust(tmp_path, keys):
    pkg = make_package(tmp_path / "pkg")
    r = run("keys", "sign", str(pkg), "--key", str(keys[0][0]))
    assert r.returncode == 0 and keys[0][2] in r.stdout, r.stderr
    r = run("device", "bench", str(pkg), "--trust", str(keys[0][1]), "--lengths", "8", "--runs", "1",
            "--warmup", "0", "--json")
    assert r.returncode == 0, r.stderr
    one_line_error(run("device", "bench", str(pkg), "--trust", str(keys[1][1]), "--runs", "1"), 2, "not by a trusted key")


def test_cli_refuses_the_tampered_package(tmp_path, keys):
    """device bench, device run and serve: exit 2, one line, before any model or server is touched."""
    pkg = make_package(tmp_path / "pkg")
    sign_package(pkg, keys[0][0])
    rewrite_attack(pkg)
    pub = str(keys[0][1])
    one_line_error(run("device", "bench", str(pkg), "--trust", pub, "--runs", "1"), 2, "changed after signing")
    one_line_error(run("device", "run", str(pkg), "--text", "hi", "--trust", pub, "--server", "http://127.0.0.1:9"),
                   2, "changed after signing")
    serve_error(run("serve", "--packages", str(pkg), "--trust", pub, "--port", "0"), "changed after signing")
    unsigned = make_package(tmp_path / "plain")
    serve_error(run("serve", "--packages", str(unsigned), "--trust", pub, "--port", "0"), "not signed")


def test_cli_export_sign_with_a_missing_key_fails_before_loading(tmp_path):
    r = run("export", "--device", "raspberry-pi-5", "--out", str(tmp_path / "p"), "--sign", str(tmp_path / "nope.key"))
    one_line_error(r, 2, "signing key", "does not exist")
    assert not (tmp_path / "p").exists()


def test_copy_of_a_signed_package_stays_valid(signed, keys, tmp_path):
    """The signature travels with the folder (copy, zip): nothing in it is tied to the path."""
    dst = tmp_path / "copy"
    shutil.copytree(signed, dst)
    assert Package.load(dst, trust=keys[0][1]).package_id == "tiny-00000000"
