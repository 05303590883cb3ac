"""semcom/memory.py: what each update rule keeps and evicts on a toy stream; bounds; sessions."""

import numpy as np
import pytest

from semedge.core.errors import UserError
from semedge.semcom.memory import Memory, MemoryConfig, Sessions, parse_rule

# A toy stream: topics "python" (a), "weather" (b), "cooking" (c).
STREAM = [
    "python lists hold objects",      # 1 a
    "rainy weather today",            # 2 b
    "boil pasta slowly",              # 3 c
    "python dictionaries map keys",   # 4 a
    "cloudy weather tomorrow",        # 5 b
]
TOPICS = {"python": 0, "lists": 0, "dictionaries": 0, "objects": 0, "keys": 0, "map": 0, "hold": 0,
          "weather": 1, "rainy": 1, "cloudy": 1, "today": 1, "tomorrow": 1,
          "pasta": 2, "boil": 2, "slowly": 2}


def toy_embed(texts):
    """Bag of topics, unit length: sentences on one topic have similarity 1, others 0."""
    out = np.zeros((len(texts), 3))
    for i, t in enumerate(texts):
        for w in t.lower().split():
            if w in TOPICS:
                out[i, TOPICS[w]] += 1
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def run(rule, items=3, texts=STREAM, **kw):
    mem = Memory(MemoryConfig(rule=rule, max_items=items, **kw), embed=toy_embed)
    evicted = [e for t in texts for e in mem.add(t)]
    return mem, evicted


def test_fifo_keeps_the_newest():
    mem, ev = run("fifo")
    assert mem.texts() == STREAM[2:]
    assert ev == STREAM[:2]


def test_fresh_expires_old_items_even_with_room():
    mem, ev = run("fresh", items=10, half_life=1.0, min_weight=0.2)  # weight < 0.2 after 3 messages
    assert mem.texts() == STREAM[2:]
    assert ev == STREAM[:2]
    mem, ev = run("fresh", items=10, half_life=10.0)
    assert mem.texts() == STREAM and ev == []


def test_value_keeps_items_whose_words_come_back():
    texts = STREAM + ["python python everywhere"]  # "python" reused: items 1 and 4 earn value
    mem, ev = run("value", texts=texts)
    assert "python lists hold objects" in mem.texts()
    assert "python dictionaries map keys" in mem.texts()
    assert "rainy weather today" in ev and "boil pasta slowly" in ev  # weather earned 1 (from 5), evicted last


def test_corr_keeps_items_like_the_current_message():
    texts = [STREAM[0], STREAM[1], STREAM[3], "python sets"]
    mem, ev = run("corr", texts=texts)  # full at the 4th: the least like it (weather) goes, not the oldest
    assert ev == ["rainy weather today"] and mem.texts() == [texts[0], texts[2], texts[3]]
    assert run("fifo", texts=texts)[1] == [texts[0]]
    # the prompt for a weather message brings the weather item first
    mem, _ = run("corr", items=5)
    assert mem.prompt(query="weather", max_chars=45) == "rainy weather today cloudy weather tomorrow"


def test_combination_and_weights():
    assert parse_rule("fresh:0.3+value:0.7") == {"fresh": 0.3, "value": 0.7}
    mem, _ = run("fifo:1+corr:3", items=5)
    assert mem.prompt(query="pasta", max_chars=20) == "boil pasta slowly"
    for bad in ("lru", "fresh:x", "fresh:-1", ""):
        with pytest.raises(UserError):
            parse_rule(bad)


def test_bounds_in_bytes_and_prompt_order():
    mem, ev = run("fifo", items=10, max_bytes=60)
    assert mem.nbytes <= 60 and mem.texts() == STREAM[3:]
    mem, _ = run("fifo", items=10)
    assert mem.prompt(max_chars=1000) == " ".join(STREAM)  # decode order
    assert mem.prompt(max_chars=0) == ""


def test_sessions_are_isolated_and_expire():
    now = [0.0]
    s = Sessions(MemoryConfig(max_items=4), max_sessions=2, idle_s=10, embed=toy_embed, clock=lambda: now[0])
    s.get("p", "alice").add("secret alpha words")
    assert s.get("p", "bob").texts() == []
    assert s.get("q", "alice").texts() == []  # another package, same id: another memory
    assert s.get("p", "alice").texts() == []  # evicted: max_sessions=2 (bob, q/alice newer)
    s.get("p", "alice").add("hello there")
    now[0] = 11.0
    assert s.get("p", "alice").texts() == []  # idle past 10 s
    with pytest.raises(UserError):
        s.get("p", "bad id!")
