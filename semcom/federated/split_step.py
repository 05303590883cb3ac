"""One split fine-tuning step, as the two ends run it (speech: Whisper).

    device:  log-mel ─► encoder (+ LoRA) ─► JSC encoder ─► x ─► channel ─► y ──────┐ uplink
    server:                       JSC decoder ─► decoder ─► CE(labels) ─► dL/dy ◄─┘
    device:  y.backward(dL/dy) ─► gradients of the LoRA and the JSC encoder          downlink

The channel is simulated on the device's side of the wire, so the device backpropagates
through it (fading and noise drawn from its generator); the server sees only y, as a
receiver would. The uplink carries y's content rows, the frame count per message and the
transcript's token ids: the decoder is teacher-forced on them, so the labels do cross
(docs/federated.md says why the labels are not kept on the device). The downlink carries
dL/dy at the same rows. Nothing else crosses: no audio, no features, no weights.

Everything here is plain torch; the wire format is a dict of numpy arrays, which the Flower
apps put in an ArrayRecord and the accounting counts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from semedge.core.errors import UserError
from semedge.semcom.training.config import LoRASpec

UPLINK_KEYS = ("symbols", "lengths", "labels", "label_lengths")
DOWNLINK_KEYS = ("grad",)
DEFAULT_LORA = LoRASpec(r=8, alpha=16, targets=("encoder.self_attn",), projections=("q_proj", "v_proj"))


@dataclass
class DeviceBatch:
    """What one device holds for one step: never sent."""

    mels: list[torch.Tensor]  # per utterance: log-mel [80, T_i] on its fitted window
    frames: list[int]  # content frames n_i (encoder frames of the utterance)
    ids: list[list[int]]  # target token ids (model prefix + text + end)


class DeviceHalf(nn.Module):
    """Encoder (frozen base + LoRA) and JSC encoder: log-mel -> channel symbols x [B, m, k]."""

    def __init__(self, loaded, codec, lora: LoRASpec | None = DEFAULT_LORA):
        from semedge.semcom.training.adapters import add_lora

        super().__init__()
        self.model = nn.Module()  # named like the full model, so adapter names are the checkpoint's
        self.model.encoder = copy.deepcopy(loaded.model.model.encoder)
        for p in self.model.parameters():
            p.requires_grad_(False)
        if lora is not None:
            if any(not t.startswith("encoder") for t in lora.targets):
                raise UserError(f"--lora targets {list(lora.targets)}: only the device's encoder is trained here",
                                "give encoder targets, e.g. --lora r=8,targets=encoder.self_attn")
            add_lora(self, lora)
        self.model.eval()
        self.jsc = copy.deepcopy(codec.encoder)
        self.lora = lora

    def trainable(self) -> dict[str, nn.Parameter]:
        """The parameters FedAvg averages: LoRA weights (peft names) and the JSC encoder's projection."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def features(self, batch: DeviceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder outputs over each utterance's content frames, padded: (h [B, m, d], mask [B, m])."""
        from semedge.semcom.split import whisper_front, whisper_layers

        enc = self.model.encoder
        hs = [whisper_layers(enc, whisper_front(enc, mel.unsqueeze(0)))[0, :n] for mel, n in zip(batch.mels, batch.frames)]
        m = max(batch.frames)
        h = torch.stack([nn.functional.pad(x, (0, 0, 0, m - x.shape[0])) for x in hs])
        mask = torch.arange(m).unsqueeze(0) < torch.tensor(batch.frames).unsqueeze(1)
        return h, mask

    def forward(self, batch: DeviceBatch, channel, snr_db, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(y [B, m, k] what the receiver gets, mask [B, m]); x is zero past each message's end."""
        h, mask = self.features(batch)
        x = self.encode(h, batch.frames)
        return channel(x, snr_db, generator=generator), mask

    def encode(self, h: torch.Tensor, frames: list[int]) -> torch.Tensor:
        """JSC-encode each message over its own content rows only (a power="message" codec scales
        over the frames it sends, not the padding); x [B, m, k], zero past each end."""
        m = h.shape[1]
        return torch.stack([nn.functional.pad(self.jsc(h[i:i + 1, :n])[0], (0, 0, 0, m - n)) for i, n in enumerate(frames)])


# the wire ---------------------------------------------------------------------

def pack_uplink(y: torch.Tensor, mask: torch.Tensor, ids: list[list[int]]) -> dict[str, np.ndarray]:
    """y's content rows [sum n_i, k] float32, n_i per message, the labels flat int32 with their lengths."""
    return {"symbols": y.detach()[mask].float().numpy(),
            "lengths": mask.sum(1).numpy().astype(np.int32),
            "labels": np.asarray([t for seq in ids for t in seq], dtype=np.int32),
            "label_lengths": np.asarray([len(s) for s in ids], dtype=np.int32)}


def unpad(rows: np.ndarray, lengths: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Content rows [sum n_i, k] -> (padded [B, m, k] with zeros past each end, mask [B, m])."""
    lengths = torch.as_tensor(np.asarray(lengths, dtype=np.int64))
    m = int(lengths.max())
    mask = torch.arange(m).unsqueeze(0) < lengths.unsqueeze(1)
    out = torch.zeros(len(lengths), m, rows.shape[-1])
    out[mask] = torch.as_tensor(np.asarray(rows, dtype=np.float32))
    return out, mask


def split_labels(labels: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    ends = np.cumsum(lengths)
    return [labels[e - n:e].tolist() for e, n in zip(ends, lengths)]


def check_wire(msg: dict, keys: tuple[str, ...], what: str) -> None:
    if set(msg) != set(keys):
        raise UserError(f"{what} carries {sorted(msg)}, expected {sorted(keys)}",
                        "run the same semedge version on both ends")


def device_backward(y: torch.Tensor, mask: torch.Tensor, downlink: dict[str, np.ndarray]) -> None:
    """Backpropagate the server's dL/dy (content rows) through the device half: grads land on its parameters."""
    check_wire(downlink, DOWNLINK_KEYS, "the downlink")
    g = torch.zeros_like(y)
    g[mask] = torch.as_tensor(np.asarray(downlink["grad"], dtype=np.float32))
    y.backward(g)


# the server's half ------------------------------------------------------------

def decoder_io(ids: list[list[int]], pad_id: int, prefix_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher forcing: decoder inputs [B, L] and targets [B, L] (-100: padding and the forced prefix)."""
    L = max(len(s) for s in ids) - 1
    dec_in = torch.full((len(ids), L), pad_id, dtype=torch.long)
    tgt = torch.full((len(ids), L), -100, dtype=torch.long)
    for i, s in enumerate(ids):
        t = torch.tensor(s)
        dec_in[i, : len(s) - 1] = t[:-1]
        tgt[i, : len(s) - 1] = t[1:]
        tgt[i, : max(0, prefix_len - 1)] = -100
    return dec_in, tgt


class ServerSide(nn.Module):
    """JSC decoder (trained) + the model's decoder (frozen): received symbols -> cross-entropy."""

    def __init__(self, loaded, codec):
        from semedge.semcom.split import silence_encoding
        from semedge.semcom.training.data import prefix_length
        from semedge.semcom.training.forward import frozen_silence_kv

        super().__init__()
        if not loaded.task.supports("federated"):
            raise UserError(f"{loaded.source} is a {loaded.task.name} model: federated split training runs speech models",
                            "use a Whisper model, e.g. --model whisper-base")
        self.loaded = loaded
        self.model = loaded.model  # shared, frozen
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.jsc = copy.deepcopy(codec.decoder)
        self.tail = codec.cfg.tail_frames
        self.register_buffer("silence", silence_encoding(loaded))  # [1500, d]
        self.sil_kv = frozen_silence_kv(self.model, self.silence)
        self.prefix_len = prefix_length(loaded)
        pad = loaded.model.config.pad_token_id
        self.pad_id = 0 if pad is None else pad

    def loss(self, y: torch.Tensor, mask: torch.Tensor, ids: list[list[int]]) -> torch.Tensor:
        """Mean cross-entropy over the scored positions of a batch received as y [B, m, k]."""
        from semedge.semcom.split import context_length
        from semedge.semcom.training.forward import decoder_logits

        h = self.jsc(y)  # [B, m, d]
        states = torch.where(mask.unsqueeze(-1), h, self.silence[: h.shape[1]].unsqueeze(0))
        end = context_length(states.shape[1], self.tail)
        sil_kv = [tuple(t[:, :end] for t in kv) for kv in self.sil_kv]
        dec_in, tgt = decoder_io(ids, self.pad_id, self.prefix_len)
        sel = tgt != -100
        logits = decoder_logits(self.model, states, dec_in, None, self.silence[:end], sil_kv, select=sel)
        return nn.functional.cross_entropy(logits, tgt[sel])

    def step(self, uplink: dict[str, np.ndarray], weight: float = 1.0) -> tuple[float, dict[str, np.ndarray]]:
        """(loss, downlink {grad: dL/dy at the content rows}); weight x the loss's gradient accumulates on the JSC decoder."""
        check_wire(uplink, UPLINK_KEYS, "the uplink")
        y, mask = unpad(uplink["symbols"], uplink["lengths"])
        y.requires_grad_(True)
        loss = self.loss(y, mask, split_labels(uplink["labels"], uplink["label_lengths"]))
        (weight * loss).backward()
        grad = (y.grad[mask] / weight).numpy().astype(np.float32)  # dL/dy of this client's own loss
        return float(loss.detach()), {"grad": grad}


def wire_bytes(msg: dict[str, np.ndarray]) -> dict[str, int]:
    """Payload bytes per key (array data only; Flower's framing is counted by the caller)."""
    return {k: int(np.asarray(v).nbytes) for k, v in msg.items()}
