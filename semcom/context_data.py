"""Multi-utterance sessions for the memory module: consecutive sentences of one document, spoken.

Documents come from text installed on every machine with Python, and none of it is in the
speech training corpus (semcom/tasks/speech.py: WordNet examples, fortunes, pydoc topics):

- stdlib: the docstrings of each Python standard-library module (module, classes, functions,
  in source order), one document per module;
- debian: the long descriptions in /var/lib/dpkg/status, one document per package.

Sentences pass the speech task's `clean_sentence` and must end in . ! or ?; a sentence also
in the speech corpus's train split is dropped (test data stays disjoint from training).
A session is `per_session` consecutive kept sentences of one document, at most two sessions
per document, in a fixed hash order. Audio: the speech task's voices and its cache (split "test").

Rare terms (for recall): words of >= 4 letters seen at most once in the train split's
sentences; a term counts in a sentence when it also occurred earlier in its session (or, for
the knowledge-base rows, anywhere in the KB).

Knowledge base for retrieval (`kb_documents`): every document, less every sentence that holds
or is held by a sentence spoken in the chosen sessions, so the KB holds a session's other
passages (and all other documents) but never the sentence being decoded.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from semedge.core.errors import UserError
from semedge.semcom.metrics import normalize

DPKG_STATUS = Path("/var/lib/dpkg/status")
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PER_DOC = 2  # sessions per document at most


@dataclass(frozen=True)
class Session:
    id: str  # "stdlib:argparse:0"
    sentences: tuple[str, ...]


def _prose(text: str) -> list[str]:
    """Sentences of the flush-left paragraphs of a docstring or description (indented blocks are code)."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.split("\n")
        if any(ln.startswith(" ") for ln in lines):
            continue
        out += [t for t in _SENT_SPLIT.split(" ".join(ln.strip() for ln in lines)) if t[:1].isupper()]
    return out


def _stdlib_docs() -> dict[str, list[str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = {}
    for name in sorted(sys.stdlib_module_names):
        path = root / f"{name}.py"
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        docs[f"stdlib:{name}"] = [s for n in nodes for s in _prose(ast.get_docstring(n) or "")]
    return docs


def _debian_docs() -> dict[str, list[str]]:
    if not DPKG_STATUS.is_file():
        return {}
    docs = {}
    for block in DPKG_STATUS.read_text(encoding="utf-8", errors="replace").split("\n\n"):
        pkg = re.search(r"^Package: (\S+)", block, re.M)
        desc = re.search(r"^Description: .*\n((?: .*\n?)*)", block, re.M)
        if pkg and desc:
            lines = [ln[1:] for ln in desc.group(1).split("\n") if ln.strip() not in ("", ".")]
            docs[f"debian:{pkg.group(1)}"] = _prose("\n".join(lines))
    return docs


@functools.lru_cache(maxsize=1)
def _train_words() -> dict[str, int]:
    from semedge.semcom.tasks.speech import sentences

    counts: dict[str, int] = {}
    for s in sentences("train"):
        for w in normalize(s).split():
            counts[w] = counts.get(w, 0) + 1
    return counts


@functools.lru_cache(maxsize=1)
def documents() -> dict[str, list[str]]:
    """doc id -> its kept sentences, in document order."""
    from semedge.semcom.tasks.speech import clean_sentence, sentences

    train = {normalize(s) for s in sentences("train")}
    out = {}
    for doc, raw in {**_stdlib_docs(), **_debian_docs()}.items():
        seen, keep = set(), []
        for t in raw:
            s = clean_sentence(t)
            if s and s[-1] in ".!?" and normalize(s) not in train and normalize(s) not in seen:
                seen.add(normalize(s))
                keep.append(s)
        out[doc] = keep
    return out


def sessions(n: int | None = None, per_session: int = 4) -> list[Session]:
    """The first `n` sessions (all when None) of `per_session` consecutive sentences, in a fixed order."""
    if per_session < 2:
        raise UserError(f"per_session={per_session}: a session needs at least 2 sentences", "use --per-session 4")
    found = []
    for doc, sents in documents().items():
        for j in range(min(_PER_DOC, len(sents) // per_session)):
            found.append(Session(f"{doc}:{j}", tuple(sents[j * per_session:(j + 1) * per_session])))
    found.sort(key=lambda s: hashlib.sha1(s.id.encode()).hexdigest())
    if n is not None and n > len(found):
        raise UserError(f"{n} sessions of {per_session} sentences asked for, {len(found)} available",
                        f"ask for at most {len(found)}, or use a smaller --per-session")
    return found[:n] if n is not None else found


def rare_terms(sentence: str, earlier: list[str], max_train_count: int = 1, known: frozenset = frozenset()) -> list[str]:
    """The sentence's rare words (seen <= max_train_count times in the train split) that occurred
    earlier in its session or are in `known` (e.g. the KB's words)."""
    before = {w for e in earlier for w in normalize(e).split()} | known
    counts = _train_words()
    return sorted({w for w in normalize(sentence).split()
                   if len(w) >= 4 and w in before and counts.get(w, 0) <= max_train_count})


def _overlaps(padded: str, said: list[str]) -> bool:
    """Whether a sentence (normalised, space-padded) holds or is held by a spoken one, word for word."""
    return any(padded in p or p in padded for p in said)


def kb_documents(spoken: list[Session]) -> dict[str, str]:
    """doc id -> its text for the knowledge base: the kept sentences less every one that holds a
    spoken sentence or is held by one (normalised, whole words)."""
    said = [f" {normalize(t)} " for s in spoken for t in s.sentences]
    out = {}
    for doc, sents in documents().items():
        keep = [t for t in sents if not _overlaps(f" {normalize(t)} ", said)]
        if keep:
            out[doc] = " ".join(keep)
    return out


def words_of(texts) -> frozenset:
    """The normalised words of some texts (what `rare_terms(known=)` takes)."""
    return frozenset(w for t in texts for w in normalize(t).split())


def session_utterances(chosen: list[Session], family="mix", progress: bool = True) -> list:
    """The sessions' sentences spoken (speech task voices; cached with the test split), flat, in order."""
    from semedge.semcom.tasks import speech

    fams = speech.check_family(family)
    texts = [t for s in chosen for t in s.sentences]
    specs = [speech._plan("test", t, s.id.split(":")[0], speech.family_for(t, fams), 0.0)
             for s in chosen for t in s.sentences]
    utts = speech._load_specs("test", specs, progress)
    assert [u.text for u in utts] == texts
    return utts


__all__ = ["Session", "documents", "kb_documents", "rare_terms", "session_utterances", "sessions", "words_of"]
