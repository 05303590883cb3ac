"""LoRA / QLoRA on a private copy of the model: surgery, merging, adapter weights in and out.

What the server and the exporter need from training, and nothing else: they import this
module, never the trainer. Adapters are peft's (`inject_adapter_in_model`), named by
peft; a QLoRA base is bitsandbytes nf4 with fp32 compute.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from semedge.core.errors import UserError
from semedge.semcom.training.config import LoRASpec

__all__ = ["LoRASpec", "lora_target_modules", "quantize_nf4", "add_lora", "merge_lora", "adapter_state",
           "load_adapter_state", "prepare_model"]


def _short_name(name: str) -> tuple[str, str] | None:
    """('encoder.layers.3.self_attn.q_proj', 'encoder.self_attn') for a layer's module, else None."""
    inner = name.split("model.", 1)[-1] if name.startswith("model.") else name
    segs = inner.split(".")
    if len(segs) < 4 or segs[1] != "layers":
        return None
    return inner, f"{segs[0]}.{segs[3]}"


def lora_target_modules(model, spec: LoRASpec) -> list[str]:
    """Full module names matching the spec: '<prefix>...<projection>' inside model.model.{encoder,decoder}."""
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) and type(mod).__name__ != "Linear4bit":
            continue
        if name.split(".")[-1] not in spec.projections:
            continue
        inner_short = _short_name(name)
        if inner_short is None:
            continue
        inner, short = inner_short
        if any(short == t or inner.startswith(t) for t in spec.targets):
            names.append(name)
    if not names:
        raise UserError(f"no LoRA target matched {list(spec.targets)} x {list(spec.projections)}",
                        "targets look like decoder.self_attn, decoder.encoder_attn, encoder.self_attn; proj q_proj+v_proj")
    return names


def _nf4_linear(child: nn.Linear):
    """A frozen bitsandbytes nf4 copy of `child`, computing in fp32, on the CPU."""
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                          compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4")
    if child.bias is not None:
        q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
    q = q.to("cpu")
    if not getattr(q.weight, "bnb_quantized", False):
        q.weight = q.weight._quantize("cpu") if hasattr(q.weight, "_quantize") else q.weight
    return q


def quantize_nf4(model, prefixes: tuple[str, ...] = ("model.decoder", "model.encoder")) -> int:
    """Replace every nn.Linear under `prefixes` by a frozen bitsandbytes nf4 Linear4bit (fp32 compute). Returns the count."""
    count = 0
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            full = f"{name}.{cname}" if name else cname
            if isinstance(child, nn.Linear) and full.startswith(prefixes):
                setattr(mod, cname, _nf4_linear(child))
                count += 1
    return count


def add_lora(model, spec: LoRASpec) -> list[str]:
    """Inject LoRA adapters (peft) into `model` in place; freeze everything else. Returns the target names."""
    from peft import LoraConfig, inject_adapter_in_model

    names = lora_target_modules(model, spec)
    cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=names, bias="none")
    inject_adapter_in_model(cfg, model)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return names


def merge_lora(module):
    """A copy of `module` with every peft LoRA layer merged into its base weights (or `module` if none)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return module
    if not any(isinstance(m, BaseTunerLayer) for m in module.modules()):
        return module
    module = copy.deepcopy(module)
    for name, m in list(module.named_modules()):
        if isinstance(m, BaseTunerLayer):
            m.merge()
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attr, m.get_base_layer())
    return module


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The LoRA weights (peft names), fp32, ready for safetensors."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    res = set_peft_model_state_dict(model, state)
    unexpected = getattr(res, "unexpected_keys", []) or []
    if unexpected:
        raise UserError(f"the checkpoint's LoRA weights do not fit this model ({len(unexpected)} unknown keys, e.g. {unexpected[0]})",
                        "load it into the model it was trained on")


def prepare_model(loaded, lora: LoRASpec | None, qlora: bool):
    """A private copy of the model, frozen, optionally nf4-quantized and with LoRA adapters."""
    model = copy.deepcopy(loaded.model)
    for p in model.parameters():
        p.requires_grad_(False)
    if qlora:
        quantize_nf4(model)
    if lora is not None:
        add_lora(model, lora)
    model.eval()  # no dropout in the base model
    return model
