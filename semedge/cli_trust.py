"""`semedge keys new|sign` (signed packages) and `semedge auth add` (device tokens). docs/security.md."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

keys_app = typer.Typer(no_args_is_help=True, help="Signing keys for packages (Ed25519).")
auth_app = typer.Typer(no_args_is_help=True, help="Device tokens for `semedge serve --auth FILE`.")


@keys_app.command("new")
def keys_new(out: Path = typer.Option(..., "--out", help="folder for signing.key (0600) and signing.pub; never overwritten")):
    """Make a signing key pair: sign packages with signing.key, give signing.pub to devices and servers (--trust)."""
    from semedge.runtime.trust import new_keypair

    key, pub, kid = new_keypair(out)
    typer.echo(f"{key}\n{pub}")
    typer.echo(f"key id {kid}: keep {key.name} private; give {pub.name} to `--trust`", err=True)


@keys_app.command("sign")
def keys_sign(
    package: Path = typer.Argument(..., help="the package folder (holds manifest.json)"),
    key: Path = typer.Option(..., "--key", help="signing.key from `semedge keys new`"),
):
    """Sign an existing package (e.g. one `semedge build` wrote); its hashes are checked first."""
    from semedge.export.package import sign_package

    rec = sign_package(package, key)
    typer.echo(f"{package}  signed by key {rec['key_id']}")


@auth_app.command("add")
def auth_add(
    name: str = typer.Argument(..., help="device name (letters, digits, '.', '_', '-')"),
    auth: Path = typer.Option(..., "--auth", help="the auth file (YAML); created 0600 when missing"),
    packages: Optional[str] = typer.Option("*", "--packages", help="comma-separated package ids or patterns "
                                           "(e.g. whisper-base-*); '*': every package"),
):
    """Add a device to the auth file and print its token once (only its sha256 is stored)."""
    from semedge.core.errors import UserError
    from semedge.runtime.auth import add_device

    scope = [p.strip() for p in (packages or "").split(",") if p.strip()]
    if not scope:
        raise UserError("--packages is empty", "give package ids or patterns, e.g. --packages 'whisper-base-*', or '*'")
    token = add_device(auth, name, scope)
    typer.echo(token)
    typer.echo(f"device {name} added to {auth} (packages: {', '.join(scope)}); the token above is shown only "
               "now: give it to the device (--token or SEMEDGE_TOKEN)", err=True)


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
    app.add_typer(auth_app, name="auth")
