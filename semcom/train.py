"""Training the JSC codec (and optional LoRA / QLoRA adapters) through the noisy channel.

The loss is the large decoder's cross-entropy on the reference transcript (text
models: on the input text itself), computed on what the JSC decoder rebuilds
from the channel output, plus an optional feature MSE. Per batch the trainer
draws a channel (when several are given), one SNR per message (uniform in dB),
and, with rate training on, a kept-symbol count k' (the first k' of k symbols
are sent), so the leading symbols learn to carry the most.

Speech: the encoder is frozen unless LoRA targets it, so its outputs over the
content frames are computed once and cached (fp16 safetensors under
$XDG_CACHE_HOME/semedge/features). Whisper's decoder cross-attends to all 1500
frames; frames n..1500 are the shared silence encoding, whose cross-attention
keys/values are computed once per step and spliced in (exact, see
`whisper_cross_kv`), so a step costs the content frames only.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from semedge.semcom.errors import UserError

# ------------------------------------------------------------------ config


@dataclass
class LoRASpec:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = ("decoder.self_attn", "decoder.encoder_attn")  # module-name prefixes (see lora_target_modules)
    projections: tuple[str, ...] = ("q_proj", "v_proj")

    @classmethod
    def parse(cls, text: str) -> "LoRASpec":
        """'r=8,alpha=16,targets=decoder.encoder_attn+decoder.self_attn,proj=q_proj+v_proj'."""
        spec = cls()
        if not text or text.strip() in ("", "default"):
            return spec
        for part in text.split(","):
            if "=" not in part:
                raise UserError(f"--lora part {part!r} is not key=value",
                                "use e.g. --lora r=8,alpha=16,targets=decoder.encoder_attn+decoder.self_attn")
            key, val = (s.strip() for s in part.split("=", 1))
            try:
                if key == "r":
                    spec.r = int(val)
                elif key == "alpha":
                    spec.alpha = int(val)
                elif key == "dropout":
                    spec.dropout = float(val)
                elif key == "targets":
                    spec.targets = tuple(t for t in val.split("+") if t)
                elif key in ("proj", "projections"):
                    spec.projections = tuple(t for t in val.split("+") if t)
                else:
                    raise UserError(f"--lora key {key!r} is unknown", "keys: r, alpha, dropout, targets, proj")
            except ValueError as e:
                raise UserError(f"--lora {key}={val!r} is not a number", "give e.g. r=8") from e
        if spec.r < 1:
            raise UserError(f"LoRA rank r={spec.r} must be >= 1", "give e.g. r=8")
        for t in spec.targets:
            if t.split(".")[0] not in ("encoder", "decoder"):
                raise UserError(f"LoRA target {t!r} must start with encoder. or decoder.",
                                "e.g. targets=decoder.encoder_attn+decoder.self_attn+encoder.self_attn")
        return spec

    @property
    def touches_encoder(self) -> bool:
        return any(t.startswith("encoder") for t in self.targets)


@dataclass
class TrainConfig:
    model: str = "whisper-base"
    k: int = 64
    hidden: int = 1024
    channels: tuple[str, ...] = ("awgn",)
    snr_low: float = -5.0
    snr_high: float = 20.0
    steps: int = 600
    batch_size: int = 8
    lr: float = 1e-3
    lora_lr: float = 3e-4
    mse_warmup_steps: int = 100  # feature-MSE-only steps before the decoder loss (cheap warm start)
    feature_loss: float = 0.0  # weight of feature MSE added to the cross-entropy
    rate_min: int | None = None  # train random k' in [rate_min, k] (rate adaptation); None = off
    rate_prob: float = 0.5  # share of messages sent truncated when rate training is on
    lora: LoRASpec | None = None
    qlora: bool = False
    n_train: int = 400
    n_val: int = 20
    split: str = "train"
    seed: int = 0
    eval_every: int = 0  # steps between checkpoints/validation; 0 = only at the end

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["channels"] = list(self.channels)
        if self.lora is not None:
            d["lora"]["targets"] = list(self.lora.targets)
            d["lora"]["projections"] = list(self.lora.projections)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        if d.get("lora") is not None:
            lo = dict(d["lora"])
            lo["targets"] = tuple(lo.get("targets", ()))
            lo["projections"] = tuple(lo.get("projections", ()))
            d["lora"] = LoRASpec(**lo)
        d["channels"] = tuple(d.get("channels", ("awgn",)))
        allowed = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in allowed})

    def validate(self) -> None:
        if self.k < 1:
            raise UserError(f"--k {self.k} must be >= 1", "give e.g. --k 64")
        if self.snr_low > self.snr_high:
            raise UserError(f"--snr-range {self.snr_low} {self.snr_high}: low is above high", "give low then high, e.g. --snr-range -5 20")
        if self.steps < 0 or self.batch_size < 1:
            raise UserError("--steps must be >= 0 and --batch-size >= 1", "give e.g. --steps 600 --batch-size 8")
        if self.rate_min is not None and not 1 <= self.rate_min <= self.k:
            raise UserError(f"--rate-min {self.rate_min} must lie in [1, k={self.k}]", f"give e.g. --rate-min {max(1, self.k // 4)}")
        if self.qlora and self.lora is None:
            raise UserError("--qlora needs LoRA adapters to train", "add --lora r=8 (or drop --qlora)")


# ------------------------------------------------------------------ data


@dataclass
class Example:
    id: str
    h: torch.Tensor  # [n, d] encoder output over the content frames (fp16 cached, fp32 used)
    ids: list[int]  # full target sequence incl. prefix and end token
    text: str
    audio: np.ndarray | None = None  # kept when the encoder is trained


def feature_cache_dir(loaded) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "semedge" / "features"
    tag = "".join(c if c.isalnum() or c in "-_." else "_" for c in loaded.source)[-40:]
    return root / f"{tag}-{loaded.weight_hash[:16]}"


def _atomic_save_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@torch.no_grad()
def encode_content(loaded, audios: list[np.ndarray]) -> list[torch.Tensor]:
    """Whisper encoder outputs over each utterance's content frames, [n_i, d] fp32."""
    from semedge.semcom.system import content_frames

    feats = loaded.feature_extractor([np.asarray(a, dtype=np.float32) for a in audios], sampling_rate=16000,
                                     return_tensors="pt").input_features
    h = loaded.model.get_encoder()(feats).last_hidden_state
    return [h[i, : content_frames(len(a))].clone() for i, a in enumerate(audios)]


def cached_speech_features(loaded, utts, batch_size: int = 4, progress: bool = True) -> dict[str, torch.Tensor]:
    """{utterance id: content-frame encoder output [n, d] fp16}, computing and caching the missing ones."""
    from safetensors.torch import load_file

    d = feature_cache_dir(loaded)
    path = d / "content.safetensors"
    have: dict[str, torch.Tensor] = {}
    if path.exists():
        try:
            have = load_file(str(path))
        except Exception:  # a damaged cache is rebuilt
            have = {}
    todo = [u for u in utts if u.id not in have]
    if todo:
        it = range(0, len(todo), batch_size)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc="caching encoder outputs", unit="utt")
        for b in it:
            chunk = todo[b : b + batch_size]
            for u, h in zip(chunk, encode_content(loaded, [u.audio for u in chunk])):
                have[u.id] = h.half()
            if bar is not None:
                bar.update(len(chunk))
            if (b // batch_size) % 25 == 24:  # save now and then: the work survives an interrupt
                _atomic_save_safetensors(have, path)
        if bar is not None:
            bar.close()
        _atomic_save_safetensors(have, path, {"source": loaded.source, "weight_hash": loaded.weight_hash})
    return {u.id: have[u.id] for u in utts}


def target_ids(loaded, text: str) -> list[int]:
    """Token ids the decoder should produce, with the model's prefix and end tokens."""
    if loaded.kind == "speech":
        return list(loaded.tokenizer(" " + text.strip()).input_ids)
    return list(loaded.tokenizer(text).input_ids)


def speech_examples(loaded, split: str, n: int, keep_audio: bool = False, progress: bool = True) -> list[Example]:
    from semedge.semcom.tasks.speech import load_split

    utts = load_split(split, n=n, progress=progress)
    if not utts:
        raise UserError(f"the {split} split has no utterances", "check the speech corpus (semcom/tasks/speech.py)")
    feats = cached_speech_features(loaded, utts, progress=progress)
    return [Example(u.id, feats[u.id], target_ids(loaded, u.text), u.text, u.audio if keep_audio else None) for u in utts]


@torch.no_grad()
def text_examples(loaded, texts: list[str]) -> list[Example]:
    """Text models: encoder outputs of each text; the target is the text itself."""
    out = []
    enc = loaded.model.get_encoder()
    for i, t in enumerate(texts):
        ids = loaded.tokenizer(t, return_tensors="pt", truncation=True)
        h = enc(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state[0]
        out.append(Example(f"text-{i}", h.clone(), target_ids(loaded, t), t))
    return out


# ------------------------------------------------------------------ model pieces


def lora_target_modules(model, spec: LoRASpec) -> list[str]:
    """Full module names matching the spec: '<prefix>...<projection>' inside model.model.{encoder,decoder}."""
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) and type(mod).__name__ != "Linear4bit":
            continue
        parts = name.split(".")
        if parts[-1] not in spec.projections:
            continue
        inner = name.split("model.", 1)[-1] if name.startswith("model.") else name
        # inner: encoder.layers.3.self_attn.q_proj -> compare "encoder.self_attn"
        segs = inner.split(".")
        if len(segs) < 4 or segs[1] != "layers":
            continue
        short = f"{segs[0]}.{segs[3]}"
        if any(short == t or inner.startswith(t) for t in spec.targets):
            names.append(name)
    if not names:
        raise UserError(f"no LoRA target matched {list(spec.targets)} x {list(spec.projections)}",
                        "targets look like decoder.self_attn, decoder.encoder_attn, encoder.self_attn; proj q_proj+v_proj")
    return names


def quantize_nf4(model, prefixes: tuple[str, ...] = ("model.decoder", "model.encoder")) -> int:
    """Replace every nn.Linear under `prefixes` by a frozen bitsandbytes nf4 Linear4bit (fp32 compute). Returns the count."""
    import bitsandbytes as bnb

    count = 0
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            full = f"{name}.{cname}" if name else cname
            if not isinstance(child, nn.Linear) or not full.startswith(prefixes):
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=torch.float32, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            q = q.to("cpu")
            if not getattr(q.weight, "bnb_quantized", False):
                q.weight = q.weight._quantize("cpu") if hasattr(q.weight, "_quantize") else q.weight
            setattr(mod, cname, q)
            count += 1
    return count
