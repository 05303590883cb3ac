"""The edge server's side of a federated round, without Flower: the start codec, the JSC decoder's
updates from every client's uplink, decoding for evaluation, the checkpoint at the end."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import torch

from semedge.core.errors import UserError
from semedge.semcom.federated import split_step as S
from semedge.semcom.federated.client import BUFFERS, base_model
from semedge.semcom.federated.config import FederateConfig

TINY_CODEC = dict(k=16, hidden=64, tail_frames=20)  # the fresh codec a tiny test model starts from


def start_codec(cfg: FederateConfig, loaded):
    """(receiver LoadedModel, JSC codec) to start from: --jsc default / a checkpoint; tiny models a fresh codec."""
    from semedge.semcom.checkpoint import load_for_inference
    from semedge.semcom.jsc import JSCCodec, JSCConfig

    if cfg.model.startswith("tiny:") and cfg.jsc in ("default", "fresh"):
        torch.manual_seed(cfg.seed)
        return loaded, JSCCodec(JSCConfig(d_model=loaded.d_model, **TINY_CODEC))
    receiver, ck = load_for_inference(loaded, cfg.jsc)
    if ck is None:
        raise UserError(f"--jsc {cfg.jsc}: {cfg.model} has no trained codec to start from",
                        "pass a checkpoint folder (semedge train ... --out CKPT) as --jsc")
    if ck.manifest.get("device_encoder") or (ck.lora is not None and ck.lora.touches_encoder):
        raise UserError(f"--jsc {cfg.jsc} already adapts the device's encoder",
                        "start from a codec without encoder adapters or another encoder (e.g. --jsc default)")
    return receiver, ck.codec


class SplitServer:
    """The server half (JSC decoder trained, decoder frozen) and the global device parameters."""

    def __init__(self, cfg: FederateConfig):
        torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.loaded = base_model(cfg.model)
        receiver, self.codec = start_codec(cfg, self.loaded)
        self.side = S.ServerSide(receiver, self.codec)
        self.opt = torch.optim.AdamW(self.side.jsc.parameters(), lr=cfg.server_lr, weight_decay=0.0)
        self.half = S.DeviceHalf(self.loaded, self.codec, cfg.lora_spec())  # holds the global parameters
        self.global_arrays = {n: p.detach().numpy().copy() for n, p in self.half.trainable().items()}
        self.global_arrays.update({b: dict(self.half.named_buffers())[b].numpy().copy() for b in BUFFERS})
        self.jsc_config = json.dumps(dataclasses.asdict(self.codec.cfg), sort_keys=True)
        self._snapshot = {k: v.detach().clone() for k, v in self.side.jsc.state_dict().items()}

    def step(self, uplinks: dict[int, dict], train: bool = True) -> tuple[dict[int, dict], dict[int, float]]:
        """One local step for every client heard from: dL/dy back to each; the JSC decoder takes one
        AdamW step on the mean of their losses, or (server_update "each") one step per client's uplink,
        in turn (train=False: frozen, e.g. while clients personalise)."""
        if train and self.cfg.server_update == "each":
            return self._step_each(uplinks)
        self.opt.zero_grad(set_to_none=True)
        downs, losses = {}, {}
        for node, up in uplinks.items():
            losses[node], downs[node] = self.side.step(up, weight=1.0 / len(uplinks))
        if train and uplinks:
            self._opt_step()
        self.opt.zero_grad(set_to_none=True)
        return downs, losses

    def _step_each(self, uplinks: dict[int, dict]) -> tuple[dict[int, dict], dict[int, float]]:
        downs, losses = {}, {}
        for node, up in uplinks.items():
            self.opt.zero_grad(set_to_none=True)
            losses[node], downs[node] = self.side.step(up)
            self._opt_step()
        self.opt.zero_grad(set_to_none=True)
        return downs, losses

    def _opt_step(self) -> None:
        torch.nn.utils.clip_grad_norm_(list(self.side.jsc.parameters()), 1.0)
        self.opt.step()

    def update_global(self, aggregated: dict[str, np.ndarray]) -> None:
        unknown = set(aggregated) - set(self.global_arrays)
        if unknown:
            raise UserError(f"clients returned unknown parameters {sorted(unknown)[:3]}", "run the same semedge version on both ends")
        self.global_arrays.update({k: np.asarray(v, dtype=np.float32) for k, v in aggregated.items()})

    @torch.no_grad()
    def decode(self, rows: np.ndarray, lengths: np.ndarray, batch: int = 8) -> list[str]:
        """Greedy transcripts of received messages (content rows [sum n_i, k], n_i each)."""
        from semedge.semcom.split import ServerHalf

        srv = ServerHalf(self.side.loaded, self.side.jsc.eval(), self.side.silence)
        ends = np.cumsum(lengths)
        msgs = [torch.as_tensor(rows[e - n:e]) for e, n in zip(ends, lengths)]
        out = []
        for b in range(0, len(msgs), batch):
            out += srv.transcribe(msgs[b:b + batch])
        self.side.jsc.train()
        return out

    def codec_now(self):
        """The current codec: the global JSC encoder, the server's JSC decoder."""
        codec = type(self.codec)(self.codec.cfg)
        state = {f"decoder.{k}": v for k, v in self.side.jsc.state_dict().items()}
        enc = {"proj.weight": "jsc.proj.weight", "proj.bias": "jsc.proj.bias", "mean": "jsc.mean", "std": "jsc.std"}
        for k, g in enc.items():
            if g in self.global_arrays:
                state[f"encoder.{k}"] = torch.as_tensor(self.global_arrays[g])
        codec.load_state_dict(state, strict=False)
        return codec.eval()

    def save(self, path, info: dict) -> "object":
        """A normal codec checkpoint (semedge export / serve / build take it): codec + encoder LoRA."""
        from semedge.semcom.checkpoint import save_checkpoint

        from semedge.semcom.training.adapters import adapter_state

        params = dict(self.half.named_parameters())
        with torch.no_grad():
            for n, a in self.global_arrays.items():
                if n in params:
                    params[n].copy_(torch.as_tensor(a))
        adapters = adapter_state(self.half) if self.cfg.lora_spec() else {}  # peft names, as semedge train writes them
        spec = self.cfg.lora_spec()
        man = {"lora": dataclasses.asdict(spec), "qlora": False, "channels": [self.cfg.channel],
               "snr_range_db": [self.cfg.snr_low, self.cfg.snr_high], "seed": self.cfg.seed,
               "data": {"task": "speech", "split": "train", "n_train": self.cfg.n_train * max(self.cfg.clients, self.cfg.pool), "n_val": 0},
               "federated": json.loads(self.cfg.to_json()), **info}
        return save_checkpoint(path, self.loaded, self.codec_now(), adapters=adapters or None, info=man)

    def restore_decoder(self) -> None:
        """Back to the start codec's JSC decoder (the no-fine-tuning reference)."""
        self.side.jsc.load_state_dict(self._snapshot)
