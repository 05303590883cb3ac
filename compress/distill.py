"""Distillation: a student encoder with fewer layers, trained against the teacher.

The student is the teacher's encoder with `layers` of its layers kept (chosen evenly,
first and last included, or `init_layers`), so it starts close to the teacher. The
conv front end and positions are shared and frozen; the kept layers and the final
layer norm train on
    loss = mse_weight    * MSE(student features, teacher features)
         + hidden_weight * mean over student layers j of MSE(output of layer j,
                           output of the teacher layer it started from)
         + kl_weight     * KL(teacher || student) over the frozen decoder's next-token
                           distributions, teacher-forced on calib["ids"] (e.g. the reference
                           transcripts) or else on the teacher's own greedy transcript.
MSEs run over content frames; with `feature_norm` each dimension is divided by the
teacher's standard deviation first, so Whisper's few huge dimensions do not drown the
rest. The learning rate warms up linearly for `warmup` steps, then decays (cosine) to 0.
Teacher features, hidden states and transcripts are computed once per utterance and
cached in memory.
Checkpoints (student weights, optimizer state, step) are safetensors + JSON in
`workdir`; a run with the same config and workdir resumes where it stopped.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from semedge.compress.plan import ConfigBase, write_atomic
from semedge.core.errors import UserError
from semedge.semcom.split import whisper_front, whisper_layer_outputs
from semedge.semcom.training.schedule import warmup_cosine


@dataclass(frozen=True)
class DistillConfig(ConfigBase):
    layers: int = 4  # student encoder layers
    init_layers: tuple = ()  # teacher layer indices the student starts from (default: evenly spaced)
    steps: int = 200
    lr: float = 5e-4
    batch_size: int = 1
    mse_weight: float = 1.0
    kl_weight: float = 1.0
    hidden_weight: float = 1.0
    feature_norm: bool = True
    warmup: int = 100  # linear warm-up steps, then cosine decay to 0 (0: constant learning rate)
    temperature: float = 1.0
    max_tokens: int = 48  # teacher transcript tokens used for the KL term
    save_every: int = 50
    seed: int = 0

    def __post_init__(self):
        for name in ("layers", "steps", "batch_size", "max_tokens", "save_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"{name}={v!r} must be a positive integer", f"set {name} >= 1")
        if not isinstance(self.feature_norm, bool):
            raise UserError(f"feature_norm={self.feature_norm!r} must be true or false", "set feature_norm to true or false")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or not 0 <= self.warmup < self.steps:
            raise UserError(f"warmup={self.warmup!r} must be an integer below steps={self.steps}",
                            "set warmup to about steps / 10 (0 for a constant learning rate)")
        for name in ("lr", "mse_weight", "kl_weight", "hidden_weight", "temperature"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise UserError(f"{name}={v!r} must be a number >= 0", f"set {name} >= 0")
        if not self.lr or not self.temperature:
            raise UserError("lr and temperature must be > 0", "e.g. lr=1e-4, temperature=1.0")
        if not (self.mse_weight or self.kl_weight or self.hidden_weight):
            raise UserError("mse_weight, hidden_weight and kl_weight are all 0", "give at least one loss a weight")
        if not isinstance(self.init_layers, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.init_layers):
            raise UserError(f"init_layers={self.init_layers!r} must be a list of layer indices", "e.g. [0, 2, 3, 5]")
        object.__setattr__(self, "init_layers", tuple(self.init_layers))
        if self.init_layers and len(self.init_layers) != self.layers:
            raise UserError(f"init_layers lists {len(self.init_layers)} layers but layers={self.layers}", "list exactly `layers` indices")

    def describe(self) -> str:
        return f"distill(L={self.layers},steps={self.steps})"

    def hash(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


def student_layers(n_teacher: int, cfg: DistillConfig) -> list[int]:
    if cfg.init_layers:
        bad = [i for i in cfg.init_layers if not 0 <= i < n_teacher]
        if bad:
            raise UserError(f"init_layers names layer(s) {bad}, but the teacher has layers 0..{n_teacher - 1}",
                            f"use indices in 0..{n_teacher - 1}")
        return list(cfg.init_layers)
    if cfg.layers > n_teacher:
        raise UserError(f"layers={cfg.layers} but the teacher encoder has only {n_teacher}", f"choose layers <= {n_teacher}")
    if cfg.layers == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (cfg.layers - 1)) for i in range(cfg.layers)]


def make_student(model, cfg: DistillConfig):
    """A copy of the HF model whose encoder keeps `cfg.layers` of the teacher's layers."""
    from semedge.compress.prune import copy_encoder

    student = copy_encoder(model)  # only the encoder is trained: the decoder is shared, not copied
    enc = student.get_encoder()
    keep = student_layers(len(enc.layers), cfg)
    enc.layers = nn.ModuleList([copy.deepcopy(enc.layers[i]) for i in keep])
    enc.config.encoder_layers = len(keep)
    prev = getattr(enc.config, "semedge_teacher_layers", None)  # a pruned or distilled source: original indices
    enc.config.semedge_teacher_layers = [prev[i] for i in keep] if prev else keep
    return student


@torch.no_grad()
def teacher_targets(split, feats: torch.Tensor, max_tokens: int, n_frames=None, hidden: bool = False, ids=None) -> dict:
    """Per utterance: front-end output, teacher features (fp16), the token ids the KL term is
    teacher-forced on (the teacher's own transcript, or `ids` when given: e.g. the reference
    transcripts, which skips generation) and, with `hidden`, every teacher layer's output
    ([layers, n, d] fp16).

    With `n_frames` (content frames per utterance) each utterance runs on its fitted window,
    as the device runs it (runtime.features.window_frames), which also makes a step ~10x cheaper."""
    from semedge.core.frames import FIT_MARGIN
    from transformers.modeling_outputs import BaseModelOutput

    from semedge.semcom.split import generate_kwargs

    model = split.loaded.model
    enc = _device_model(split).model.get_encoder()
    if enc.config.d_model != split.loaded.d_model:
        raise UserError(f"the teacher's device encoder is {enc.config.d_model} wide but its decoder takes {split.loaded.d_model}",
                        "distill from a split whose device runs the server model's own (or a pruned) encoder")
    out = {"front": [], "target": [], "ids": [], "hidden": []}
    for i in range(feats.shape[0]):
        f = feats[i : i + 1]
        if n_frames is not None:
            f = f[:, :, : min(f.shape[-1], 2 * int(n_frames[i]) + FIT_MARGIN)]
        x = whisper_front(enc, f)
        hs = whisper_layer_outputs(enc, x)
        h = enc.layer_norm(hs[-1])
        if ids is not None:
            tok = torch.as_tensor(ids[i], dtype=torch.long)
        else:
            tok = model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=h), max_new_tokens=max_tokens,
                                 **generate_kwargs(split.loaded))[0]
        out["front"].append(x[0].half())
        out["target"].append(h[0].half())
        out["ids"].append(tok[:max_tokens])
        if hidden:
            out["hidden"].append(torch.stack([t[0] for t in hs]).half())
    return out


def _device_model(split):
    """The LoadedModel whose encoder `split`'s device runs (its own, or a pruned / distilled copy)."""
    return split.device_model or split.loaded


def _content_mask(shape, idx, n_frames) -> torch.Tensor:
    m = torch.ones(shape)
    if n_frames is not None:
        m.zero_()
        for j, i in enumerate(idx):
            m[j, : int(n_frames[i])] = 1
    return m


def _inv_std(tensors, n_frames) -> torch.Tensor:
    """1 / per-dimension std of the teacher's [n, d] tensors over their content frames."""
    rows = [t[: int(n_frames[i]) if n_frames is not None else t.shape[0]].float() for i, t in enumerate(tensors)]
    return 1.0 / torch.cat(rows).std(0).clamp_min(1e-3)


def _masked_mse(a, b, mask, inv_std=None) -> torch.Tensor:
    d = a - b if inv_std is None else (a - b) * inv_std
    return ((d ** 2).mean(-1) * mask).sum() / mask.sum()


def lr_factor(step: int, cfg: "DistillConfig") -> float:
    """Linear warm-up over cfg.warmup steps, then cosine decay to 0 (constant without warm-up)."""
    return warmup_cosine(step, cfg.steps, cfg.warmup) if cfg.warmup else 1.0


def _kl(model, h_s, h_t, ids, temperature):
    """KL(teacher || student) of the decoder's next-token distributions, teacher-forced on ids."""
    from transformers.modeling_outputs import BaseModelOutput

    dec_in = ids[:, :-1]
    with torch.no_grad():
        lt = model(encoder_outputs=BaseModelOutput(last_hidden_state=h_t), decoder_input_ids=dec_in).logits
    ls = model(encoder_outputs=BaseModelOutput(last_hidden_state=h_s), decoder_input_ids=dec_in).logits
    t = temperature
    return nn.functional.kl_div(nn.functional.log_softmax(ls / t, -1), nn.functional.log_softmax(lt / t, -1),
                                log_target=True, reduction="batchmean") * t * t


def _ckpt_paths(workdir: Path):
    return workdir / "student.safetensors", workdir / "optim.safetensors", workdir / "state.json"


def _save(workdir: Path, params: dict, opt: torch.optim.Optimizer, step: int, cfg: DistillConfig, losses: list) -> None:
    from safetensors.torch import save

    wp, op, sp = _ckpt_paths(workdir)
    write_atomic(wp, save({k: v.detach().contiguous() for k, v in params.items()}))
    names = {id(p): k for k, p in params.items()}
    ost = {}
    for p, st in opt.state.items():
        for key, v in st.items():
            if torch.is_tensor(v):
                ost[f"{names[id(p)]}::{key}"] = v.detach().contiguous().reshape(v.shape) if v.dim() else v.reshape(1)
    write_atomic(op, save(ost))
    write_atomic(sp, json.dumps({"step": step, "config": cfg.to_dict(), "config_hash": cfg.hash(), "losses": losses[-1000:]},
                                indent=1).encode())


def _load(workdir: Path, params: dict, opt: torch.optim.Optimizer, cfg: DistillConfig) -> tuple[int, list]:
    from safetensors.torch import load_file

    wp, op, sp = _ckpt_paths(workdir)
    if not sp.is_file():
        return 0, []
    state = json.loads(sp.read_text())
    if state.get("config_hash") != cfg.hash():
        raise UserError(f"{workdir} holds a distillation run with a different config",
                        "use a new workdir, or delete that folder to start over")
    w = load_file(str(wp))
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(w[k])
    if op.is_file():
        ost = load_file(str(op))
        for k, p in params.items():
            st = {}
            for key in ("step", "exp_avg", "exp_avg_sq"):
                v = ost.get(f"{k}::{key}")
                if v is not None:
                    st[key] = v.reshape(()) if key == "step" else v
            if st:
                opt.state[p] = st
    return int(state["step"]), list(state.get("losses", []))


def train(split, student_model, cfg: DistillConfig, calib, workdir: str | Path | None = None, progress: bool = True,
          targets: dict | None = None) -> list[float]:
    """Train the student encoder in `student_model` in place against `split` (the teacher); returns the loss per step."""
    if calib is None or len(calib) == 0:
        raise UserError("distillation needs training inputs", "pass calib (log-mel features [N, 80, 3000] of training utterances)")
    feats = calib["features"] if isinstance(calib, dict) else calib
    n_frames = calib.get("n_frames") if isinstance(calib, dict) else None
    ids = calib.get("ids") if isinstance(calib, dict) else None
    torch.manual_seed(cfg.seed)
    enc = student_model.get_encoder()
    src = getattr(enc.config, "semedge_teacher_layers", None) or list(range(len(enc.layers)))
    n_teacher = len(_device_model(split).model.get_encoder().layers)
    if cfg.hidden_weight and (len(src) != len(enc.layers) or max(src) >= n_teacher):
        raise UserError(f"hidden_weight: the student's layers come from teacher layers {src}, "
                        f"but the teacher has {n_teacher}", "distill from the model the student was cut from, or set hidden_weight 0")
    targets = targets or teacher_targets(split, feats, cfg.max_tokens, n_frames, hidden=bool(cfg.hidden_weight), ids=ids)
    inv_std = _inv_std(targets["target"], n_frames) if cfg.feature_norm else None
    inv_hid = ([_inv_std([h[t] for h in targets["hidden"]], n_frames) if cfg.feature_norm else None for t in src]
               if cfg.hidden_weight else [])
    for p in student_model.parameters():
        p.requires_grad_(False)
    params = {}
    for name, p in enc.named_parameters():
        if name.startswith(("layers.", "layer_norm.")):
            p.requires_grad_(True)
            params[name] = p
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=0.0)
    workdir = Path(workdir) if workdir is not None else None
    start, losses = (_load(workdir, params, opt, cfg) if workdir is not None else (0, []))
    g = torch.Generator().manual_seed(cfg.seed)
    n = len(targets["front"])
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(cfg.steps * cfg.batch_size // n + 1)])
    bar = range(start, cfg.steps)
    if progress:
        from tqdm import tqdm

        bar = tqdm(bar, initial=start, total=cfg.steps, desc="distill", unit="step")
    student_model.train()
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg)
        idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size].tolist()
        if len({targets["front"][i].shape[0] for i in idx}) > 1:
            raise UserError("fitted windows differ in length within a batch", "use batch_size 1 with n_frames")
        x = torch.stack([targets["front"][i].float() for i in idx])
        ht = torch.stack([targets["target"][i].float() for i in idx])
        outs = whisper_layer_outputs(enc, x)
        hs = enc.layer_norm(outs[-1])
        mask = _content_mask(hs.shape[:2], idx, n_frames)
        loss = torch.zeros(())
        if cfg.mse_weight:
            loss = loss + cfg.mse_weight * _masked_mse(hs, ht, mask, inv_std)
        if cfg.hidden_weight:
            hid = sum(_masked_mse(outs[j], torch.stack([targets["hidden"][i][t].float() for i in idx]), mask, inv_hid[j])
                      for j, t in enumerate(src))
            loss = loss + cfg.hidden_weight * hid / len(src)
        if cfg.kl_weight:
            kl = 0
            for j, i in enumerate(idx):
                ids = targets["ids"][i][None]
                if ids.shape[1] >= 2:
                    kl = kl + _kl(student_model, hs[j : j + 1], ht[j : j + 1], ids, cfg.temperature)
            loss = loss + cfg.kl_weight * kl / len(idx)
        if not torch.isfinite(loss):
            raise UserError(f"distillation loss is {float(loss)} at step {step}",
                            "lower lr (the last good checkpoint is in the workdir)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if progress:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if workdir is not None and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
            _save(workdir, params, opt, step + 1, cfg, losses)
    student_model.eval()
    for p in student_model.parameters():
        p.requires_grad_(False)
    return losses


def apply(split, config: DistillConfig | dict, calib=None, progress: bool = True, workdir: str | Path | None = None,
          teacher=None):
    """A new SplitModel whose device runs the trained student encoder; the server half (decoder,
    silence encoding, the package's model source) and the codec stay `split`'s.

    The student starts from `split`'s encoder (e.g. a pruned one); it learns from `teacher`
    (default `split`): after pruning, pass the unpruned split to recover toward it."""
    from semedge.semcom.split import build_split

    if isinstance(config, dict):
        config = DistillConfig.from_dict(config, "distill config")
    if not split.task.supports("distill"):
        raise UserError("distillation is implemented for speech (Whisper) encoders", "use prune for text encoders")
    from semedge.semcom.models import derived

    src = _device_model(split)
    student = make_student(src.model, config)
    losses = train(teacher or split, student, config, calib, workdir=workdir, progress=progress)
    out = build_split(split.loaded, copy.deepcopy(split.codec), encoder=derived(src, student, config.describe()))
    out.distill_losses = losses
    return out


def save_student(split, path: str | Path) -> Path:
    """The student encoder's weights (safetensors) plus its layer count in the metadata."""
    from safetensors.torch import save

    enc = split.device.encoder
    sd = {k: v.contiguous() for k, v in enc.state_dict().items()}
    return write_atomic(path, save(sd, metadata={"encoder_layers": str(len(enc.layers))}))
