"""One message end to end, in process: device half -> channel -> server half.

The client-server path (runtime/) reproduces these numbers over a socket; this
module is the reference the rest is checked against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from semedge.core.errors import UserError
from semedge.core.frames import content_frames as _frames
from semedge.semcom.channels import make_channel
from semedge.semcom.importance import ImportanceRate, Layout, normalize_stream, unpack
from semedge.semcom.jsc import normalize_power
from semedge.semcom.split import SplitModel

def content_frames(n_samples: int) -> int:
    """Encoder frames sent for an utterance of n_samples (16 kHz): core.frames.content_frames, at least 1."""
    return max(1, _frames(int(n_samples)))


@dataclass
class LinkResult:
    hyps: list[str]
    symbols_sent: list[int]  # real channel symbols per message
    tokens_sent: list[int]  # tokens (encoder frames) per message
    extra: dict = field(default_factory=dict)


@torch.no_grad()
def device_encode(split: SplitModel, inputs: list, frames: str = "content", k_keep: int | None = None,
                  window: str = "fit") -> list[torch.Tensor]:
    """Run the device half (PyTorch) on a batch; one [n_i, k_keep] tensor per message.

    The task computes the device inputs (split.task.device_encode). Speech: each
    utterance's encoder runs on its own window (core.frames.window_frames: "fit" = the
    utterance + 0.4 s, as the device runtime does; "full" = 30 s)."""
    out = []
    per = split.codec.cfg.power
    for xi in split.task.device_encode(split, inputs, frames=frames, window=window):
        if per == "message" or (k_keep is not None and k_keep < xi.shape[-1]):  # over the tokens sent
            xi = normalize_power(xi, k_keep, per)[:, :k_keep]
        out.append(xi)
    return out


@torch.no_grad()
def send_layout(x: torch.Tensor, rate: ImportanceRate, ch, snr_db: float, gen: torch.Generator,
                per: str = "message") -> tuple[torch.Tensor, Layout]:
    """One message's code x [n, k] sent with the importance policy's per-frame layout:
    (what the server decodes: [n, k], zero above each frame's k_t; the layout). The layout
    header is counted in Layout.symbols and modelled as received without error."""
    lay = rate.layout(x.numpy(), snr_db)
    stream = torch.from_numpy(normalize_stream(x.numpy(), lay.k, per))  # [sum k_t], unit mean power
    y = ch(stream.view(1, 1, -1), snr_db, generator=gen)[0, 0]
    return torch.from_numpy(unpack(y.numpy(), lay.k, x.shape[-1])), lay


def run_link(
    split: SplitModel,
    inputs: list,
    channel: str = "awgn",
    snr_db: float = math.inf,
    k_keep: int | None = None,
    frames: str = "content",
    seed: int = 0,
    batch_size: int = 8,
    max_new_tokens: int = 96,
    progress: bool = False,
    rate: ImportanceRate | None = None,
) -> LinkResult:
    """Transmit every input through `channel` at `snr_db`; return the server's outputs.
    `rate`: a per-frame layout per message (semcom.importance) instead of k_keep for all frames;
    extra["layouts"] then holds each message's {"k": k_t list, "header": header symbols}."""
    if rate is not None and k_keep is not None:
        raise UserError("give k_keep (one k for every frame) or rate (a per-frame layout), not both", "drop one")
    ch = make_channel(channel)
    gen = torch.Generator().manual_seed(seed)
    hyps, sent, toks, layouts = [], [], [], []
    batches = range(0, len(inputs), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=f"{channel} {snr_db:g} dB", unit="batch", leave=False)
    for b in batches:
        msgs = device_encode(split, inputs[b : b + batch_size], frames=frames, k_keep=k_keep)
        if rate is None:
            rx = [ch(m.unsqueeze(0), snr_db, generator=gen)[0] for m in msgs]
            sent += [m.numel() for m in msgs]
        else:
            out = [send_layout(m, rate, ch, snr_db, gen, split.codec.cfg.power) for m in msgs]
            rx = [y for y, _ in out]
            sent += [lay.symbols for _, lay in out]
            layouts += [{"k": lay.k.tolist(), "header": lay.header} for _, lay in out]
        hyps += split.server.transcribe(rx, max_new_tokens=max_new_tokens)
        toks += [m.shape[0] for m in msgs]
    return LinkResult(hyps, sent, toks, {"layouts": layouts} if rate is not None else {})


@torch.no_grad()
def unsplit_outputs(split: SplitModel, inputs: list, batch_size: int = 8, max_new_tokens: int = 96) -> list[str]:
    """The unsplit model's own greedy outputs (the reference for the split)."""
    loaded = split.loaded
    out = []
    for b in range(0, len(inputs), batch_size):
        ids = split.task.unsplit_ids(loaded, inputs[b : b + batch_size], max_new_tokens)
        out += [t.strip() for t in loaded.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return out
