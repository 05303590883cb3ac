"""Each client's own speech, built on the device from the project's corpus (semcom/tasks/speech.py).

Non-IID partitions of N clients (client i of N):
- voices:  one voice family per client (espeak, piper, flite, then again), disjoint sentences;
- corpora: one sentence source per client (WordNet examples, fortunes, Python docs), espeak voices;
- speeds:  espeak voices, client i's audio tempo-changed by SPEED_FACTORS[i % 3] (sox, pitch kept);
- none:    the voice-family mix, disjoint sentences.
Train and test sets follow the same rule on the train and test splits (disjoint by sentence).
The centralised arm (`FederateConfig.pool` = P): one client holding the union of the data of
clients 0..P-1 of P under the same rule, in that order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from semedge.core.errors import UserError
from semedge.core.frames import SAMPLE_RATE, content_frames, window_frames
from semedge.semcom.federated.config import SPEED_FACTORS, FederateConfig
from semedge.semcom.federated.split_step import DeviceBatch

SOURCES = ("wordnet", "fortunes", "pydoc")
CORPUS_OVERDRAW = 8  # corpora: sentences drawn per needed one (the sources are not equally common)


@dataclass
class ClientData:
    """One client's utterances, ready for its encoder: never leaves the device."""

    mels: list[torch.Tensor]  # log-mel [80, T_i] on the fitted window
    frames: list[int]
    ids: list[list[int]]
    texts: list[str]
    label: str  # what makes this client different (family, source, speed)

    def __len__(self) -> int:
        return len(self.texts)

    def batch(self, idx: list[int]) -> DeviceBatch:
        return DeviceBatch([self.mels[i] for i in idx], [self.frames[i] for i in idx], [self.ids[i] for i in idx])


def client_label(non_iid: str, i: int, pool: int = 0) -> str:
    from semedge.semcom.tasks.speech import FAMILIES

    if pool:
        return f"pool of {pool}"
    if non_iid == "voices":
        return FAMILIES[i % len(FAMILIES)]
    if non_iid == "corpora":
        return SOURCES[i % len(SOURCES)]
    if non_iid == "speeds":
        return f"speed{SPEED_FACTORS[i % len(SPEED_FACTORS)]:g}"
    return "mix"


def client_utterances(non_iid: str, i: int, n_clients: int, split: str, n: int, progress: bool = False) -> list:
    """Client i's n utterances of `split` (tasks.speech.Utterance), by the partition rule above."""
    from semedge.semcom.tasks import augment
    from semedge.semcom.tasks.speech import load_split

    label = client_label(non_iid, i)
    if non_iid == "corpora":
        utts = [u for u in load_split(split, CORPUS_OVERDRAW * n * n_clients, progress) if u.source == label]
        mine = utts[(i // len(SOURCES)) * n:][:n]  # clients sharing a source take successive blocks
    else:
        family = {"voices": label, "none": "mix"}.get(non_iid, "espeak")
        mine = load_split(split, n * n_clients, progress, family=family)[i * n:(i + 1) * n]
    if len(mine) < n:
        raise UserError(f"client {i} ({label}) has {len(mine)} {split} utterances, fewer than {n}",
                        "lower --n-train / --n-test or --clients")
    if non_iid == "speeds" and label != "speed1":
        factor = SPEED_FACTORS[i % len(SPEED_FACTORS)]
        mine = [_with_audio(u, augment.speed(u.audio, factor)) for u in mine]
    return mine


def _with_audio(u, audio: np.ndarray):
    import dataclasses

    return dataclasses.replace(u, audio=np.asarray(audio, dtype=np.float32))


def client_data(loaded, cfg: FederateConfig, i: int, split: str) -> ClientData:
    """Client i's train (`n_train`) or test (`n_test`) utterances as log-mel windows + token ids."""
    from semedge.semcom.training.data import target_ids

    n = cfg.n_train if split == "train" else cfg.n_test
    if cfg.pool:
        utts = [u for j in range(cfg.pool) for u in client_utterances(cfg.non_iid, j, cfg.pool, split, n)]
    else:
        utts = client_utterances(cfg.non_iid, i, cfg.clients, split, n)
    utts = [u for u in utts if len(u.audio) <= 30 * SAMPLE_RATE]
    fe = loaded.feature_extractor
    mels = [fe(u.audio, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features[0, :, : window_frames(len(u.audio))]
            for u in utts]
    return ClientData(mels, [content_frames(len(u.audio)) for u in utts], [target_ids(loaded, u.text) for u in utts],
                      [u.text for u in utts], client_label(cfg.non_iid, i, cfg.pool))


def step_indices(n: int, batch_size: int, seed: int, client: int, rnd: int, step: int) -> list[int]:
    """The batch of local step `step` in round `rnd`: the same on both passes of the step (recomputed forward)."""
    g = torch.Generator().manual_seed(((seed * 1000 + client) * 1000 + rnd) * 10_000 + step)
    return torch.randperm(n, generator=g)[:batch_size].tolist()
