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


# ---------------------------------------------------------------- the decoder's prompt and server sessions


class EchoHost:
    """The decode API's host protocol (runtime/decode_api.py) with a decoder that echoes its prompt."""

    def __init__(self, rule="fifo", max_items=2, guard=False, embed=toy_embed):
        from semedge.runtime.decode_api import ReplayCache
        from semedge.runtime.server import Metrics, ServerConfig

        self.cfg, self.metrics, self.cache = ServerConfig(context_guard=guard), Metrics(), ReplayCache()
        self.sessions = Sessions(MemoryConfig(rule=rule, max_items=max_items), embed=embed)
        self.calls = []

    def package_ids(self):
        return {"p"}

    async def limits(self, pid):
        return 4, 64

    async def decode(self, pid, arr, prompts=None):
        self.calls.append(prompts)
        return [(f"m{int(a[0, 0])}" + (f" after {prompts[i]}" if prompts and prompts[i] else ""), 0.0, 0.0, 1)
                for i, a in enumerate(arr)]


def _client(host):
    from fastapi import FastAPI, Request
    from fastapi.testclient import TestClient

    from semedge.runtime.decode_api import handle_decode

    app = FastAPI()

    @app.post("/v1/decode")
    async def decode(request: Request, package: str):
        return await handle_decode(host, request, package)

    return TestClient(app)


def _send(client, n, session=None, mid=None):
    from semedge.runtime.client import to_npy

    body = to_npy(np.full((1, 3, 4), n, np.float32))
    params = {"package": "p"} | ({"session": session} if session else {})
    r = client.post("/v1/decode", params=params, content=body, headers={"x-semedge-message-id": mid} if mid else {})
    return r.status_code, r.json()


def test_sessions_through_the_decode_api_never_see_each_other():
    host = EchoHost()
    c = _client(host)
    assert _send(c, 1, "alice")[1]["text"] == ["m1"]
    assert _send(c, 2, "alice")[1]["text"] == ["m2 after m1"]
    assert _send(c, 3, "bob")[1]["text"] == ["m3"]  # bob sees nothing of alice's
    assert _send(c, 4, "alice", mid="x")[1]["text"] == ["m4 after m1 m2 after m1"]
    assert _send(c, 4, "alice", mid="x")[1]["replayed"]  # a retry is answered from the cache, not stored again
    assert host.sessions.get("p", "alice").texts() == ["m2 after m1", "m4 after m1 m2 after m1"]  # max_items=2
    assert _send(c, 5)[1]["text"] == ["m5"] and host.calls[-1] is None  # no session: no memory
    code, body = _send(c, 6, "bad id!")
    assert code == 422 and "session" in body["detail"]
    host.sessions = None
    code, body = _send(c, 6, "alice")
    assert code == 422 and "--memory" in body["detail"]


def test_corr_decodes_first_then_prompts_with_the_closest():
    host = EchoHost("corr")
    c = _client(host)
    for n in (1, 2):
        _send(c, n, "s")
    assert host.calls == [None, [""], None, ["m1"]]  # a first pass without prompt, then the prompted decode


@pytest.fixture(scope="module")
def tiny_half():
    from semedge.semcom.jsc import JSCCodec, JSCConfig
    from semedge.semcom.models import tiny_model
    from semedge.semcom.split import build_split

    import torch

    torch.manual_seed(1)
    half = build_split(tiny_model("whisper"), JSCCodec(JSCConfig(d_model=64, k=16, hidden=64))).server
    rng = np.random.default_rng(0)
    return half, [torch.from_numpy(rng.standard_normal((10 + 3 * i, 16)).astype(np.float32)) for i in range(3)]


@pytest.mark.slow  # a tiny Whisper + its CTranslate2 conversion: ~2 min on a busy 2-core host
def test_prompt_on_both_backends(tiny_half, tmp_path, monkeypatch):
    from semedge.semcom.ct2_backend import CT2Whisper

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    half, msgs = tiny_half
    ids = half.prompt_ids("hello world")
    assert ids[0] == half.loaded.tokenizer.convert_tokens_to_ids("<|startofprev|>") and half.prompt_ids(" ") == []
    assert len(half.prompt_ids("word " * 500)) == half.model.config.max_target_positions // 2  # Whisper's limit
    prompts = ["hello world", "", "hello world"]
    ref = half.generate(msgs, 6, prompts)
    assert half.transcribe(msgs[1:2], 6, [""]) == half.transcribe(msgs[1:2], 6)
    assert half.transcribe(msgs[:1], 6, ["hello world"]) != half.transcribe(msgs[:1], 6)  # the prompt is used
    half.ct2 = CT2Whisper(half.loaded, "float32", threads=1)
    try:
        got = half.generate(msgs, 6, prompts)
    finally:
        half.ct2 = None
    assert [list(map(int, r))[: len(g)] for r, g in zip(ref, got)] == got


@pytest.mark.slow  # exports a tiny package: minutes on a busy 2-core host
def test_local_server_sessions(tmp_path):
    import torch
    from conftest import tiny_whisper_package

    from semedge.runtime.package import Package
    from semedge.runtime.server import ServerConfig, create_app, serve_in_thread

    loaded, split, path = tiny_whisper_package(tmp_path / "tiny")
    pkg = Package.load(path)
    cfg = ServerConfig(max_new_tokens=8, backend="torch", memory="fifo", memory_items=4, max_wait_ms=1)
    rng = np.random.default_rng(0)
    msgs = [rng.standard_normal((10 + 3 * i, 16)).astype(np.float32) for i in range(2)]
    half = split.server
    with serve_in_thread(create_app([pkg], loader=lambda src: loaded, config=cfg)) as url:
        import httpx

        from semedge.runtime.client import to_npy

        def send(m, sid):
            r = httpx.post(f"{url}/v1/decode", params={"package": pkg.package_id, "session": sid}, content=to_npy(m))
            return r.json()["text"][0]

        a0, a1, b1 = send(msgs[0], "a"), send(msgs[1], "a"), send(msgs[1], "b")
    plain = [half.transcribe([torch.from_numpy(m)], 8)[0] for m in msgs]
    assert a0 == plain[0] and b1 == plain[1]
    assert a1 == half.transcribe([torch.from_numpy(msgs[1])], 8, prompts=[a0])[0]


def test_kb_passages_prompt_every_message_and_update_live(tmp_path):
    from semedge.semcom.kb import KnowledgeBase

    host = EchoHost()
    kb = KnowledgeBase(tmp_path / "kb", toy_embed, create=True)
    kb.add("food", "boil pasta slowly")
    host.kb = KnowledgeBase(tmp_path / "kb", toy_embed)  # the server's own connection
    host.cfg.kb_passages = 1
    c = _client(host)
    assert _send(c, 1)[1]["text"] == ["m1 after boil pasta slowly"]  # no session: the KB alone
    kb.add("py", "python lists hold objects")  # `semedge kb add` while the server runs: no restart
    host.sessions.get("p", "s").add("python rocks")  # a session about python: the search uses its latest text
    assert _send(c, 4, "s")[1]["text"][0].startswith("m4 after python lists hold objects")
