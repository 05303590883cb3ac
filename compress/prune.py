"""Structured pruning of the encoder: attention heads, FFN neurons, whole layers.

Pruned weights are removed (smaller nn.Linear matrices, fewer layers), so the
exported ONNX file is smaller and runs fewer FLOPs. Works on encoders whose layers
have `self_attn` (q_proj, k_proj, v_proj, out_proj, num_heads, head_dim) and
`fc1`/`fc2`: Whisper, BART, Marian.

Importance (one calibration pass, no gradients):
- head h: mean over tokens of ||ctx_h|| * ||W_out[:, h]||_F, the size of the head's
  contribution to the residual stream (ctx_h: the head's attention output);
- FFN neuron j: mean |act_j| * ||W_fc2[:, j]||, likewise;
- layer: mean over tokens of ||out - in|| / ||in||, how much the layer changes its
  input (layers measured first; heads/neurons are then ranked on the remaining model).
With scope "global", scores are divided by their layer's mean before ranking across
layers, so layers keep different numbers of heads / neurons.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from semedge.compress.plan import ConfigBase, check_choice, check_ratio
from semedge.core.errors import UserError


@dataclass(frozen=True)
class PruneConfig(ConfigBase):
    heads: float = 0.0  # fraction of the encoder's attention heads removed
    ffn: float = 0.0  # fraction of the encoder's FFN neurons removed
    layers: float = 0.0  # fraction of encoder layers removed (ranked), or ...
    drop_layers: tuple = ()  # ... these layer indices removed (not both)
    keep_first: bool = True  # never drop the first / last layer by ranking
    keep_last: bool = True
    scope: str = "global"  # "global": ranked across layers; "layer": the same fraction in each layer
    min_heads: int = 1  # heads kept per layer at least
    ffn_multiple: int = 8  # FFN width kept per layer is a multiple of this (fast matmuls)

    def __post_init__(self):
        check_ratio("heads", self.heads)
        check_ratio("ffn", self.ffn)
        check_ratio("layers", self.layers)
        check_choice("scope", self.scope, ("global", "layer"))
        if not isinstance(self.drop_layers, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in self.drop_layers
        ):
            raise UserError(f"drop_layers={self.drop_layers!r} must be a list of layer indices", "e.g. [2, 3]")
        object.__setattr__(self, "drop_layers", tuple(sorted(set(self.drop_layers))))
        if self.drop_layers and self.layers:
            raise UserError("both layers and drop_layers are set", "give a fraction (layers) or explicit indices (drop_layers), not both")
        for name in ("min_heads", "ffn_multiple"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"{name}={v!r} must be a positive integer", f"set {name} >= 1")

    def is_noop(self) -> bool:
        return not (self.heads or self.ffn or self.layers or self.drop_layers)

    def describe(self) -> str:
        parts = []
        if self.heads:
            parts.append(f"h={self.heads:g}")
        if self.ffn:
            parts.append(f"f={self.ffn:g}")
        if self.layers:
            parts.append(f"l={self.layers:g}")
        if self.drop_layers:
            parts.append("drop=" + "+".join(map(str, self.drop_layers)))
        return f"prune({','.join(parts)})"


# ---------------------------------------------------------------- finding the encoder


def find_encoder(model) -> nn.Module:
    """The encoder module (with .layers) inside a SplitModel, a device half, an HF model or itself."""
    if hasattr(model, "device") and hasattr(model, "server") and hasattr(model, "loaded"):  # SplitModel
        model = model.device
    if hasattr(model, "get_encoder"):
        model = model.get_encoder()
    elif hasattr(model, "encoder") and not hasattr(model, "layers"):  # device half
        model = model.encoder
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise UserError(f"{type(model).__name__} has no encoder layers to prune", "prune Whisper, BART or Marian encoders")
    lay = layers[0]
    if not (hasattr(lay, "self_attn") and hasattr(lay, "fc1") and hasattr(lay, "fc2")
            and all(hasattr(lay.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads", "head_dim"))):
        raise UserError(f"{type(lay).__name__} layers are not supported by structured pruning",
                        "prune Whisper, BART or Marian encoders (self_attn q/k/v/out_proj + fc1/fc2)")
    return model


def encoder_shapes(model) -> dict:
    """Per-layer kept sizes: {"heads": [...], "ffn": [...]} (enough to rebuild a pruned encoder)."""
    enc = find_encoder(model)
    return {"heads": [int(l.self_attn.num_heads) for l in enc.layers], "ffn": [int(l.fc1.out_features) for l in enc.layers]}


def shape_encoder(model, shapes: dict) -> None:
    """Resize an encoder in place to `shapes` (weights are placeholders: load a state dict after)."""
    enc = find_encoder(model)
    heads, ffn = list(shapes["heads"]), list(shapes["ffn"])
    if len(heads) != len(ffn):
        raise UserError("shapes have different numbers of heads and ffn entries", "pass encoder_shapes() output")
    del enc.layers[len(heads):]
    if len(enc.layers) != len(heads):
        raise UserError(f"shapes list {len(heads)} layers but the encoder has {len(enc.layers)}", "pass encoder_shapes() output")
    for lay, h, f in zip(enc.layers, heads, ffn):
        _keep_heads(lay.self_attn, list(range(h)))
        _keep_neurons(lay, list(range(f)))
    _sync_config(enc)


# ---------------------------------------------------------------- surgery


def _sub_linear(lin: nn.Linear, rows=None, cols=None) -> nn.Linear:
    w = lin.weight.data
    b = lin.bias.data if lin.bias is not None else None
    if rows is not None:
        w = w[rows]
        b = b[rows] if b is not None else None
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype, device=w.device)
    new.weight.data.copy_(w)
    if b is not None:
        new.bias.data.copy_(b)
    return new


def _keep_heads(attn: nn.Module, keep: list[int]) -> None:
    hd = attn.head_dim
    idx = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in sorted(keep)])
    attn.q_proj = _sub_linear(attn.q_proj, rows=idx)
    attn.k_proj = _sub_linear(attn.k_proj, rows=idx)
    attn.v_proj = _sub_linear(attn.v_proj, rows=idx)
    attn.out_proj = _sub_linear(attn.out_proj, cols=idx)
    attn.num_heads = len(keep)  # head_dim (and the scaling) stay


def _keep_neurons(layer: nn.Module, keep: list[int]) -> None:
    idx = torch.tensor(sorted(keep))
    layer.fc1 = _sub_linear(layer.fc1, rows=idx)
    layer.fc2 = _sub_linear(layer.fc2, cols=idx)


def _sync_config(enc: nn.Module) -> None:
    cfg = getattr(enc, "config", None)
    if cfg is None:
        return
    cfg.encoder_layers = len(enc.layers)
    cfg.semedge_encoder_shapes = {"heads": [int(l.self_attn.num_heads) for l in enc.layers],
                                  "ffn": [int(l.fc1.out_features) for l in enc.layers]}


# ---------------------------------------------------------------- importance


def _run(enc: nn.Module, calib) -> None:
    if isinstance(calib, dict):
        enc(**calib)
    elif isinstance(calib, (list, tuple)):
        for c in calib:
            _run(enc, c)
    else:
        for i in range(calib.shape[0]):  # one at a time: 30 s windows are big
            enc(calib[i : i + 1])


def _run_hooked(enc: nn.Module, calib, hooks: list) -> None:
    """Run the calibration data through `enc` in eval mode, then remove `hooks`."""
    try:
        was = enc.training
        enc.eval()
        _run(enc, calib)
        enc.train(was)
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def layer_importance(model, calib) -> list[float]:
    enc = find_encoder(model)
    sums = [0.0] * len(enc.layers)
    counts = [0] * len(enc.layers)
    hooks = []
    for i, lay in enumerate(enc.layers):
        def hook(mod, args, out, i=i):
            x = args[0] if args else None
            y = out[0] if isinstance(out, tuple) else out
            r = (y - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-6)
            sums[i] += float(r.mean())
            counts[i] += 1
        hooks.append(lay.register_forward_hook(hook))
    _run_hooked(enc, calib, hooks)
    return [s / max(c, 1) for s, c in zip(sums, counts)]


@torch.no_grad()
def unit_importance(model, calib) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(head scores [H_l] per layer, neuron scores [F_l] per layer)."""
    enc = find_encoder(model)
    heads = [torch.zeros(l.self_attn.num_heads, dtype=torch.float64) for l in enc.layers]
    neurons = [torch.zeros(l.fc1.out_features, dtype=torch.float64) for l in enc.layers]
    counts = [0] * len(enc.layers)
    hooks = []
    for i, lay in enumerate(enc.layers):
        attn = lay.self_attn

        def head_hook(mod, args, i=i, attn=attn):
            ctx = args[0]  # [B, T, H*hd]
            ctx = ctx.reshape(*ctx.shape[:-1], attn.num_heads, attn.head_dim)
            heads[i] += ctx.norm(dim=-1).reshape(-1, attn.num_heads).mean(0).double()
            counts[i] += 1

        def ffn_hook(mod, args, i=i):
            a = args[0]
            neurons[i] += a.abs().reshape(-1, a.shape[-1]).mean(0).double()

        hooks.append(attn.out_proj.register_forward_pre_hook(head_hook))
        hooks.append(lay.fc2.register_forward_pre_hook(ffn_hook))
    _run_hooked(enc, calib, hooks)
    for i, lay in enumerate(enc.layers):
        n = max(counts[i], 1)
        attn = lay.self_attn
        w_out = attn.out_proj.weight.detach().double().reshape(attn.out_proj.out_features, attn.num_heads, attn.head_dim)
        heads[i] = heads[i] / n * w_out.pow(2).sum((0, 2)).sqrt()
        neurons[i] = neurons[i] / n * lay.fc2.weight.detach().double().norm(dim=0)
    return heads, neurons


def _select(scores: list[torch.Tensor], ratio: float, scope: str, min_keep: int, multiple: int = 1) -> list[list[int]]:
    """Indices kept per layer after removing `ratio` of all units."""
    sizes = [len(s) for s in scores]
    if ratio <= 0:
        return [list(range(n)) for n in sizes]
    if scope == "layer":
        keeps = [max(min_keep, n - int(round(ratio * n))) for n in sizes]
    else:
        normed = [s / s.mean().clamp_min(1e-12) for s in scores]
        flat = torch.cat(normed)
        n_remove = int(round(ratio * flat.numel()))
        order = torch.argsort(flat, stable=True)
        layer_of = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
        removed = [0] * len(sizes)
        for j in order.tolist():
            if n_remove == 0:
                break
            li = int(layer_of[j])
            if sizes[li] - removed[li] > min_keep:
                removed[li] += 1
                n_remove -= 1
        keeps = [n - r for n, r in zip(sizes, removed)]
    out = []
    for s, n, k in zip(scores, sizes, keeps):
        if multiple > 1 and k < n:
            k = min(n, max(multiple, int(round(k / multiple)) * multiple))
        top = torch.argsort(s, descending=True, stable=True)[:k]
        out.append(sorted(top.tolist()))
    return out


# ---------------------------------------------------------------- apply


def prune_encoder_(model, config: PruneConfig, calib=None) -> dict:
    """Prune the encoder inside `model` in place; returns what was kept (indices per layer)."""
    enc = find_encoder(model)
    n_layers = len(enc.layers)
    bad = [i for i in config.drop_layers if not -n_layers <= i < n_layers]
    if bad:
        raise UserError(f"drop_layers names layer(s) {bad}, but the encoder has layers 0..{n_layers - 1}",
                        f"use indices in 0..{n_layers - 1}")
    if config.is_noop():
        return {"layers": list(range(n_layers)), **encoder_shapes(enc)}
    if calib is None and (config.heads or config.ffn or config.layers):
        raise UserError("pruning by importance needs calibration inputs", "pass calib (e.g. log-mel features of a few utterances)")
    drop = sorted({i % n_layers for i in config.drop_layers})
    if config.layers:
        n_drop = int(round(config.layers * n_layers))
        protect = ({0} if config.keep_first else set()) | ({n_layers - 1} if config.keep_last else set())
        cand = [i for i in range(n_layers) if i not in protect]
        if n_drop > len(cand):
            raise UserError(f"layers={config.layers} drops {n_drop} of {n_layers} layers but only {len(cand)} may go",
                            "lower layers or set keep_first/keep_last to false")
        imp = layer_importance(enc, calib)
        drop = sorted(sorted(cand, key=lambda i: (imp[i], i))[:n_drop])
    if len(drop) >= n_layers:
        raise UserError("pruning would remove every encoder layer", "drop fewer layers")
    kept_layers = [i for i in range(n_layers) if i not in drop]
    if drop:
        enc.layers = nn.ModuleList([enc.layers[i] for i in kept_layers])
        prev = getattr(enc.config, "semedge_teacher_layers", None)  # which original layer each one is
        enc.config.semedge_teacher_layers = [prev[i] for i in kept_layers] if prev else kept_layers
    info = {"layers": kept_layers}
    if config.heads or config.ffn:
        h_scores, f_scores = unit_importance(enc, calib)
        keep_h = _select(h_scores, config.heads, config.scope, config.min_heads)
        keep_f = _select(f_scores, config.ffn, config.scope, 1, config.ffn_multiple)
        for lay, kh, kf in zip(enc.layers, keep_h, keep_f):
            if len(kh) < lay.self_attn.num_heads:
                _keep_heads(lay.self_attn, kh)
            if len(kf) < lay.fc1.out_features:
                _keep_neurons(lay, kf)
        info["kept_heads"] = keep_h
        info["kept_ffn"] = [len(k) for k in keep_f]
    _sync_config(enc)
    info.update(encoder_shapes(enc))
    return info


def copy_encoder(model):
    """A copy of the HF model `model` whose encoder is its own; the rest (the decoder: most of the
    weights, unused by a device half) shares the original's tensors instead of copying them."""
    if not hasattr(model, "get_encoder"):
        return copy.deepcopy(model)
    enc = model.get_encoder()
    own = {id(t) for t in [*enc.parameters(), *enc.buffers()]}
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in own}
    return copy.deepcopy(model, memo)


def apply(model, config: PruneConfig | dict, calib=None):
    """Pruned copy of `model` (a SplitModel, an HF model or an encoder); the input is left as it is.

    For a SplitModel the device model is copied and pruned, and the split rebuilt around
    the same codec with the pruned model as its device encoder: the server half (decoder,
    silence encoding, the package's model source) stays the unpruned model's.
    """
    if isinstance(config, dict):
        config = PruneConfig.from_dict(config, "prune config")
    if hasattr(model, "device") and hasattr(model, "server") and hasattr(model, "loaded"):
        from semedge.semcom.models import derived
        from semedge.semcom.split import build_split

        src = model.device_model or model.loaded
        new_model = copy_encoder(src.model)
        info = prune_encoder_(new_model, config, calib)
        split = build_split(model.loaded, copy.deepcopy(model.codec), encoder=derived(src, new_model, config.describe()))
        split.prune_info = info
        return split
    new = copy.deepcopy(model)
    prune_encoder_(new, config, calib)
    return new
