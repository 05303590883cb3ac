"""Knowledge bases: documents split into passages, embedded with all-MiniLM-L6-v2, searched by cosine.

Store: one SQLite file, `DIR/kb.sqlite` (Python's own sqlite3: nothing to install). Documents,
passages and their embeddings (float32 BLOBs) are written in one transaction per `add`, so a
server reading the KB while `semedge kb add` runs sees all of a document or none of it, and a
killed writer leaves the last committed state. Search is exact: the embeddings are loaded into a
numpy matrix (reloaded when the file's change counter moves) and scored by dot product (unit
vectors). Why not a vector database: sqlite-vec needs SQLite extension loading, which this
Python's sqlite3 is built without; Chroma and LanceDB bring large dependency trees for a few
thousand passages that numpy scans in well under a millisecond per 10k (docs/context.md).
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from semedge.core.errors import UserError

DB_NAME = "kb.sqlite"
SCHEMA_VERSION = 1
_PASSAGE_CHARS = 400  # sentences are packed into passages of about this many characters
_SENT = re.compile(r"(?<=[.!?])\s+")

Embed = Callable[[Sequence[str]], np.ndarray]

_SCHEMA = """
create table if not exists meta (key text primary key, value text not null);
create table if not exists docs (id integer primary key, name text unique not null, sha256 text not null,
                                 added real not null, passages integer not null);
create table if not exists passages (id integer primary key, doc integer not null references docs(id) on delete cascade,
                                     text text not null, vec blob not null);
create index if not exists passages_doc on passages(doc);
"""


@dataclass
class Hit:
    doc: str
    text: str
    score: float


def passages(text: str, max_chars: int = _PASSAGE_CHARS) -> list[str]:
    """Whitespace-collapsed text packed sentence by sentence into passages of <= max_chars (a longer sentence stays whole)."""
    out, cur = [], ""
    for s in _SENT.split(" ".join(text.split())):
        if cur and len(cur) + 1 + len(s) > max_chars:
            out.append(cur)
            cur = s
        else:
            cur = f"{cur} {s}".strip()
    return out + ([cur] if cur else [])


class KnowledgeBase:
    """A KB folder. Thread-safe; several processes may share it (SQLite locking)."""

    def __init__(self, folder, embed: Embed | None = None, create: bool = False):
        self.dir = Path(folder).expanduser()
        self.path = self.dir / DB_NAME
        if not self.path.is_file():
            if not create:
                raise UserError(f"{self.dir} is not a knowledge base (no {DB_NAME})", f"create it: semedge kb add --kb {self.dir} FILES")
            self.dir.mkdir(parents=True, exist_ok=True)
        if embed is None:
            from semedge.semcom.memory import default_embed as embed
        self.embed = embed
        self._lock = threading.Lock()
        self._cache: tuple[int, np.ndarray, list[tuple[str, str]]] | None = None
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        fix = f"remove {self.dir} and add the documents again (semedge kb add --kb {self.dir} FILES)"
        try:
            db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
            db.execute("pragma foreign_keys = on")
            db.executescript(_SCHEMA)
            v = db.execute("select value from meta where key = 'schema'").fetchone()
            if v is None:
                with db:
                    db.execute("insert into meta values ('schema', ?)", (str(SCHEMA_VERSION),))
            elif v[0] != str(SCHEMA_VERSION):
                raise UserError(f"{self.path} has KB schema {v[0]}, this semedge reads {SCHEMA_VERSION}", fix)
            db.execute("pragma quick_check").fetchone()
            return db
        except sqlite3.DatabaseError as e:
            raise UserError(f"{self.path} is not a readable knowledge base ({e})", fix) from None

    def add(self, name: str, text: str) -> int:
        """Add (or replace) document `name`; returns its passage count. One transaction."""
        parts = passages(text)
        if not parts:
            raise UserError(f"document {name!r} has no text", "give text files with content")
        vecs = np.asarray(self.embed(parts), dtype=np.float32)
        sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
        with self._lock, self._db:
            self._db.execute("delete from docs where name = ?", (name,))
            cur = self._db.execute("insert into docs (name, sha256, added, passages) values (?, ?, ?, ?)",
                                   (name, sha, time.time(), len(parts)))
            self._db.executemany("insert into passages (doc, text, vec) values (?, ?, ?)",
                                 [(cur.lastrowid, p, v.tobytes()) for p, v in zip(parts, vecs)])
        return len(parts)

    def remove(self, name: str) -> None:
        with self._lock, self._db:
            if self._db.execute("delete from docs where name = ?", (name,)).rowcount == 0:
                raise UserError(f"no document {name!r} in {self.dir}", f"see semedge kb list --kb {self.dir}")

    def list(self) -> list[dict]:
        rows = self._db.execute("select name, sha256, added, passages from docs order by name").fetchall()
        return [{"name": n, "sha256": s, "added": a, "passages": p} for n, s, a, p in rows]

    def _matrix(self) -> tuple[np.ndarray, list[tuple[str, str]]]:
        """All embeddings [N, d] and (doc, text) per row, reloaded when another writer committed."""
        with self._lock:
            version = self._db.execute("pragma data_version").fetchone()[0] + self._db.total_changes
            if self._cache is None or self._cache[0] != version:
                rows = self._db.execute("select d.name, p.text, p.vec from passages p join docs d on d.id = p.doc "
                                        "order by p.id").fetchall()
                mat = np.stack([np.frombuffer(v, np.float32) for _, _, v in rows]) if rows else np.zeros((0, 1), np.float32)
                self._cache = (version, mat, [(d, t) for d, t, _ in rows])
            return self._cache[1], self._cache[2]

    def search(self, query: str, k: int = 3) -> list[Hit]:
        """The k passages most like `query` (cosine), best first."""
        mat, meta = self._matrix()
        if not query or not query.strip() or len(meta) == 0:
            return []
        q = np.asarray(self.embed([query])[0], dtype=np.float32)
        s = mat @ q
        best = np.argsort(-s, kind="stable")[:k]
        return [Hit(meta[i][0], meta[i][1], float(s[i])) for i in best]

    def close(self) -> None:
        self._db.close()


__all__ = ["DB_NAME", "Hit", "KnowledgeBase", "passages"]
