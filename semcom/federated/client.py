"""The device's side of a federated round, without Flower: state in, state and messages out.

A client keeps, between messages, only numpy arrays (Flower keeps them in the node's
Context): its current parameters (`p.*`), Adam's moments (`m.*`, `v.*`), the round's global
parameters (`g.*`, FedProx) and its personalised parameters (`q.*`). Autograd graphs do not
survive a message, so the step that receives dL/dy recomputes its forward pass from the same
batch and channel draws (`data.step_indices`, seeded) before backpropagating: one extra
device forward per step, no activation kept between messages.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from semedge.semcom.federated import split_step as S
from semedge.semcom.federated.config import FederateConfig
from semedge.semcom.federated.data import ClientData, client_data, step_indices

BUFFERS = ("jsc.mean", "jsc.std")  # the codec's fixed statistics: sent down with the parameters
ADAM_BETAS, ADAM_EPS, CLIP_NORM = (0.9, 0.999), 1e-8, 1.0
PERSONAL_STEP_OFFSET = 100_000  # personalisation steps draw other batches than training steps
_RUNTIMES: dict[str, "DeviceRuntime"] = {}


def base_model(name: str):
    """A LoadedModel: `tiny:whisper[:seed]` (random init, tests) or a load_model source."""
    from semedge.semcom.models import load_model, tiny_model

    if name.startswith("tiny:"):
        parts = name.split(":")
        return tiny_model(parts[1], seed=int(parts[2]) if len(parts) > 2 else 0)
    return load_model(name)


def runtime(cfg: FederateConfig, jsc_config: str) -> "DeviceRuntime":
    """This process's DeviceRuntime for the run (built once: the model and the device half are reused)."""
    key = f"{cfg.model}|{jsc_config}|{cfg.lora}"
    if key not in _RUNTIMES:
        _RUNTIMES.clear()
        _RUNTIMES[key] = DeviceRuntime(cfg, jsc_config)
    rt = _RUNTIMES[key]
    rt.cfg = cfg
    return rt


class DeviceRuntime:
    """One process's device half (shared by the clients it serves in turn) and each client's data."""

    def __init__(self, cfg: FederateConfig, jsc_config: str):
        from semedge.semcom.channels import make_channel
        from semedge.semcom.jsc import JSCCodec, JSCConfig

        torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.loaded = base_model(cfg.model)
        import json

        codec = JSCCodec(JSCConfig.from_dict(json.loads(jsc_config)))
        self.half = S.DeviceHalf(self.loaded, codec, cfg.lora_spec())
        self.channel = make_channel(cfg.channel)
        self.data: dict[tuple, ClientData] = {}

    def client(self, part: int, split: str) -> ClientData:
        c = self.cfg  # the key names all the data depends on: a later run in this process may differ
        key = (part, split, c.non_iid, c.clients, c.pool, c.n_train, c.n_test)
        if key not in self.data:
            self.data[key] = client_data(self.loaded, c, part, split)
        return self.data[key]

    def load(self, arrays: dict[str, np.ndarray], prefix: str = "") -> None:
        """Set the device half's parameters (and the codec's statistics) from `arrays`."""
        params = dict(self.half.named_parameters())
        bufs = dict(self.half.named_buffers())
        with torch.no_grad():
            for name, a in arrays.items():
                if not name.startswith(prefix):
                    continue
                key = name[len(prefix):]
                target = params.get(key, bufs.get(key))
                if target is not None:
                    target.copy_(torch.as_tensor(np.asarray(a)))

    def params(self) -> dict[str, np.ndarray]:
        return {n: p.detach().numpy().copy() for n, p in self.half.trainable().items()}

    def forward(self, part: int, rnd: int, step: int):
        """(y, mask, ids) of local step `step`: the same batch and channel draws on every call."""
        from semedge.semcom.channels import sample_snr

        cfg, data = self.cfg, self.client(part, "train")
        idx = step_indices(len(data), cfg.batch_size, cfg.seed, part, rnd, step)
        g = torch.Generator().manual_seed(cfg.seed * 7919 + part * 104_729 + rnd * 1_000_003 + step)
        batch = data.batch(idx)
        snr = sample_snr(len(idx), cfg.snr_low, cfg.snr_high, generator=g)
        y, mask = self.half(batch, self.channel, snr, generator=g)
        return y, mask, batch.ids


# the client's protocol ----------------------------------------------------------------

def begin(rt: DeviceRuntime, part: int, rnd: int, arrays: dict[str, np.ndarray], personal: bool) -> tuple[dict, dict]:
    """A round (or personalisation) starts from `arrays`: (new state, uplink of step 0)."""
    rt.load(arrays)
    p = rt.params()
    state = {f"p.{n}": a for n, a in p.items()}
    state.update({f"m.{n}": np.zeros_like(a) for n, a in p.items()})
    state.update({f"v.{n}": np.zeros_like(a) for n, a in p.items()})
    if rt.cfg.proximal_mu > 0 and not personal:
        state.update({f"g.{n}": a.copy() for n, a in p.items()})
    step0 = PERSONAL_STEP_OFFSET if personal else 0
    y, mask, ids = rt.forward(part, rnd, step0)
    return state, S.pack_uplink(y, mask, ids)


def step(rt: DeviceRuntime, part: int, rnd: int, s: int, state: dict, downlink: dict, last: bool,
         personal: bool) -> tuple[dict, dict | None]:
    """Apply the server's dL/dy for local step s; then (state, uplink of step s + 1, or None after the last)."""
    base = PERSONAL_STEP_OFFSET if personal else 0
    rt.load(state, "p.")
    rt.half.zero_grad(set_to_none=True)
    y, mask, _ = rt.forward(part, rnd, base + s)  # recomputed: the graph of the first pass is gone
    S.device_backward(y, mask, downlink)
    _adam(rt, state, s + 1)
    if last:
        return state, None
    rt.load(state, "p.")
    with torch.no_grad():
        y, mask, ids = rt.forward(part, rnd, base + s + 1)
    return state, S.pack_uplink(y, mask, ids)


def _adam(rt: DeviceRuntime, state: dict, t: int) -> None:
    """One AdamW step (no weight decay, grad-norm clip 1, lr per group, FedProx term) on the state's `p.*`."""
    cfg = rt.cfg
    named = rt.half.trainable()
    grads = {n: (p.grad.detach().numpy().astype(np.float64) if p.grad is not None else np.zeros(p.shape))
             for n, p in named.items()}
    if cfg.proximal_mu > 0 and any(k.startswith("g.") for k in state):
        for n in grads:
            grads[n] += cfg.proximal_mu * (state[f"p.{n}"] - state[f"g.{n}"])
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
    scale = min(1.0, CLIP_NORM / (norm + 1e-6))
    b1, b2 = ADAM_BETAS
    for n, g in grads.items():
        g = g * scale
        m = state[f"m.{n}"] = b1 * state[f"m.{n}"] + (1 - b1) * g
        v = state[f"v.{n}"] = b2 * state[f"v.{n}"] + (1 - b2) * g * g
        lr = cfg.lora_lr if "lora_" in n else cfg.lr
        upd = lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + ADAM_EPS)
        state[f"p.{n}"] = (state[f"p.{n}"] - upd).astype(np.float32)
    for k in [k for k in state if k[:2] in ("m.", "v.")]:
        state[k] = state[k].astype(np.float32)


def eval_uplink(rt: DeviceRuntime, part: int, arrays: dict[str, np.ndarray], prefix: str = "") -> dict:
    """The client's test utterances through the channel at each evaluation SNR: symbols.j / lengths.j."""
    from semedge.core.channel_spec import parse_snr

    rt.load(arrays, prefix)
    data, out = rt.client(part, "test"), {}
    for j, snr in enumerate(rt.cfg.eval_snrs):
        g = torch.Generator().manual_seed(rt.cfg.seed + 31 * part + j)
        rows, lengths = [], []
        for b in range(0, len(data), 8):
            idx = list(range(b, min(b + 8, len(data))))
            with torch.no_grad():
                y, mask = rt.half(data.batch(idx), rt.channel, parse_snr(snr), generator=g)
            rows.append(y[mask].numpy())
            lengths += mask.sum(1).tolist()
        out[f"symbols.{j}"] = np.concatenate(rows).astype(np.float32)
        out[f"lengths.{j}"] = np.asarray(lengths, dtype=np.int32)
    return out


def eval_score(rt: DeviceRuntime, part: int, hyps: dict[str, list[str]]) -> dict[str, list[int]]:
    """Per-utterance word errors and reference words at each SNR, scored on the device (references stay there)."""
    from semedge.semcom.metrics import word_errors_per_utt

    refs, out = rt.client(part, "test").texts, {}
    for j in range(len(rt.cfg.eval_snrs)):
        pairs = word_errors_per_utt(refs, hyps[f"hyp.{j}"])
        out[f"errors.{j}"] = [int(e) for e, _ in pairs]
        out[f"words.{j}"] = [int(w) for _, w in pairs]
    return out
