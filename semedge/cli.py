"""The `semedge` command line.

Each area keeps its commands in its own module (`semedge/cli_*.py`, each with a
`register(app)` function) and imports heavy libraries inside the commands, so
`semedge --help` stays fast.

Exit codes (docs/cli.md): 0 done; 2 bad input (a `UserError`, or a usage error:
unknown command or option, missing value, bad choice), printed as one line on
stderr; 3 no plan fits (`plan`, `build`); 4 the ONNX export disagrees with PyTorch.
A command ends with another code by raising `typer.Exit(code)` or `UserError`.
Anything else is a bug and keeps its traceback. Third-party warnings and log lines
are hidden unless `--verbose` comes before the command.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import os
import sys
import warnings
from contextlib import contextmanager

import typer

from semedge import __version__

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="semedge: split a large encoder-decoder at the radio link, compress the device half per device, "
    "export it to ONNX, serve the decoder, and measure everything.",
)

# Modules that add commands to `app`; a module not written yet is skipped.
COMMAND_MODULES = [
    "semedge.cli_transmit",   # transmit
    "semedge.cli_train",      # train, train-image, eval, rate
    "semedge.cli_federate",   # federate (Flower imported inside the command)
    "semedge.cli_profiles",   # profiles ..., profile, device bench
    "semedge.cli_export",     # export
    "semedge.cli_runtime",    # device run, serve
    "semedge.cli_trust",      # keys new/sign, auth add
    "semedge.cli_kb",         # kb add/list/remove
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


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"semedge {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                 help="print `semedge X.Y.Z` and exit"),
    verbose: bool = typer.Option(False, "--verbose",
                                 help="show third-party warnings and log lines (before the command)"),
) -> None:
    """`--verbose` is read by `main` before the app runs (see `_quiet_third_party`)."""


# Expected failures -> exit code, first match wins: (module, class, exit code, fix).
# Classes are looked up in sys.modules: an exception of a module never imported cannot
# have been raised, so nothing heavy is imported to test against. Code None: the
# exception's own `exit_code` (UserError 2, NoPlanFits 3; click's FileError 1).
EXIT_CODES = (
    ("semedge.core.errors", "UserError", None, ""),
    ("typer._click.exceptions", "NoArgsIsHelpError", 2, ""),
    ("typer._click.exceptions", "UsageError", 2, "see {help}"),
    ("click.exceptions", "UsageError", 2, "see {help}"),
    ("semedge.export.onnx", "ExportParityError", 4,
     "nothing was kept of this export; try another --opset, or report it with this line"),
    ("typer._click.exceptions", "ClickException", None, ""),
    ("click.exceptions", "ClickException", None, ""),
    ("typer.exceptions", "Abort", 130, ""),
)

# Libraries that install their own handler (so a lastResort filter does not reach them)
# read their level from these at import; main sets them for its own run only.
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error"}
QUIET_LOGGERS = ("bitsandbytes", "transformers", "peft", "accelerate", "torch", "onnxruntime", "onnx",
                 "huggingface_hub", "datasets", "ctranslate2", "optimum", "httpx", "urllib3")


def _ours(record: logging.LogRecord) -> bool:
    return record.name.startswith("semedge") or record.levelno >= logging.ERROR


@contextmanager
def _quiet_third_party(quiet: bool):
    """While the app runs: third-party warnings and WARNING-or-lower log lines are dropped
    (bitsandbytes' "Failed to load CPU gemm_4bit_forward" and the like); ours stay."""
    if not quiet:
        yield
        return
    env = {k: os.environ.get(k) for k in QUIET_ENV}
    levels = {n: logging.getLogger(n).level for n in QUIET_LOGGERS}
    last = logging.lastResort
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.filterwarnings("default", module=r"semedge(\.|$)")
        for k, v in QUIET_ENV.items():
            os.environ.setdefault(k, v)
        for n in QUIET_LOGGERS:
            logging.getLogger(n).setLevel(logging.ERROR)
        if last is not None:
            last.addFilter(_ours)
        try:
            yield
        finally:
            if last is not None:
                last.removeFilter(_ours)
            for n, lvl in levels.items():
                logging.getLogger(n).setLevel(lvl)
            for k, v in env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _exit_code(e: BaseException) -> int | None:
    """Print an expected failure as one line on stderr and return its exit code; None: a bug."""
    for module, name, code, fix in EXIT_CODES:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is None or not isinstance(e, cls):
            continue
        if name == "NoArgsIsHelpError":  # `semedge` or `semedge profiles` alone: the help
            if e.format_message().strip():  # (with rich, typer has printed it already)
                e.show()
        else:
            ctx = getattr(e, "ctx", None)
            msg = " ".join(str(e.format_message() if hasattr(e, "format_message") else e).split())
            fix = fix.format(help=f"`{ctx.command_path} --help`" if ctx is not None else "the command's --help")
            typer.echo(f"error: {msg}" + (f" — fix: {fix}" if fix else ""), err=True)
        return getattr(e, "exit_code", 1) if code is None else code
    return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    before_command = itertools.takewhile(lambda a: a.startswith("-"), args)
    with _quiet_third_party(quiet="--verbose" not in before_command):
        try:
            rv = app(args=args, prog_name="semedge", standalone_mode=False)
        except Exception as e:  # noqa: BLE001 - an expected failure -> its exit code; the rest re-raised
            code = _exit_code(e)
            if code is None:
                raise
            return code
    # Without standalone mode click returns a typer.Exit's code, or else the command's value.
    return rv if type(rv) is int else 0


if __name__ == "__main__":
    sys.exit(main())
