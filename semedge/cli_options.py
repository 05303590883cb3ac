"""Option spellings shared by the commands, and the old spellings kept as hidden aliases.

One name per concept (docs/cli.md): `--device` names a device profile, `--k` the symbols
sent per token, `--json` prints the result as JSON on stdout. An old spelling is a hidden
option that still works and prints one deprecation line on stderr.
"""

from __future__ import annotations

import json

import typer

from semedge.core.errors import UserError


def old_spelling(name: str, new: str):
    """A hidden option for a deprecated spelling `name` of `new`."""
    return typer.Option(None, name, hidden=True, help=f"deprecated: use {new}")


def renamed(value, old_value, new: str, old: str):
    """The value of `new`, else of its old spelling `old` (with a deprecation line on stderr)."""
    if old_value is None:
        return value
    if value is not None:
        raise UserError(f"{old} and {new} are the same option ({old} is the old spelling)", f"give only {new}")
    typer.echo(f"warning: {old} is deprecated; use {new}", err=True)
    return old_value


def echo_json(obj) -> None:
    """One JSON document on stdout (paths and other non-JSON values as strings)."""
    typer.echo(json.dumps(obj, indent=1, default=str))
