"""semcom/kb.py: add / list / remove survive a restart, search, a corrupt KB is a clear error."""

import numpy as np
import pytest

from semedge.core.errors import UserError
from semedge.semcom.kb import KnowledgeBase, passages

VOCAB = ["python", "weather", "pasta", "quantum"]


def toy_embed(texts):
    out = np.array([[t.lower().count(w) for w in VOCAB] for t in texts], float) + 1e-3
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_add_list_remove_survive_a_restart(tmp_path):
    kb = KnowledgeBase(tmp_path / "kb", toy_embed, create=True)
    assert kb.add("py.txt", "Python lists are mutable. Python tuples are not.") == 1
    kb.add("food.txt", "Boil the pasta. Salt the pasta water.")
    reader = KnowledgeBase(tmp_path / "kb", toy_embed)  # a server's connection, open while kb add runs
    assert reader.search("pasta please", k=1)[0].doc == "food.txt"
    kb.add("qc.txt", "Quantum computers use qubits.")
    assert reader.search("quantum", k=1)[0].doc == "qc.txt"  # seen without reopening
    kb.remove("py.txt")
    kb.close()
    again = KnowledgeBase(tmp_path / "kb", toy_embed)
    assert [d["name"] for d in again.list()] == ["food.txt", "qc.txt"]
    assert all(h.doc != "py.txt" for h in again.search("python", k=5))
    with pytest.raises(UserError, match="no document"):
        again.remove("py.txt")


def test_corrupt_or_missing_kb_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="not a knowledge base"):
        KnowledgeBase(tmp_path / "none", toy_embed)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "kb.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(UserError, match="not a readable knowledge base"):
        KnowledgeBase(bad, toy_embed)


def test_passages_pack_sentences():
    text = " ".join(f"Sentence number {i} is here." for i in range(40))
    ps = passages(text, max_chars=100)
    assert all(len(p) <= 100 for p in ps) and " ".join(ps) == text
