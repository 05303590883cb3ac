"""Scoring codec checkpoints on the clients' own test speech, outside a run (benchmarks/federated.py).

Every arm (no fine-tuning, federated, centralised) is read back through the normal checkpoint
loader (`load_for_inference`: the codec and the encoder LoRA), and sees the same utterances and
the same channel draws (one seeded generator per client x SNR), so differences are paired.
The server decodes with CTranslate2 int8 (`ct2_backend.engine_for` on the base model: the
Whisper decoder is frozen in every arm; only the JSC decoder in front of it differs).
"""

from __future__ import annotations

import torch

from semedge.semcom.federated.data import ClientData

DECODE_BATCH = 8


def arm_halves(loaded, jsc: str):
    """(device encoder, codec) of checkpoint folder `jsc`, its encoder LoRA applied as a receiver loads it."""
    from semedge.semcom.checkpoint import load_for_inference

    receiver, ck = load_for_inference(loaded, jsc)
    return receiver.model.model.encoder.eval(), ck.codec.eval()


@torch.no_grad()
def encoder_features(encoder, data: ClientData) -> list[torch.Tensor]:
    """Each utterance's encoder output over its content frames: [n_i, d]."""
    from semedge.semcom.split import whisper_front, whisper_layers

    return [whisper_layers(encoder, whisper_front(encoder, mel.unsqueeze(0)))[0, :n]
            for mel, n in zip(data.mels, data.frames)]


@torch.no_grad()
def received(codec, feats: list[torch.Tensor], channel, snr_db: float, seed: int) -> list[torch.Tensor]:
    """Each message JSC-encoded on its own frames, through the channel: [n_i, k] as the server gets it."""
    g = torch.Generator().manual_seed(seed)
    return [channel(codec.encoder(h.unsqueeze(0)), snr_db, generator=g)[0] for h in feats]


def transcribe(server, msgs: list[torch.Tensor]) -> list[str]:
    out = []
    for b in range(0, len(msgs), DECODE_BATCH):
        out += server.transcribe(msgs[b:b + DECODE_BATCH])
    return out


def score_arm(loaded, encoder, codec, tests: dict[int, ClientData], channel: str, snrs, seed: int = 0,
              threads: int = 1) -> dict[int, dict[str, list[tuple[int, int]]]]:
    """{client: {snr: per-utterance (word errors, reference words)}} of one arm."""
    from semedge.core.channel_spec import parse_snr
    from semedge.semcom.channels import make_channel
    from semedge.semcom.metrics import word_errors_per_utt

    from semedge.semcom.split import silence_encoding
    from semedge.semcom.training.evaluate import server_half

    ch, out = make_channel(channel), {}
    server = server_half(loaded, codec, silence_encoding(loaded), "ct2", threads)  # the arm's JSC decoder, Whisper on ct2 int8
    for part, data in tests.items():
        feats = encoder_features(encoder, data)
        out[part] = {}
        for j, snr in enumerate(snrs):
            msgs = received(codec, feats, ch, parse_snr(snr), seed * 1000 + 31 * part + j)
            out[part][snr] = [tuple(map(int, p)) for p in word_errors_per_utt(data.texts, transcribe(server, msgs))]
    return out


def summarise(pairs: dict[str, dict[int, dict[str, list]]], references=("start",)) -> dict:
    """Per arm, client (and "all": the clients' test sets pooled) and SNR: WER with its 95% interval and the
    paired difference arm - reference for each of `references` (same utterances, same channel draws)."""
    from semedge.semcom.stats import paired_wer_diff, wer_ci

    def cell(arm, part, snr):
        per = pairs[arm]
        return _pooled(per)[snr] if part == "all" else per[part][snr]

    out = {}
    for arm, per in pairs.items():
        parts = [*sorted(per), "all"]
        snrs = list(next(iter(per.values())))
        out[arm] = {str(part): {snr: {"wer": wer_ci(cell(arm, part, snr)),
                                      **{f"vs_{r}": paired_wer_diff(cell(r, part, snr), cell(arm, part, snr))
                                         for r in references if r != arm and r in pairs}}
                                for snr in snrs} for part in parts}
    return out


def _pooled(per: dict) -> dict[str, list]:
    snrs = next(iter(per.values())).keys()
    return {snr: [p for part in sorted(per) for p in per[part][snr]] for snr in snrs}
