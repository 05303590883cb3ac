"""CTranslate2 as the server's Whisper decoder.

The server's decoder runs the receiver's own weights: the Hugging Face model the
codec was trained with, LoRA adapters merged in, converted once with
CTranslate2's maintained converter (`TransformersConverter`) and cached under
`$XDG_CACHE_HOME/semedge/ct2-decoders/<key>`, the key covering the weights, the
quantization and the ctranslate2 version. `compute_type="int8"` quantizes the
linear layers' weights at conversion (per output channel); activations stay fp32.

CTranslate2's `Whisper.generate` accepts encoder output [B, 1500, d] in place of a
log-mel, so the JSC decoder's rebuilt frames (plus the silence fill) go straight in.
Greedy, no timestamps, the model's suppress lists: the same decoding as
`ServerHalf.generate` with the torch backend.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from semedge.core.errors import UserError
from semedge.core.files import cached
from semedge.semcom.ct2 import cache_root

COMPUTE_TYPES = ("int8", "float32", "int8_float32")


def cache_dir() -> Path:
    return cache_root() / "ct2-decoders"


def _dense(lin: nn.Module) -> nn.Linear:
    """A plain nn.Linear with a bitsandbytes Linear4bit's weights, dequantized."""
    import bitsandbytes.functional as bf

    w = bf.dequantize_4bit(lin.weight.data, lin.weight.quant_state).float()
    out = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None)
    out.weight.data.copy_(w)
    if lin.bias is not None:
        out.bias.data.copy_(lin.bias.data.float())
    return out


@torch.no_grad()
def merged_copy(model: nn.Module) -> nn.Module:
    """`model` with nf4 layers dequantized (QLoRA bases) and LoRA merged in (`training.adapters.merge_lora`);
    `model` itself when it has neither."""
    from semedge.semcom.training.adapters import merge_lora

    if any(type(m).__name__ == "Linear4bit" for m in model.modules()):
        model = copy.deepcopy(model)
        for name, mod in list(model.named_modules()):
            for cname, child in list(mod.named_children()):
                if type(child).__name__ == "Linear4bit":
                    setattr(mod, cname, _dense(child))
    return merge_lora(model).float().eval()


def weights_key(model: nn.Module, compute_type: str) -> str:
    """sha256 over the state dict (names, shapes, bytes), the compute type and the ctranslate2 version."""
    import ctranslate2

    h = hashlib.sha256(f"{compute_type}|{ctranslate2.__version__}".encode())
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().float().contiguous().cpu()
        h.update(f"{k}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:24]


def convert(loaded, compute_type: str = "int8", progress=None) -> Path:
    """The CTranslate2 folder for `loaded.model` (LoRA merged), converting on first use."""
    if compute_type not in COMPUTE_TYPES:
        raise UserError(f"CTranslate2 compute type {compute_type!r} is unknown", f"use one of {', '.join(COMPUTE_TYPES)}")
    if getattr(loaded.model.config, "model_type", "") != "whisper":
        raise UserError(f"the CTranslate2 backend serves Whisper models, not {loaded.source}",
                        "serve it with --backend torch")
    model = merged_copy(loaded.model)
    out = cache_dir() / weights_key(model, compute_type)
    # another process may convert the same weights first: its folder is used
    return cached(out, lambda tmp: _convert_into(tmp, model, loaded, compute_type, progress), "CTranslate2 decoder",
                  folder=True)


def _convert_into(out: Path, model: nn.Module, loaded, compute_type: str, progress=None) -> None:
    """Save `model` as a Hugging Face checkpoint beside `out`, convert it into `out`, drop the checkpoint."""
    from ctranslate2.converters import TransformersConverter

    if progress:
        progress(f"converting {loaded.source} to CTranslate2 ({compute_type}) for the server")
    hf = out.with_name(f"{out.name}.hf-{os.getpid()}")
    try:
        model.save_pretrained(hf, safe_serialization=True)
        loaded.tokenizer.save_pretrained(hf)
        if loaded.feature_extractor is not None:
            loaded.feature_extractor.save_pretrained(hf)
        quant = None if compute_type == "float32" else "int8"
        TransformersConverter(str(hf)).convert(str(out), quantization=quant, force=True)
    finally:
        shutil.rmtree(hf, ignore_errors=True)


class CT2Whisper:
    """Greedy Whisper decoding from encoder states with CTranslate2."""

    def __init__(self, loaded, compute_type: str = "int8", threads: int = 0, workers: int = 1, progress=None):
        """threads: CPU threads per batch (0: CTranslate2's default); workers: batches run at once."""
        import ctranslate2

        self.path = convert(loaded, compute_type, progress)
        self.compute_type = compute_type
        self.model = ctranslate2.models.Whisper(str(self.path), device="cpu", compute_type=compute_type,
                                                intra_threads=threads, inter_threads=workers)
        tok = loaded.tokenizer
        self.prompt = list(tok.prefix_tokens)
        self.tokenizer = tok

    def generate(self, states: np.ndarray, max_new_tokens: int = 96, prev: list[int] | None = None) -> list[list[int]]:
        """states [B, 1500, d] float32 (or log-mel [B, 80, 3000]: CTranslate2 then runs the encoder)
        -> generated token ids per message (prompt and end token excluded). prev: previous-text
        ids (<|startofprev|> ...) put before the start tokens of every message in the batch
        (CTranslate2 needs <|startoftranscript|> at one position across a batch)."""
        import ctranslate2

        states = np.ascontiguousarray(states, dtype=np.float32)
        prompt = list(prev or []) + self.prompt
        res = self.model.generate(ctranslate2.StorageView.from_array(states), [prompt] * states.shape[0],
                                  beam_size=1, max_length=len(prompt) + max_new_tokens)
        return [list(r.sequences_ids[0]) for r in res]

    def transcribe(self, mel: np.ndarray, max_new_tokens: int = 96) -> list[str]:
        """Log-mel features [B, 80, 3000] -> transcripts (CTranslate2 runs the encoder too)."""
        return self.decode(self.generate(mel, max_new_tokens))

    def decode(self, ids: list[list[int]]) -> list[str]:
        """Texts of generated ids, runaway loops cut (semcom/loops.py)."""
        from semedge.semcom.loops import cut_loop

        return [cut_loop(t.strip()) for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


_ENGINES: dict = {}


def engine_for(loaded, compute_type: str = "int8", threads: int = 0) -> CT2Whisper:
    """One CT2Whisper per (model object, compute type, threads) in this process."""
    key = (id(loaded.model), compute_type, threads)
    if key not in _ENGINES:
        _ENGINES[key] = (loaded.model, CT2Whisper(loaded, compute_type, threads))  # the model is kept alive with its id
    return _ENGINES[key][1]
