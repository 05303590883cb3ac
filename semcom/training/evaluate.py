"""Measuring a codec through the channel on cached encoder outputs: WER per channel x SNR x k',
long recordings as several messages, the rate table and the rate policy fitted on it.

Equal to the link (system.run_link) except that the encoder output comes from the feature
cache (fp16-rounded).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from semedge.core.errors import UserError
from semedge.semcom.stats import fmt_ci
from semedge.semcom.training.data import Example, speech_examples
from semedge.semcom.training.feature_cache import cached_speech_features


def server_half(loaded, codec, silence, backend: str, threads: int = 0):
    """The server half that decodes: PyTorch, or CTranslate2 ('ct2' int8, 'ct2-float32'; threads 0: its default)."""
    from semedge.semcom.split import ServerHalf

    server = ServerHalf(loaded, codec.decoder, silence).eval()
    if backend.startswith("ct2"):
        from semedge.semcom.ct2_backend import engine_for

        server.ct2 = engine_for(loaded, "float32" if backend == "ct2-float32" else "int8", threads=threads)
    elif backend != "torch":
        raise UserError(f"backend {backend!r} is unknown", "use torch, ct2 or ct2-float32")
    return server


@torch.no_grad()
def transmit_examples(loaded, codec, examples: list[Example], channel: str, snr_db: float, k_keep: int | None = None,
                      seed: int = 0, batch_size: int = 8, max_new_tokens: int = 96, silence=None,
                      backend: str = "torch", rate=None) -> tuple[list[str], list[int]]:
    """Send each example's encoder output through codec + channel; return (hypotheses, real symbols sent per message).
    backend: "torch", or "ct2" / "ct2-float32" (the server's CTranslate2 decoder, int8 by default).
    rate: a semcom.importance.ImportanceRate (a per-frame layout, header counted) instead of k_keep."""
    from semedge.semcom.channels import make_channel
    from semedge.semcom.split import silence_encoding
    from semedge.semcom.system import send_layout

    if silence is None and loaded.task.fills_silence:
        silence = silence_encoding(loaded)
    server = server_half(loaded, codec, silence, backend)
    ch = make_channel(channel)
    gen = torch.Generator().manual_seed(seed)
    hyps, sent = [], []
    for b in range(0, len(examples), batch_size):
        msgs = []
        for e in examples[b : b + batch_size]:
            x = codec.encoder(e.h.float().unsqueeze(0), k_keep=k_keep)[0]  # [n, k]
            if k_keep is not None:
                x = x[:, :k_keep]
            msgs.append(x)
        if rate is None:
            rx = [ch(m.unsqueeze(0), snr_db, generator=gen)[0] for m in msgs]
            sent += [m.numel() for m in msgs]
        else:
            out = [send_layout(m, rate, ch, snr_db, gen, codec.cfg.power) for m in msgs]
            rx = [y for y, _ in out]
            sent += [lay.symbols for _, lay in out]
        hyps += server.transcribe(rx, max_new_tokens=max_new_tokens)
    return hyps, sent


def validate(tr, snrs=(10.0,), channel: str = "awgn") -> dict:
    """WER of trainer `tr`'s receiver on its validation examples, clean and at each SNR."""
    from semedge.semcom.metrics import wer

    loaded, codec = tr.receiver()
    refs = [e.text for e in tr.val_examples]
    out = {"n": len(refs), "channel": channel}
    for s in [math.inf, *snrs]:
        hyps, _ = transmit_examples(loaded, codec, tr.val_examples, channel if math.isfinite(s) else "none", s,
                                    seed=tr.cfg.seed, silence=tr.silence)
        out["wer_clean" if not math.isfinite(s) else f"wer_{s:g}dB"] = round(wer(refs, hyps), 4)
    return out


def measure_rate_table(loaded, codec, examples: list[Example], snrs, candidates, channel: str = "awgn",
                       seed: int = 0, silence=None, progress: bool = True, backend: str = "torch") -> dict[float, dict[int, float]]:
    """WER for each SNR x kept-symbol count k' (the data `rate.fit_policy` fits)."""
    from semedge.semcom.metrics import wer

    refs = [e.text for e in examples]
    table: dict[float, dict[int, float]] = {}
    grid = [(float(s), int(kk)) for s in snrs for kk in candidates]
    it = grid
    if progress:
        from tqdm import tqdm

        it = tqdm(grid, desc="rate table", unit="point")
    for s, kk in it:
        hyps, _ = transmit_examples(loaded, codec, examples, channel, s, k_keep=None if kk >= codec.cfg.k else kk,
                                    seed=seed, silence=silence, backend=backend)
        table.setdefault(s, {})[kk] = wer(refs, hyps)
    return table


def fit_rate_policy(tr, snrs, candidates=None, channel: str = "awgn", tolerance: float = 0.02):
    """Measure WER per SNR x k' on trainer `tr`'s validation examples and fit the rate policy (see semcom.rate)."""
    from semedge.semcom.rate import fit_policy

    if not tr.val_examples:
        raise UserError("--fit-rate needs validation utterances", "give --n-val 16 or more")
    k = tr.cfg.k
    if candidates is None:
        lo = tr.cfg.rate_min or k
        candidates = sorted({kk for kk in (lo, k // 4, k // 2, k) if lo <= kk <= k})
    loaded, codec = tr.receiver()
    table = measure_rate_table(loaded, codec, tr.val_examples, snrs, candidates, channel, seed=tr.cfg.seed,
                               silence=tr.silence, progress=tr.progress)
    return fit_policy(k, table, tolerance)


def score_row(refs, hyps, with_similarity: bool = True, normalizer: str = "whisper", keep_errors: bool = False) -> dict:
    """WER, BLEU (and similarity) with their bootstrap 95% intervals (`wer_ci95` ...), the
    normaliser's name, the median per-utterance WER and the runaway rate. keep_errors adds
    `word_errors` (per-utterance [errors, words]) for paired comparisons (semcom.stats)."""
    from semedge.semcom import metrics

    s = metrics.score(refs, hyps, with_similarity, normalizer, keep_errors=True)
    per = [e / max(w, 1) for e, w in s["word_errors"]]
    out = {"wer": s["wer"], "bleu": s["bleu"], "wer_ci95": s["wer_ci95"], "bleu_ci95": s["bleu_ci95"],
           "normalizer": s["normalizer"],
           "wer_median": float(np.median(per)) if per else float("nan"),
           "runaway_rate": float(np.mean([w > 1.0 for w in per])) if per else float("nan")}  # share of utterances with WER > 1 (repetition loops)
    if with_similarity:
        out.update(similarity=s["similarity"], similarity_ci95=s["similarity_ci95"])
    if keep_errors:
        out["word_errors"] = s["word_errors"]
    return out


def eval_codec(base, jsc: str):
    """(receiver, codec, Checkpoint | None) to evaluate: a trained codec, or with jsc='identity'
    the calibrated identity codec (the unsplit model's features, standardised)."""
    from semedge.semcom.checkpoint import load_for_inference
    from semedge.semcom.split import identity_codec

    rx, ck = load_for_inference(base, jsc)
    if ck is not None:
        return rx, ck.codec, ck
    if jsc != "identity":
        raise UserError(f"no JSC codec to evaluate for {base.source} (--jsc {jsc})",
                        "pass --jsc CKPT (a folder semedge train wrote), or --jsc identity for unsplit features")
    return rx, identity_codec(base), None


def k_sent(ck, codec, k, snr_db: float) -> int:
    """Symbols per token sent at this SNR: the codec's k, a given k' <= k, or the rate policy's ('auto')."""
    from semedge.semcom.rate import choose_k

    kmax = codec.cfg.k
    if k == "auto" and ck is not None:
        return choose_k(ck, snr_db)
    kk = kmax if k in (None, "auto") else int(k)
    if codec.cfg.identity and kk != kmax:
        raise UserError(f"--k {kk}: the identity codec sends all {kmax} features per token", "drop --k")
    if not 1 <= kk <= kmax:
        raise UserError(f"--k {kk} is outside [1, {kmax}] for this codec", f"give 1..{kmax} or auto")
    return kk


# ---------------------------------------------------------------- long recordings


def data_examples(loaded, utts, encoder=None, max_s: float = 30.0, progress: bool = True):
    """(examples, groups, max_new_tokens) for the user's utterances: a recording longer than `max_s`
    is cut at quiet points (segment_bounds) and each segment is its own example (message);
    groups[i] lists utterance i's segments. Encoder outputs come from the feature cache."""
    from semedge.core.segment import new_tokens_for, segment_bounds

    segs, groups = [], []
    for u in utts:
        bounds = segment_bounds(u.audio, max_s)
        groups.append(list(range(len(segs), len(segs) + len(bounds))))
        segs += [u if len(bounds) == 1 else dataclasses.replace(u, id=f"{u.id}@{a}-{b}", audio=u.audio[a:b])
                 for a, b in bounds]
    feats = cached_speech_features(encoder or loaded, segs, progress=progress)
    examples = [Example(s.id, feats[s.id], [], "") for s in segs]
    return examples, groups, new_tokens_for(max(len(s.audio) for s in segs) / 16000)


def join_segments(groups, hyps: list[str], sent: list[int]) -> tuple[list[str], list[int]]:
    """Per utterance: its segments' transcripts joined, and the channel uses (complex symbols) of all of them."""
    from semedge.core.segment import join_texts

    return ([join_texts(hyps[j] for j in g) for g in groups],
            [sum((sent[j] + 1) // 2 for j in g) for g in groups])


# ---------------------------------------------------------------- a system, every channel x SNR


def _system_name(codec, k) -> str:
    if codec.cfg.identity:
        return "identity"
    return f"jsc-k{codec.cfg.k}" + ("-auto" if k == "auto" else f"-k{k}" if k else "")


def _eval_data(base, codec, ck, n: int, split: str, data, max_segment_s, progress: bool):
    """(examples, groups, refs, max_new_tokens, max_segment_s): the built-in split, or the user's recordings in segments."""
    from semedge.semcom.checkpoint import device_encoder

    if data is None:
        examples = speech_examples(base, split, n, progress=progress, encoder=device_encoder(ck))
        return examples, [[i] for i in range(len(examples))], [e.text for e in examples], 96, max_segment_s
    from semedge.core.segment import default_segment_s

    max_segment_s = max_segment_s or default_segment_s(codec.cfg.identity)
    examples, groups, tokens = data_examples(base, data, device_encoder(ck), max_segment_s, progress)
    return examples, groups, [u.text for u in data], tokens, max_segment_s


def evaluate_system(model: str, jsc: str, channels, snrs, k=None, n: int = 200, split: str = "test", seed: int = 0,
                    with_similarity: bool = True, progress: bool = True, system: str | None = None,
                    backend: str = "torch", data=None, max_segment_s: float | None = None,
                    keep_errors: bool = False) -> list[dict]:
    """Rows {system, channel, snr_db, k_sent, wer, bleu, similarity, channel_uses, n} for a JSC checkpoint
    (or jsc='identity': the unsplit model's features); each figure has its 95% interval beside it
    (`wer_ci95` ..., see score_row) and the row names its text normaliser.

    `k`: None (the codec's k), an int k' <= k, or 'auto' (the checkpoint's rate policy per SNR).
    `data`: Utterances to measure on (e.g. semcom.tasks.audiofolder.load_audiofolder) instead of
    the first `n` of the built-in `split`; recordings longer than `max_segment_s` (default:
    default_segment_s) are sent as several messages and their transcripts joined (rows then
    carry `segments` and `segment_s`). keep_errors: rows carry `word_errors` for paired tests.
    """
    from semedge.core.channel_spec import parse_snr
    from semedge.semcom.models import load_model
    from semedge.semcom.split import silence_encoding

    base = load_model(model)
    rx, codec, ck = eval_codec(base, jsc)
    examples, groups, refs, tokens, max_segment_s = _eval_data(base, codec, ck, n, split, data, max_segment_s, progress)
    silence = silence_encoding(base)
    name = system or _system_name(codec, k)
    rows = []
    for ch in channels:
        for s in map(parse_snr, snrs):
            kk = k_sent(ck, codec, k, s)
            hyps, sent = transmit_examples(rx, codec, examples, ch, s, k_keep=None if kk == codec.cfg.k else kk,
                                           seed=seed, silence=silence, backend=backend, max_new_tokens=tokens)
            hyps, uses = join_segments(groups, hyps, sent)
            row = {"system": name, "channel": ch, "snr_db": s, "k_sent": kk, "n": len(refs),
                   "channel_uses": float(np.mean(uses)), **score_row(refs, hyps, with_similarity, keep_errors=keep_errors)}
            if data is not None:
                row.update(segments=len(examples), segment_s=max_segment_s)
            rows.append(row)
            if progress:
                print(f"  {name} {ch} {s:g} dB: WER {fmt_ci(row['wer_ci95'])}  uses {row['channel_uses']:.0f}", flush=True)
    return rows
