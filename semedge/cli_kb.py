"""`semedge kb add|list|remove --kb DIR`: knowledge bases for the server's prompt (semcom/kb.py, docs/context.md).

A running server that serves `--kb DIR` sees documents added or removed here at its next
message (one SQLite file, committed per command): no restart, no fine-tuning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import typer

from semedge.core.errors import UserError

kb_app = typer.Typer(no_args_is_help=True, help="Knowledge bases: documents whose passages the server puts in the decoder's prompt.")
_KB = typer.Option(..., "--kb", help="the knowledge-base folder (holds kb.sqlite)")


@kb_app.command("add")
def kb_add(files: List[Path] = typer.Argument(..., help="UTF-8 text files; a name already there is replaced"),
           kb: Path = _KB):
    """Add documents (created with the folder when it does not exist yet)."""
    from semedge.semcom.kb import KnowledgeBase

    texts = {}
    for f in files:
        try:
            texts[f.name] = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {f} ({e})", "give UTF-8 text files") from None
    base = KnowledgeBase(kb, create=True)
    for name, text in texts.items():
        typer.echo(f"{name}: {base.add(name, text)} passages", err=True)


@kb_app.command("list")
def kb_list(kb: Path = _KB, as_json: bool = typer.Option(False, "--json", help="JSON on stdout")):
    """The documents, their passage counts and hashes."""
    from semedge.semcom.kb import KnowledgeBase

    docs = KnowledgeBase(kb, embed=lambda texts: None).list()
    if as_json:
        typer.echo(json.dumps(docs))
        return
    for d in docs:
        typer.echo(f"{d['name']}\t{d['passages']} passages\t{d['sha256'][:12]}")


@kb_app.command("remove")
def kb_remove(names: List[str] = typer.Argument(..., help="document names as `kb list` shows them"), kb: Path = _KB):
    """Remove documents."""
    from semedge.semcom.kb import KnowledgeBase

    base = KnowledgeBase(kb, embed=lambda texts: None)
    have = {d["name"] for d in base.list()}
    missing = [n for n in names if n not in have]
    if missing:  # nothing removed unless all are there
        raise UserError(f"no document {', '.join(map(repr, missing))} in {kb}", f"see semedge kb list --kb {kb}")
    for n in names:
        base.remove(n)


def register(app: typer.Typer) -> None:
    app.add_typer(kb_app, name="kb")
