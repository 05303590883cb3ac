"""Joint source-channel (JSC) codec: per-token features <-> k real channel symbols.

Conventions
- Encoder: h [B, T, d] -> standardise per feature dimension (fixed mean/std, shared by
  both ends) -> x [B, T, k] -> power normalisation, so the sent symbols have unit mean power.
  `power="token"`: each token's symbols are scaled to unit power (relative token norms lost);
  `power="message"`: one scale per message (all its tokens), which keeps relative token norms.
  The device scales over the tokens it sends (normalisation is scale invariant, so the
  runtime may renormalise the sent frames of a graph output exactly).
- Rate adaptation: only the first `k_keep` <= k symbols of each token are sent; the
  power is normalised over those, and the receiver sees zeros in the rest.
- Skip path (option): the decoder adds a linear map of the received symbols to its MLP's
  output; `init_pca` starts encoder and that map as a PCA code (MLP at zero), so training
  begins from a linear code that does not depend on any voice.
- Identity mode (k = d, no learned layer): x = standardised h, not power-normalised
  per token, so the decoder inverts it exactly; used to check the split.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch
from torch import nn

from semedge.core.errors import UserError
from semedge.core.frames import ENC_FRAMES


POWER_MODES = ("token", "message")


@dataclass(frozen=True)
class JSCConfig:
    d_model: int
    k: int
    hidden: int = 1024  # decoder MLP width
    identity: bool = False
    # Speech: silence frames the server's decoder attends to after the content (None: the
    # whole 30 s window). Fixed at training: a decoder trained on one context expects it.
    tail_frames: int | None = None
    # Encoder input width when the device runs another (smaller) model's encoder than the
    # server's decoder expects (e.g. whisper-tiny.en's 384 -> whisper-base's 512); None = d_model.
    d_in: int | None = None
    skip: bool = False  # decoder = MLP(y) + linear(y)
    power: str = "token"  # power normalisation: per "token" or per "message"

    @property
    def d_enc(self) -> int:
        return self.d_model if self.d_in is None else self.d_in

    def __post_init__(self):
        if self.power not in POWER_MODES:
            raise UserError(f"power={self.power!r} is not a power normalisation", f"choose one of {', '.join(POWER_MODES)}")
        if self.identity and self.d_in not in (None, self.d_model):
            raise UserError(f"an identity JSC cannot map d_in={self.d_in} to d_model={self.d_model}", "train a codec for this encoder")
        if self.identity and self.power != "token":
            raise UserError("an identity JSC sends standardised features unscaled", "drop power (it is for trained codecs)")
        if self.identity and self.k != self.d_model:
            raise UserError(f"identity JSC needs k == d_model ({self.d_model}), got k={self.k}", "drop --k or set it to d_model")
        if self.tail_frames is not None and not 0 <= self.tail_frames <= ENC_FRAMES:
            raise UserError(f"tail_frames={self.tail_frames} is out of range",
                            f"choose 0..{ENC_FRAMES} frames (or none for the whole window)")
        if not 1 <= self.k <= 4 * self.d_model:
            raise UserError(f"k={self.k} symbols per token is out of range", f"choose 1 <= k <= {4 * self.d_model}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "JSCConfig":
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - allowed
        if unknown:
            raise UserError(f"JSC config has unknown fields {sorted(unknown)}", f"allowed: {sorted(allowed)}")
        return cls(**d)


def normalize_power(x: torch.Tensor, k_keep: int | None = None, per: str = "token", eps: float = 1e-8) -> torch.Tensor:
    """Scale the first k_keep symbols of each token (per="token") or of each message x[..., T, k]
    (per="message": one scale over all its tokens) to unit mean power; zero the rest."""
    k = x.shape[-1]
    k_keep = k if k_keep is None else int(k_keep)
    if not 1 <= k_keep <= k:
        raise UserError(f"k_keep={k_keep} is out of range", f"choose 1 <= k_keep <= {k}")
    kept = x[..., :k_keep]
    dims = (-1,) if per == "token" else (-2, -1)
    kept = kept * torch.rsqrt(kept.pow(2).mean(dims, keepdim=True) + eps)
    if k_keep == k:
        return kept
    return torch.cat([kept, torch.zeros_like(x[..., k_keep:])], dim=-1)


class JSCEncoder(nn.Module):
    def __init__(self, cfg: JSCConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("mean", torch.zeros(cfg.d_enc))
        self.register_buffer("std", torch.ones(cfg.d_enc))
        self.proj = None if cfg.identity else nn.Linear(cfg.d_enc, cfg.k)

    def forward(self, h: torch.Tensor, k_keep: int | None = None) -> torch.Tensor:
        z = (h - self.mean) / self.std
        if self.proj is None:
            return z
        return normalize_power(self.proj(z), k_keep, self.cfg.power)


class JSCDecoder(nn.Module):
    def __init__(self, cfg: JSCConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("mean", torch.zeros(cfg.d_model))
        self.register_buffer("std", torch.ones(cfg.d_model))
        if cfg.identity:
            self.net = None
        else:
            self.net = nn.Sequential(
                nn.Linear(cfg.k, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.hidden), nn.GELU(),
                nn.Linear(cfg.hidden, cfg.d_model),
            )
        self.skip = nn.Linear(cfg.k, cfg.d_model, bias=False) if cfg.skip and not cfg.identity else None

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if y.shape[-1] < self.cfg.k:  # fewer symbols sent (rate adaptation): the rest are zero
            y = torch.nn.functional.pad(y, (0, self.cfg.k - y.shape[-1]))
        z = y if self.net is None else self.net(y)
        if self.skip is not None:
            z = z + self.skip(y)
        return z * self.std + self.mean


class JSCCodec(nn.Module):
    """Encoder and decoder of one codec, sharing the feature statistics."""

    def __init__(self, cfg: JSCConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = JSCEncoder(cfg)
        self.decoder = JSCDecoder(cfg)

    @torch.no_grad()
    def set_stats(self, h: torch.Tensor, target: torch.Tensor | None = None) -> None:
        """Fix the per-dimension statistics from calibration features h [..., d_enc]; the
        decoder's from `target` [..., d_model] (the features it rebuilds) when the widths differ."""
        def stats(x):
            flat = x.reshape(-1, x.shape[-1]).float()
            return flat.mean(0), flat.std(0).clamp_min(1e-4)

        self.encoder.mean.copy_(stats(h)[0])
        self.encoder.std.copy_(stats(h)[1])
        mean, std = stats(h if target is None else target)
        self.decoder.mean.copy_(mean)
        self.decoder.std.copy_(std)


@torch.no_grad()
def init_pca(codec: JSCCodec, h: torch.Tensor, target: torch.Tensor | None = None, ridge: float = 1e-3) -> torch.Tensor:
    """Start `codec` (skip path) as a PCA code of features h [N, d_enc]: encoder = the top-k
    principal directions of the standardised features, MLP output zero. The decoder's skip
    path: without `target`, their transpose scaled back from unit token power; with `target`
    [N, d_model] (the server model's features of the same tokens, for a device encoder of
    another model), the ridge least-squares map from the sent symbols to the standardised
    target. Returns the eigenvalues (descending), so callers can report the variance kept."""
    cfg = codec.cfg
    if not cfg.skip or cfg.identity:
        raise UserError("a PCA start needs a trained codec with a skip path", "train with --init pca (it adds the path)")
    if target is None and cfg.d_in not in (None, cfg.d_model):
        raise UserError("a PCA start for another model's encoder needs the server model's features",
                        "pass target= (the trainer does, from the examples' teacher features)")
    z = (h.reshape(-1, h.shape[-1]).float() - codec.encoder.mean) / codec.encoder.std
    evals, evecs = torch.linalg.eigh(z.T @ z / len(z))
    order = evals.argsort(descending=True)
    evals, v = evals[order].clamp_min(0), evecs[:, order[: cfg.k]]
    codec.encoder.proj.weight.copy_(v.T)
    codec.encoder.proj.bias.zero_()
    if target is None:  # power normalisation scales a token's k symbols to unit mean power: undo the typical scale
        codec.decoder.skip.weight.copy_(v * evals[: cfg.k].mean().sqrt())
    else:
        y = normalize_power(z @ v, per=cfg.power)
        zt = (target.reshape(-1, target.shape[-1]).float() - codec.decoder.mean) / codec.decoder.std
        gram = y.T @ y + ridge * len(y) * torch.eye(cfg.k)
        codec.decoder.skip.weight.copy_(torch.linalg.solve(gram, y.T @ zt).T)
    last = codec.decoder.net[-1]
    last.weight.zero_()
    last.bias.zero_()
    return evals


def with_tail(codec: JSCCodec, tail_frames: int | None) -> JSCCodec:
    """`codec` set to decode with `tail_frames` silence frames after the content (speech).

    Only the identity codec (no trained decoder) may change its context; a trained
    codec keeps the tail it was trained with.
    """
    cur = codec.cfg.tail_frames
    if tail_frames == cur:
        return codec
    if not codec.cfg.identity:
        raise UserError(f"this codec was trained to decode with tail_frames={cur}, not {tail_frames}",
                        f"drop --tail-frames, or train a codec with --tail-frames {tail_frames}")
    cfg = dataclasses.replace(codec.cfg, tail_frames=tail_frames)
    codec.cfg = codec.encoder.cfg = codec.decoder.cfg = cfg
    return codec


def cut(codec: JSCCodec, k: int) -> JSCCodec:
    """A k-symbol codec from the first k of a nested codec's symbols (trained with --rate-min).

    Exact: it sends and decodes what `codec` does with k_keep = k (the encoder's first k
    outputs, power-normalised over those; the decoder's first layer sees only those inputs).
    """
    cfg = codec.cfg
    if cfg.identity:
        raise UserError("the identity codec has no symbols to cut", "cut a trained JSC codec")
    if not 1 <= k <= cfg.k:
        raise UserError(f"cannot cut a k={cfg.k} codec to k={k}", f"choose 1 <= k <= {cfg.k}")
    new = JSCCodec(dataclasses.replace(cfg, k=k))
    state = codec.state_dict()
    state["encoder.proj.weight"] = state["encoder.proj.weight"][:k]
    state["encoder.proj.bias"] = state["encoder.proj.bias"][:k]
    state["decoder.net.0.weight"] = state["decoder.net.0.weight"][:, :k]
    if cfg.skip:
        state["decoder.skip.weight"] = state["decoder.skip.weight"][:, :k]
    new.load_state_dict({n: t.clone() for n, t in state.items()})
    return new.eval()
