"""The `semedge` command line.

Each area keeps its commands in its own module (`semedge/cli_*.py`, each with a
`register(app)` function) and imports heavy libraries inside the commands, so
`semedge --help` stays fast. Bad input raises UserError: one line, exit code 2.
"""

from __future__ import annotations

import importlib
import sys

import typer

from semedge.semcom.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="semedge: split a large encoder-decoder at the radio link, compress the device half per device, "
    "export it to ONNX, serve the decoder, and measure everything.",
)

# Modules that add commands to `app`; a module not written yet is skipped.
COMMAND_MODULES = [
    "semedge.cli_transmit",   # transmit, eval
    "semedge.cli_train",      # train
    "semedge.cli_profiles",   # profiles ..., profile
    "semedge.cli_export",     # export, device ..., serve
    "semedge.cli_runtime",    # device run, serve
    "semedge.cli_compress",   # plan
    "semedge.cli_build",      # build, demo
]

for _name in COMMAND_MODULES:
    try:
        _mod = importlib.import_module(_name)
    except ModuleNotFoundError as e:  # only a missing command module is tolerated
        if e.name != _name:
            raise
        continue
    _mod.register(app)


def main(argv: list[str] | None = None) -> int:
    try:
        app(args=argv, standalone_mode=False)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        return e.exit_code
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except Exception as e:  # click usage errors: name the problem, exit 2
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
