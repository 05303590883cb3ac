"""The receiver's memory: a bounded store of what the server decoded in a session, and its update rules.

The memory gives the decoder the recent context of a conversation: its best items go into
Whisper's prompt (`<|startofprev|>` text, semcom/split.py). Nothing new crosses the link:
the items are the server's own decodes of earlier messages.

Update rules (docs/context.md) score every item; when the store is over its bounds (items
or bytes) the lowest-scored item is evicted, and the prompt takes the highest-scored items
that fit its budget, in the order they were decoded.

- fifo: newer is better (the oldest item goes first).
- fresh: weight 0.5 ** (age / half_life), age in messages; items below `min_weight` expire
  even when the store has room.
- value: how often an item's words were produced in later decodes (ties: newer first).
- corr: cosine similarity of the item's sentence embedding (all-MiniLM-L6-v2 by default)
  to the current message (the caller's query: a first-pass decode of it).
- combinations: "fresh+corr", or weighted "fresh:0.3+value:0.7"; each part's scores are
  scaled to [0, 1] over the store before the weighted sum.

Pure Python + numpy; the embedding function is injected (`embed`), the default one loads
sentence-transformers (torch) only when a correlation rule first needs it.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from semedge.core.errors import UserError

RULES = ("fifo", "fresh", "value", "corr")
_WORD = re.compile(r"[a-z][a-z'\-]+")
_MIN_WORD = 4  # words shorter than this carry little (the, and, of): not counted for value
_SESSION_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")

Embed = Callable[[Sequence[str]], np.ndarray]  # texts -> [n, d] unit vectors


def content_words(text: str) -> set[str]:
    """Lowercase words of at least _MIN_WORD letters: what `value` counts in later decodes."""
    return {w for w in _WORD.findall(text.lower()) if len(w) >= _MIN_WORD}


def parse_rule(rule: str) -> dict[str, float]:
    """"fifo" | "fresh+corr" | "fresh:0.3+value:0.7" -> {rule: weight}; UserError naming the bad part."""
    if not isinstance(rule, str) or not rule.strip():
        raise UserError(f"memory rule {rule!r} is empty", f"use one of {', '.join(RULES)} or a sum like fresh+corr")
    out: dict[str, float] = {}
    for part in rule.split("+"):
        name, _, w = part.strip().partition(":")
        if name not in RULES:
            raise UserError(f"memory rule {name!r} (in {rule!r}) is unknown",
                            f"use {', '.join(RULES)}, or a sum like fresh+corr or fresh:0.3+value:0.7")
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            raise UserError(f"memory rule weight {w!r} (in {rule!r}) is not a number", "write e.g. fresh:0.3+value:0.7") from None
        if weight <= 0:
            raise UserError(f"memory rule weight {weight} (in {rule!r}) must be > 0", "write e.g. fresh:0.3+value:0.7")
        out[name] = out.get(name, 0.0) + weight
    return out


def default_embed(texts: Sequence[str]) -> np.ndarray:
    """all-MiniLM-L6-v2 unit embeddings (the model semcom.metrics scores similarity with)."""
    from semedge.semcom.metrics import _embed

    return _embed(list(texts))


@dataclass
class Item:
    text: str
    step: int  # the message number it was decoded at
    words: set[str]
    uses: int = 0  # later decodes that produced its words (value)
    vec: np.ndarray | None = None  # its embedding, for corr

    @property
    def nbytes(self) -> int:
        return len(self.text.encode("utf-8"))


@dataclass
class MemoryConfig:
    rule: str = "fifo"
    max_items: int = 8
    max_bytes: int = 4096  # UTF-8 bytes of text held
    half_life: float = 4.0  # fresh: messages until an item's weight halves
    min_weight: float = 0.05  # fresh: items lighter than this expire
    prompt_chars: int = 600  # text handed to the decoder (Whisper's prompt holds <= 223 tokens)
    weights: dict = field(init=False)

    def __post_init__(self):
        self.weights = parse_rule(self.rule)
        for name, v, lo in (("max_items", self.max_items, 1), ("max_bytes", self.max_bytes, 16),
                            ("prompt_chars", self.prompt_chars, 0)):
            if not isinstance(v, int) or v < lo:
                raise UserError(f"memory {name}={v!r} must be an integer >= {lo}", f"e.g. --memory-items 8")
        if not self.half_life > 0 or not 0 <= self.min_weight < 1:
            raise UserError(f"memory half_life={self.half_life}, min_weight={self.min_weight}",
                            "use half_life > 0 and 0 <= min_weight < 1")


class Memory:
    """One session's store. `add(text)` after each decode; `prompt(query)` before the next one."""

    def __init__(self, config: MemoryConfig | None = None, embed: Embed | None = None):
        self.cfg = config or MemoryConfig()
        self.embed = embed or default_embed
        self.items: list[Item] = []
        self.step = 0  # messages seen

    @property
    def needs_query(self) -> bool:
        """True when the rule scores against the current message (corr): the caller decodes it first."""
        return "corr" in self.cfg.weights

    @property
    def nbytes(self) -> int:
        return sum(it.nbytes for it in self.items)

    def _scores(self, query: str | None = None) -> np.ndarray:
        """The rule's score per item (higher = keep / prompt first)."""
        n = len(self.items)
        if n == 0:
            return np.zeros(0)
        parts = {"fifo": lambda: np.array([it.step for it in self.items], float),
                 "fresh": lambda: np.array([self._weight(it) for it in self.items]),
                 "value": lambda: np.array([it.uses for it in self.items], float),
                 "corr": lambda: self._similarity(query)}
        total = np.zeros(n)
        for name, w in self.cfg.weights.items():
            s = parts[name]()
            if len(self.cfg.weights) > 1:  # a sum: scale each part to [0, 1] first
                span = s.max() - s.min()
                s = (s - s.min()) / span if span > 0 else np.zeros(n)
            total += w * s
        return total + 1e-9 * np.array([it.step for it in self.items])  # ties: newer first

    def _weight(self, it: Item) -> float:
        return 0.5 ** ((self.step - it.step) / self.cfg.half_life)

    def _similarity(self, query: str | None) -> np.ndarray:
        """Cosine similarity of each item to `query` (no query: to the newest item)."""
        missing = [it for it in self.items if it.vec is None]
        if missing:
            for it, v in zip(missing, self.embed([it.text for it in missing])):
                it.vec = np.asarray(v, float)
        q = self.embed([query])[0] if query else self.items[-1].vec
        return np.array([float(np.dot(it.vec, q)) for it in self.items])

    def add(self, text: str) -> list[str]:
        """Store a decoded message, credit the items it reused (value), evict to the bounds.
        Returns the evicted texts, oldest first."""
        text = " ".join(str(text).split())
        self.step += 1
        words = content_words(text)
        for it in self.items:
            if it.words & words:
                it.uses += 1
        evicted = []
        if "fresh" in self.cfg.weights:  # too old to matter, room or not
            evicted += [it for it in self.items if self._weight(it) < self.cfg.min_weight]
            self.items = [it for it in self.items if it not in evicted]
        if text:
            raw = text.encode("utf-8")[-self.cfg.max_bytes:]  # one huge item keeps its end
            self.items.append(Item(raw.decode("utf-8", "ignore"), self.step, words))
        while len(self.items) > self.cfg.max_items or self.nbytes > self.cfg.max_bytes:
            low = int(np.argmin(self._scores(text)[:-1])) if len(self.items) > 1 else 0
            evicted.append(self.items.pop(low))  # the newest item is never the one evicted for itself
        return [it.text for it in sorted(evicted, key=lambda it: it.step)]

    def prompt(self, query: str | None = None, max_chars: int | None = None) -> str:
        """The highest-scored items that fit `max_chars` (default cfg.prompt_chars), in decode order."""
        budget = self.cfg.prompt_chars if max_chars is None else max_chars
        if not self.items or budget <= 0:
            return ""
        order = np.argsort(-self._scores(query), kind="stable")
        chosen, used = [], 0
        for i in order:
            n = len(self.items[i].text) + 1
            if used + n <= budget:
                chosen.append(self.items[i])
                used += n
        return " ".join(it.text for it in sorted(chosen, key=lambda it: it.step))

    def texts(self) -> list[str]:
        return [it.text for it in self.items]


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    w = _WORD.findall(text.lower())
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def keep_prompted(plain: str, prompted: str, prompt: str, ratio: float = 1.3, slack: int = 2, copy_n: int = 5) -> bool:
    """Receiver-side guard over the two decodes of one message (no reference): keep the prompted
    one unless it ran on (more than ratio x + slack the unprompted one's words) or copied a run of
    copy_n words from the prompt that the unprompted decode does not have."""
    if len(prompted.split()) > ratio * len(plain.split()) + slack:
        return False
    return not (_ngrams(prompted, copy_n) & _ngrams(prompt, copy_n)) - _ngrams(plain, copy_n)


def check_session_id(sid: str) -> str:
    """A session id: 1-128 of [A-Za-z0-9-_.:]; UserError otherwise."""
    if not isinstance(sid, str) or not 1 <= len(sid) <= 128 or not set(sid) <= _SESSION_CHARS:
        raise UserError(f"session id {sid!r} is not accepted", "use 1 to 128 characters of A-Z a-z 0-9 - _ . :")
    return sid


class Sessions:
    """One Memory per (package, session id), at most `max_sessions` (least recently used go first);
    a session idle for `idle_s` expires. Thread-safe; `clock` is injectable for tests."""

    def __init__(self, config: MemoryConfig, max_sessions: int = 1024, idle_s: float = 900.0,
                 embed: Embed | None = None, clock: Callable[[], float] = time.monotonic):
        if max_sessions < 1 or not idle_s > 0:
            raise UserError(f"sessions: max_sessions={max_sessions}, idle_s={idle_s}", "use max_sessions >= 1, idle_s > 0")
        self.cfg, self.max_sessions, self.idle_s = config, max_sessions, idle_s
        self.embed, self.clock = embed, clock
        self._mem: OrderedDict[tuple[str, str], tuple[float, Memory]] = OrderedDict()
        self._lock = threading.Lock()
        self.expired = 0

    def get(self, package: str, session: str) -> Memory:
        """The session's memory (a new, empty one for a new or expired id)."""
        key = (package, check_session_id(session))
        now = self.clock()
        with self._lock:
            self._expire(now)
            mem = self._mem.pop(key, (now, None))[1] or Memory(self.cfg, self.embed)
            self._mem[key] = (now, mem)
            while len(self._mem) > self.max_sessions:
                self._mem.popitem(last=False)
                self.expired += 1
            return mem

    def _expire(self, now: float) -> None:
        while self._mem and next(iter(self._mem.values()))[0] < now - self.idle_s:
            self._mem.popitem(last=False)
            self.expired += 1

    def __len__(self) -> int:
        return len(self._mem)


__all__ = ["RULES", "Item", "Memory", "MemoryConfig", "Sessions", "check_session_id", "content_words",
           "default_embed", "keep_prompted", "parse_rule"]
