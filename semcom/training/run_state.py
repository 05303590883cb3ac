"""A training run's checkpoint: what the manifest says about it, saving, resuming.

The codec, adapters and manifest go through semcom.checkpoint; the optimizer state, the
step and the loss history go into trainer.safetensors (flat tensors, no pickle).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from semedge.core.errors import UserError
from semedge.semcom.training.adapters import adapter_state, load_adapter_state
from semedge.semcom.training.config import TrainConfig

RESUMABLE_CHANGES = ("steps", "save_every", "eval_every", "max_minutes")  # settings a resumed run may change


def opt_state(opt) -> dict[str, torch.Tensor]:
    """AdamW state as flat tensors: '<param index>.<key>'."""
    out = {}
    for i, (p, st) in enumerate(((p, opt.state[p]) for g in opt.param_groups for p in g["params"])):
        for key, val in st.items():
            out[f"{i}.{key}"] = val if torch.is_tensor(val) else torch.tensor(val)
    return out


def load_opt_state(opt, state: dict[str, torch.Tensor]) -> None:
    params = [p for g in opt.param_groups for p in g["params"]]
    for name, val in state.items():
        i, key = name.split(".", 1)
        opt.state[params[int(i)]][key] = val.clone()


def run_info(tr, metrics: dict | None = None) -> dict:
    """The manifest fields of trainer `tr`'s run."""
    cfg = tr.cfg
    return {
        "channels": list(cfg.channels), "snr_range_db": [cfg.snr_low, cfg.snr_high],
        "data": {"task": tr.loaded.task.name, "split": cfg.split,
                 "n_train": len(tr.examples), "n_val": len(tr.val_examples)},
        "seed": cfg.seed, "step": tr.step,
        "lora": None if cfg.lora is None else dataclasses.asdict(cfg.lora), "qlora": cfg.qlora,
        "rate_training": None if cfg.rate_min is None else {"rate_min": cfg.rate_min, "rate_prob": cfg.rate_prob},
        "train_config": cfg.to_dict(),
        "device_encoder": None if tr.encoder is None else {
            "source": tr.encoder.source, "weight_hash": tr.encoder.weight_hash, "d_model": tr.encoder.d_model},
        "loss_last": tr.losses[-1] if tr.losses else None,
        "metrics": metrics or {},
    }


def save_run(tr, path, metrics: dict | None = None, with_trainer: bool = True, dtype: str = "float32",
             extra: dict | None = None) -> Path:
    """Write trainer `tr`'s checkpoint to `path` (with_trainer: also what resuming needs)."""
    from semedge.semcom.checkpoint import save_checkpoint

    state = None
    if with_trainer:
        state = opt_state(tr.opt)
        state["__step"] = torch.tensor(tr.step)
        state["__losses"] = torch.tensor(tr.losses or [0.0], dtype=torch.float64)
    adapters = adapter_state(tr.model) if tr.lora_params else None
    info = run_info(tr, metrics)
    info.update(extra or {})
    return save_checkpoint(path, tr.loaded, tr.codec, adapters=adapters, trainer_state=state, info=info, dtype=dtype)


def resume_run(tr, path) -> bool:
    """Load into trainer `tr` the checkpoint at `path`, written by the same configuration. False if there is none."""
    from safetensors.torch import load_file

    from semedge.core.files import clean_stale
    from semedge.semcom.checkpoint import TRAINER_FILE, load_checkpoint, read_manifest

    path = Path(path)
    clean_stale(path.parent)  # a checkpoint a kill caught between the two renames of its swap is put back
    if not (path / "manifest.json").exists():
        return False
    man = read_manifest(path)
    old = TrainConfig.from_dict(man.get("train_config", {})).to_dict()
    new = tr.cfg.to_dict()
    diff = [k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k)]
    if diff:
        raise UserError(f"{path} was trained with different settings ({', '.join(diff)})",
                        "use a new --out folder, or the same settings to resume")
    ck = load_checkpoint(path, tr.loaded, k=tr.cfg.k)
    tr.codec.load_state_dict(ck.codec.state_dict())
    if ck.adapters:
        load_adapter_state(tr.model, ck.adapters)
    if (path / TRAINER_FILE).exists():
        st = load_file(str(path / TRAINER_FILE))
        tr.step = int(st.pop("__step"))
        tr.losses = [float(x) for x in st.pop("__losses")][: tr.step]
        load_opt_state(tr.opt, st)
    else:
        tr.step = int(man.get("step", 0))
    return True
