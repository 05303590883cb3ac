"""Sentences for the speech data: English text installed on the machine (no download), cleaned,
assigned to test/val/train by a hash of its normalised text (disjoint, stable splits), each
split in a fixed seeded order.

Sources: WordNet gloss examples (Debian wordnet-base), fortunes-min, Python's `pydoc_data.topics`.
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

from semedge.core.errors import UserError
from semedge.semcom.metrics import normalize

SPLITS = ("train", "val", "test")
# Hash buckets out of 100: [0, 10) test, [10, 20) val, the rest train.
_TEST_PCT, _VAL_PCT = 10, 10
_ORDER_SEED = "semedge-speech-v1"
WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
MIN_WORDS, MAX_WORDS = 4, 20


_BAD_CHARS = re.compile(r"[^A-Za-z ,.;:!?'\-]")  # digits, quotes, brackets, symbols: not spoken cleanly
_CODE_LIKE = re.compile(r"\w\.\w|\w\(|::|--|\.\.|\b[a-z]+[A-Z]\w*|\b[A-Z]{2,}\b")


def clean_sentence(text: str) -> str | None:
    """One readable English sentence of 4-20 words, or None."""
    t = re.sub(r"\s+", " ", text).strip()
    if not t or not t.isascii() or _BAD_CHARS.search(t) or _CODE_LIKE.search(t):
        return None
    if not t[0].isalpha():
        return None
    # One sentence: no terminator except at the end.
    if re.search(r"[.!?;:]\s", t):
        return None
    words = t.split()
    if not (MIN_WORDS <= len(words) <= MAX_WORDS):
        return None
    if sum(c.isalpha() for c in t) < 0.75 * len(t.replace(" ", "")):
        return None
    return t


def _wordnet_examples() -> list[str]:
    out = []
    for pos in ("noun", "verb", "adj", "adv"):
        p = WORDNET_DIR / f"data.{pos}"
        if not p.exists():
            continue
        with open(p, encoding="latin-1") as f:
            for line in f:
                if line.startswith(" ") or "|" not in line:
                    continue  # licence header
                gloss = line.split("|", 1)[1]
                out.extend(re.findall(r'"([^"]+)"', gloss))
    return out


def _strip_overstrike(s: str) -> str:
    # fortune files bold/underline text with "x\bx" and "_\bx".
    while "\b" in s:
        s2 = re.sub(r".\x08", "", s)
        if s2 == s:
            s2 = s.replace("\b", "")
        s = s2
    return s


def _fortunes() -> list[str]:
    out = []
    if not FORTUNES_DIR.is_dir():
        return out
    for p in sorted(FORTUNES_DIR.iterdir()):
        if p.suffix or p.is_symlink() or not p.is_file():
            continue  # skip .dat indexes and .u8 links
        text = _strip_overstrike(p.read_text(encoding="latin-1"))
        for entry in re.split(r"^%\s*$", text, flags=re.M):
            if "\n\t" in entry or "\n  " in entry:
                continue  # verse, dialogue, attributions
            out.append(entry)
    return out


def _pydoc() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    out = []
    for key in sorted(topics):
        # Paragraphs of flush-left prose; indented blocks are grammar or code.
        for para in re.split(r"\n\s*\n", topics[key]):
            lines = para.split("\n")
            if any(ln.startswith(" ") for ln in lines) or re.match(r"^[*=\-]+$", lines[-1].strip()):
                continue
            prose = " ".join(ln.strip() for ln in lines)
            # Lowercase starts are fragments left after a code block.
            out.extend(t for t in re.split(r"(?<=[.!?])\s+(?=[A-Z])", prose) if t[:1].isupper())
    return out


_SOURCES = {"wordnet": _wordnet_examples, "fortunes": _fortunes, "pydoc": _pydoc}


def _hash(s: str, salt: str = "") -> int:
    return int.from_bytes(hashlib.sha1((salt + s).encode()).digest()[:8], "big")


def split_of(sentence: str) -> str:
    """The split a sentence belongs to (hash of its normalised text)."""
    b = _hash(normalize(sentence)) % 100
    return "test" if b < _TEST_PCT else "val" if b < _TEST_PCT + _VAL_PCT else "train"


@functools.lru_cache(maxsize=1)
def _corpus() -> dict[str, list[tuple[str, str]]]:
    """split -> [(sentence, source)] in the split's fixed order."""
    seen: set[str] = set()
    by_split: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for source, fn in _SOURCES.items():
        for raw in fn():
            s = clean_sentence(raw)
            if s is None:
                continue
            key = normalize(s)
            if key in seen:
                continue
            seen.add(key)
            by_split[split_of(s)].append((s, source))
    for items in by_split.values():
        items.sort(key=lambda it: (_hash(normalize(it[0]), _ORDER_SEED), it[0]))
    return by_split


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}", f"use one of {', '.join(SPLITS)}")
    return split


def sentences(split: str) -> list[str]:
    """All sentences of a split, in its fixed order."""
    return [s for s, _ in _corpus()[_check_split(split)]]


def split_sizes() -> dict[str, int]:
    return {s: len(_corpus()[s]) for s in SPLITS}
