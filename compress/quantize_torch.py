"""Quantization of the PyTorch server half (the decoder's nn.Linear layers), torchao style.

    quantize_(decoder, BnbNf4(blocksize=64), skip_filter(["layers\\.0\\."]))

One class per mode, each replacing one nn.Linear (`swap`); `MODES` maps a mode's name
(the step config's "mode") to its class; a filter over (module, name) chooses the layers.
- "torch_int8" (TorchInt8): torch dynamic int8 (qint8 weights, activations quantized per call).
- "bnb_int8" (BnbInt8):     bitsandbytes Linear8bitLt (LLM.int8 weights, outlier threshold).
- "bnb_nf4" (BnbNf4):       bitsandbytes Linear4bit, NF4 blocks, fp32 compute. On CPU without the
  `kernels` package bnb 0.50 takes a slow dequantize-then-matmul path.
The encoder (device half), the JSC decoder, the token embeddings and the LM head
(tied to the embeddings in Whisper) stay fp32; `skip` adds more module-name regexes.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from semedge.compress.plan import ConfigBase, check_choice
from semedge.core.errors import UserError

ModuleFilter = Callable[[nn.Module, str], bool]  # (module, qualified name) -> True to quantize it


# ---------------------------------------------------------------- modes


class TorchMode:
    """A server quantization mode: a frozen dataclass of its settings; `swap` returns a layer's replacement."""

    name: ClassVar[str]
    label: ClassVar[str]

    @classmethod
    def from_step(cls, cfg: "ServerQuantConfig") -> "TorchMode":
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})

    def swap(self, lin: nn.Linear) -> nn.Module:
        raise NotImplementedError


@dataclass(frozen=True)
class TorchInt8(TorchMode):
    name: ClassVar[str] = "torch_int8"
    label: ClassVar[str] = "server:torch-int8"

    def swap(self, lin: nn.Linear) -> nn.Module:
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)[0]


@dataclass(frozen=True)
class BnbInt8(TorchMode):
    name: ClassVar[str] = "bnb_int8"
    label: ClassVar[str] = "server:bnb-int8"
    threshold: float = 6.0  # outlier threshold (LLM.int8)

    def swap(self, lin: nn.Linear) -> nn.Module:
        import bitsandbytes as bnb

        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None, has_fp16_weights=False,
                                threshold=self.threshold, device="meta")
        q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        return q.to("cpu")  # quantizes the weight


@dataclass(frozen=True)
class BnbNf4(TorchMode):
    name: ClassVar[str] = "bnb_nf4"
    label: ClassVar[str] = "server:nf4"
    blocksize: int = 64  # weights per absmax scale

    def swap(self, lin: nn.Linear) -> nn.Module:
        import bitsandbytes as bnb

        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=torch.float32,
                              compress_statistics=False, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     blocksize=self.blocksize, compress_statistics=False)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        return q.to("cpu")


# The registry: a step config's "mode" -> the class that applies it.
MODES: dict[str, type[TorchMode]] = {
    "torch_int8": TorchInt8,
    "bnb_int8": BnbInt8,
    "bnb_nf4": BnbNf4,
}


# ---------------------------------------------------------------- the step config (plan JSON)


@dataclass(frozen=True)
class ServerQuantConfig(ConfigBase):
    """A quantize_server step as plans store it: `mode` names a class in MODES, `skip` filters layers."""

    mode: str = "torch_int8"
    skip: tuple = ()  # regexes on decoder module names kept fp32
    threshold: float = 6.0  # bnb_int8: outlier threshold (LLM.int8)
    blocksize: int = 64  # bnb_nf4: weights per absmax scale

    def __post_init__(self):
        check_choice("mode", self.mode, tuple(MODES))
        if isinstance(self.skip, str) or not isinstance(self.skip, (list, tuple)):
            raise UserError(f"skip={self.skip!r} must be a list of regexes", 'e.g. ["layers\\\\.0\\\\."]')
        for p in self.skip:
            try:
                re.compile(p)
            except (re.error, TypeError) as e:
                raise UserError(f"skip pattern {p!r} is not a valid regex ({e})", "fix the regex") from None
        object.__setattr__(self, "skip", tuple(self.skip))
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or self.threshold < 0:
            raise UserError(f"threshold={self.threshold!r} must be a number >= 0", "6.0 is the LLM.int8 default")
        check_choice("blocksize", self.blocksize, (64, 128, 256, 512, 1024, 2048, 4096))

    def mode_config(self) -> TorchMode:
        return MODES[self.mode].from_step(self)

    def describe(self) -> str:
        return self.mode_config().label


# ---------------------------------------------------------------- apply


def _decoder(model) -> nn.Module:
    if hasattr(model, "get_decoder"):
        return model.get_decoder()
    if hasattr(model, "model") and hasattr(model.model, "decoder"):
        return model.model.decoder
    raise UserError(f"{type(model).__name__} has no decoder to quantize", "quantize_server works on encoder-decoder models")


def skip_filter(skip) -> ModuleFilter:
    """A filter over (module, name): the nn.Linear layers whose name no `skip` regex matches."""
    regs = [re.compile(p) for p in skip]
    return lambda m, name: isinstance(m, nn.Linear) and not any(r.search(name) for r in regs)


def _set(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def quantize_(root: nn.Module, mode: TorchMode, filter_fn: ModuleFilter) -> int:
    """Replace, in place, each submodule of `root` that `filter_fn(module, name)` accepts; returns how many."""
    names = [n for n, m in root.named_modules() if n and filter_fn(m, n)]
    with torch.no_grad():
        for n in names:
            _set(root, n, mode.swap(root.get_submodule(n)))
    return len(names)


def quantize_decoder_(model, config: ServerQuantConfig) -> int:
    """Replace the decoder's nn.Linear layers of `model` in place; returns how many."""
    return quantize_(_decoder(model), config.mode_config(), skip_filter(config.skip))


def apply(split, config: ServerQuantConfig | dict):
    """A copy of `split` whose server half runs a quantized decoder; the device half is shared."""
    from semedge.semcom.split import ServerHalf, SplitModel

    if isinstance(config, dict):
        config = ServerQuantConfig.from_dict(config, "quantize_server config")
    if not isinstance(split, SplitModel):
        raise UserError(f"quantize_server takes a SplitModel, got {type(split).__name__}", "build one with build_split(load_model(...))")
    loaded = split.loaded
    model = copy.deepcopy(loaded.model)
    n = quantize_decoder_(model, config)
    new_loaded = dataclasses.replace(loaded, model=model.eval(), source=f"{loaded.source}+{config.describe()}")
    server = ServerHalf(new_loaded, split.server.jsc, split.server.silence)
    out = SplitModel(new_loaded, split.codec, split.device, server.eval())
    out.server_quant = {"mode": config.mode, "linears": n}
    return out


def decoder_bytes(model) -> int:
    """Bytes of the decoder's parameters and buffers as stored (quantized weights counted as stored)."""
    dec = _decoder(model)
    total = 0
    seen = set()
    for t in list(dec.parameters()) + list(dec.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
        qs = getattr(t, "quant_state", None)  # bnb 4-bit: absmax etc.
        if qs is not None and getattr(qs, "absmax", None) is not None:
            total += qs.absmax.numel() * qs.absmax.element_size()
        if getattr(t, "SCB", None) is not None:  # bnb int8 row scales
            total += t.SCB.numel() * t.SCB.element_size()
    for m in dec.modules():  # torch dynamic int8 keeps packed weights outside parameters
        if type(m).__module__.startswith("torch.ao.nn.quantized") and callable(getattr(m, "weight", None)):
            w, b = m.weight(), m.bias()
            total += w.int_repr().numel()
            if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                total += w.q_per_channel_scales().numel() * 8
            if b is not None:
                total += b.numel() * b.element_size()
    return total
