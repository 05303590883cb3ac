"""Training examples and batches: the built-in speech, the user's audiofolder, text.

An Example is one message: the encoder output the device would send (from the feature
cache), the token ids the decoder should produce, and the reference text.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from semedge.core.errors import UserError
from semedge.core.frames import SAMPLE_RATE
from semedge.semcom.training.feature_cache import cached_speech_features


@dataclass
class Example:
    id: str
    h: torch.Tensor  # [n, d] encoder output over the content frames (fp16 cached, fp32 used)
    ids: list[int]  # full target sequence incl. prefix and end token
    text: str
    audio: np.ndarray | None = None  # kept when the encoder is trained
    target: torch.Tensor | None = None  # [n, d_model] the server model's own encoder output, when h comes from another encoder


def target_ids(loaded, text: str) -> list[int]:
    """Token ids the decoder should produce, with the model's prefix and end tokens (the task's)."""
    return loaded.task.target_ids(loaded, text)


def prefix_length(loaded) -> int:
    """Forced tokens at the start of every target (Whisper: SOT, language, task, notimestamps)."""
    return loaded.task.prefix_length(loaded)


def speech_examples(loaded, split: str, n: int, keep_audio: bool = False, progress: bool = True,
                    encoder=None, family="espeak", augment: float = 0.0) -> list[Example]:
    """Cached encoder outputs + targets for the built-in speech data (`family` / `augment`: see
    tasks.speech.load_split)."""
    from semedge.semcom.tasks.speech import load_split

    drop = ()
    if isinstance(family, str) and family.startswith("mix-"):  # the mix less some families (leave-one-out)
        family, drop = "mix", tuple(family[4:].split("-"))
    kw = {} if family == "espeak" and not augment else {"family": family, "augment": augment or None}
    utts = [u for u in load_split(split, n=n, progress=progress, **kw) if u.family not in drop]
    if not utts:
        raise UserError(f"the {split} split has no utterances", "check the speech corpus (semcom/tasks/speech.py)")
    return utterance_examples(loaded, utts, keep_audio, progress, encoder)


def utterance_examples(loaded, utts, keep_audio: bool = False, progress: bool = True, encoder=None) -> list[Example]:
    """Examples for given utterances; with `encoder` (another LoadedModel), h is that encoder's
    output and `target` the server model's own."""
    feats = cached_speech_features(loaded, utts, progress=progress)
    if encoder is None:
        return [Example(u.id, feats[u.id], target_ids(loaded, u.text), u.text, u.audio if keep_audio else None) for u in utts]
    student = cached_speech_features(encoder, utts, progress=progress)
    return [Example(u.id, student[u.id], target_ids(loaded, u.text), u.text, u.audio if keep_audio else None,
                    target=feats[u.id]) for u in utts]


def folder_examples(loaded, directory, n_train: int, n_val: int, progress: bool = True, encoder=None):
    """(train, val) Examples from the user's audiofolder: every 10th row by hash of its id is
    validation (up to n_val); recordings over 30 s are left out (one window per example)."""
    from semedge.semcom.tasks.audiofolder import load_audiofolder

    utts = load_audiofolder(directory)
    short = [u for u in utts if len(u.audio) <= 30 * SAMPLE_RATE]
    if len(short) < len(utts) and progress:
        print(f"--data: {len(utts) - len(short)} recording(s) over 30 s left out of training", flush=True)
    is_val = [int(hashlib.sha1(u.id.encode()).hexdigest(), 16) % 10 == 0 for u in short]
    val = [u for u, v in zip(short, is_val) if v][:n_val]
    train = [u for u, v in zip(short, is_val) if not v or not n_val][:n_train]
    if not train:
        raise UserError(f"{directory} has no recording of 30 s or less to train on", "add shorter recordings (cut long ones)")
    return (utterance_examples(loaded, train, progress=progress, encoder=encoder),
            utterance_examples(loaded, val, progress=progress, encoder=encoder) if val else [])


def run_examples(cfg, loaded, encoder=None, progress: bool = True) -> tuple[list[Example], list[Example]]:
    """(train, val) Examples a TrainConfig names: its --data folder, or the built-in speech split."""
    if not loaded.task.supports("train"):
        raise UserError(f"{loaded.source} is a {loaded.task.name} model: pass training texts", "train speech models from the CLI")
    if cfg.data:
        return folder_examples(loaded, cfg.data, cfg.n_train, cfg.n_val, progress, encoder)
    train = speech_examples(loaded, cfg.split, cfg.n_train, progress=progress, encoder=encoder,
                            family=cfg.voice_family(), augment=cfg.augment)
    return train, None


def device_encoder_model(name: str, loaded):
    """The LoadedModel whose encoder the device runs instead of `loaded`'s (same front end)."""
    from semedge.semcom.models import load_model

    enc = load_model(name)
    if not (enc.task.supports("other-encoder") and loaded.task.supports("other-encoder")):
        raise UserError(f"--encoder {name}: another model's encoder is supported for speech models only",
                        "drop --encoder")
    a, b = enc.model.config.num_mel_bins, loaded.model.config.num_mel_bins
    if a != b:
        raise UserError(f"--encoder {name} takes {a} mel bins but {loaded.source} takes {b}",
                        "choose an encoder with the same front end")
    return enc


@torch.no_grad()
def text_examples(loaded, texts: list[str]) -> list[Example]:
    """Text models: encoder outputs of each text; the target is the text itself."""
    out = []
    enc = loaded.model.get_encoder()
    for i, t in enumerate(texts):
        ids = loaded.tokenizer(t, return_tensors="pt", truncation=True)
        h = enc(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state[0]
        out.append(Example(f"text-{i}", h.clone(), target_ids(loaded, t), t))
    return out


def collate(examples: list[Example], pad_id: int, prefix_len: int) -> dict:
    """Pad a batch: h [B, m, d], mask [B, m], decoder inputs / targets [B, L] (-100 = ignored),
    and target [B, m, d_model] when the examples carry the server model's own features."""
    m = max(e.h.shape[0] for e in examples)
    d = examples[0].h.shape[-1]
    L = max(len(e.ids) for e in examples) - 1
    h = torch.zeros(len(examples), m, d)
    target = None
    if examples[0].target is not None:
        target = torch.zeros(len(examples), m, examples[0].target.shape[-1])
    mask = torch.zeros(len(examples), m, dtype=torch.bool)
    dec_in = torch.full((len(examples), L), pad_id, dtype=torch.long)
    tgt = torch.full((len(examples), L), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = e.h.shape[0]
        h[i, :n] = e.h.float()
        if target is not None:
            target[i, :n] = e.target.float()
        mask[i, :n] = True
        ids = torch.tensor(e.ids)
        dec_in[i, : len(ids) - 1] = ids[:-1]
        tgt[i, : len(ids) - 1] = ids[1:]
        tgt[i, : max(0, prefix_len - 1)] = -100  # the forced prefix (language, task, ...) is not learned
    out = {"h": h, "mask": mask, "dec_in": dec_in, "tgt": tgt}
    if target is not None:
        out["target"] = target
    return out
