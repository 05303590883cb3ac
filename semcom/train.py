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

import copy
import dataclasses
import hashlib
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
from semedge.semcom.stats import fmt_ci

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

    @classmethod
    def from_dict(cls, lo: dict) -> "LoRASpec":
        """From the `lora` section of a checkpoint or package (dataclasses.asdict form)."""
        return cls(r=lo["r"], alpha=lo["alpha"], dropout=lo.get("dropout", 0.0),
                   targets=tuple(lo["targets"]), projections=tuple(lo["projections"]))

    @property
    def touches_encoder(self) -> bool:
        return any(t.startswith("encoder") for t in self.targets)


@dataclass
class TrainConfig:
    model: str = "whisper-base"
    encoder: str | None = None  # the device's encoder when it is another (smaller) model's, e.g. whisper-tiny.en
    k: int = 64
    hidden: int = 1024
    tail_frames: int | None = None  # speech: silence frames after the content the decoder sees (None: whole window)
    channels: tuple[str, ...] = ("awgn",)
    snr_low: float = -5.0
    snr_high: float = 20.0
    steps: int = 600
    batch_size: int = 8
    lr: float = 1e-3
    lora_lr: float = 3e-4
    mse_warmup_steps: int = 100  # feature-MSE-only steps before the decoder loss (cheap warm start)
    feature_loss: float = 0.0  # weight of feature MSE added to the decoder loss
    ce_weight: float = 1.0  # weight of the cross-entropy on the reference transcript
    kl_weight: float = 0.0  # weight of KL(unsplit teacher || codec) over the decoder's next-token distributions
    temperature: float = 1.0  # softmax temperature of the KL term
    data: str | None = None  # the user's audiofolder (tasks.audiofolder) instead of the built-in speech
    voices: str = "espeak"  # voice families: espeak, piper, flite, mix, a+b, or mix-a (the mix without a's sentences)
    augment: float = 0.0  # share of training utterances degraded by an augmentation chain (tasks.augment)
    rate_min: int | None = None  # train random k' in [rate_min, k] (rate adaptation); None = off
    rate_prob: float = 0.5  # share of messages sent truncated when rate training is on
    lora: LoRASpec | None = None
    qlora: bool = False
    n_train: int = 400
    n_val: int = 20
    split: str = "train"
    seed: int = 0
    eval_every: int = 0  # steps between checkpoints; 0 = only at the end
    max_minutes: float | None = None  # stop (and save) after this much training time

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
        if min(self.ce_weight, self.kl_weight, self.feature_loss) < 0 or not (self.ce_weight or self.kl_weight):
            raise UserError("--ce-weight and --kl-weight must be >= 0 and not both 0",
                            "give e.g. --kl-weight 1 --ce-weight 0.1 (the unsplit model as teacher)")
        if self.temperature <= 0:
            raise UserError(f"--temperature {self.temperature} must be > 0", "give e.g. --temperature 1")
        if not 0.0 <= self.augment <= 1.0:
            raise UserError(f"--augment {self.augment} must lie in [0, 1]", "give the share of augmented utterances, e.g. 0.5")

    def voice_family(self):
        """The `family` argument of tasks.speech.load_split for --voices."""
        return tuple(self.voices.split("+")) if "+" in self.voices else self.voices


# ------------------------------------------------------------------ data


@dataclass
class Example:
    id: str
    h: torch.Tensor  # [n, d] encoder output over the content frames (fp16 cached, fp32 used)
    ids: list[int]  # full target sequence incl. prefix and end token
    text: str
    audio: np.ndarray | None = None  # kept when the encoder is trained
    target: torch.Tensor | None = None  # [n, d_model] the server model's own encoder output, when h comes from another encoder


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
    """Whisper encoder outputs over each utterance's content frames, [n_i, d] fp32, each
    encoded on its fitted window as the device runs it (runtime.features.window_frames)."""
    from semedge.runtime.features import content_frames, window_frames
    from semedge.semcom.split import whisper_front, whisper_layers

    enc = loaded.model.get_encoder()
    feats = loaded.feature_extractor([np.asarray(a, dtype=np.float32) for a in audios], sampling_rate=16000,
                                     return_tensors="pt").input_features
    return [whisper_layers(enc, whisper_front(enc, feats[i : i + 1, :, : window_frames(len(a))]))[0, : content_frames(len(a))].clone()
            for i, a in enumerate(audios)]


def cached_speech_features(loaded, utts, batch_size: int = 4, progress: bool = True) -> dict[str, torch.Tensor]:
    """{utterance id: content-frame encoder output [n, d] fp16}, computing and caching the missing ones."""
    from safetensors.torch import load_file

    d = feature_cache_dir(loaded)
    path = d / "content-fit.safetensors"  # fitted windows (the 30 s-window cache was content.safetensors)
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


def speech_examples(loaded, split: str, n: int, keep_audio: bool = False, progress: bool = True,
                    encoder=None, family="espeak", augment: float = 0.0) -> list[Example]:
    """Cached encoder outputs + targets for the built-in speech data (`family` / `augment`: see
    tasks.speech.load_split)."""
    from semedge.semcom.tasks.speech import load_split

    drop = ()
    if isinstance(family, str) and family.startswith("mix-"):  # the mix less some families (leave-one-out)
        family, drop = "mix", tuple(family[4:].split("-"))
    kw = {} if family == "espeak" and not augment else {"family": family, "augment": augment or None}
    utts = [u for u in load_split(split, n=n, progress=progress, **kw) if u.family not in drop]
    if not utts:
        raise UserError(f"the {split} split has no utterances", "check the speech corpus (semcom/tasks/speech.py)")
    return utterance_examples(loaded, utts, keep_audio, progress, encoder)


def utterance_examples(loaded, utts, keep_audio: bool = False, progress: bool = True, encoder=None) -> list[Example]:
    """Examples for given utterances; with `encoder` (another LoadedModel), h is that encoder's
    output and `target` the server model's own."""
    feats = cached_speech_features(loaded, utts, progress=progress)
    if encoder is None:
        return [Example(u.id, feats[u.id], target_ids(loaded, u.text), u.text, u.audio if keep_audio else None) for u in utts]
    student = cached_speech_features(encoder, utts, progress=progress)
    return [Example(u.id, student[u.id], target_ids(loaded, u.text), u.text, u.audio if keep_audio else None,
                    target=feats[u.id]) for u in utts]


def folder_examples(loaded, directory, n_train: int, n_val: int, progress: bool = True, encoder=None):
    """(train, val) Examples from the user's audiofolder: every 10th row by hash of its id is
    validation (up to n_val); recordings over 30 s are left out (one window per example)."""
    from semedge.semcom.tasks.audiofolder import load_audiofolder
    from semedge.semcom.tasks.speech import SAMPLE_RATE

    utts = load_audiofolder(directory)
    short = [u for u in utts if len(u.audio) <= 30 * SAMPLE_RATE]
    if len(short) < len(utts) and progress:
        print(f"--data: {len(utts) - len(short)} recording(s) over 30 s left out of training", flush=True)
    is_val = [int(hashlib.sha1(u.id.encode()).hexdigest(), 16) % 10 == 0 for u in short]
    val = [u for u, v in zip(short, is_val) if v][:n_val]
    train = [u for u, v in zip(short, is_val) if not v or not n_val][:n_train]
    if not train:
        raise UserError(f"{directory} has no recording of 30 s or less to train on", "add shorter recordings (cut long ones)")
    return (utterance_examples(loaded, train, progress=progress, encoder=encoder),
            utterance_examples(loaded, val, progress=progress, encoder=encoder) if val else [])


def device_encoder_model(name: str, loaded):
    """The LoadedModel whose encoder the device runs instead of `loaded`'s (same front end)."""
    from semedge.semcom.models import load_model

    enc = load_model(name)
    if enc.kind != "speech" or loaded.kind != "speech":
        raise UserError(f"--encoder {name}: another model's encoder is supported for speech models only",
                        "drop --encoder")
    a, b = enc.model.config.num_mel_bins, loaded.model.config.num_mel_bins
    if a != b:
        raise UserError(f"--encoder {name} takes {a} mel bins but {loaded.source} takes {b}",
                        "choose an encoder with the same front end")
    return enc


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


def _is_whisper(model) -> bool:
    return getattr(model.config, "model_type", "") == "whisper"


def _proj(lin, x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
    """lin(x); for a peft LoRA layer with `base` = base_layer(x) precomputed, only the low-rank part is run."""
    if base is None or not hasattr(lin, "lora_A"):
        return lin(x) if base is None else base
    out = base
    for name in lin.active_adapters:
        if name in lin.lora_A:
            out = out + lin.lora_B[name](lin.lora_A[name](lin.lora_dropout[name](x))) * lin.scaling[name]
    return out


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b = t.shape[0]
    return t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)


def _kv(att, x: torch.Tensor, heads: int, base=None) -> tuple[torch.Tensor, torch.Tensor]:
    kb, vb = base if base is not None else (None, None)
    return _heads(_proj(att.k_proj, x, kb), heads), _heads(_proj(att.v_proj, x, vb), heads)


def whisper_cross_kv(model, head: torch.Tensor, silence: torch.Tensor, sil_base: list | None = None):
    """Cross-attention keys/values for states = [head (B, m, d) ; silence[m:]] in every decoder layer.

    k_proj / v_proj act per frame, so the silence part is projected once per step and
    shared by the batch; `sil_base` (frozen projections of the silence, per layer)
    leaves only LoRA's low-rank part to run. Returns an EncoderDecoderCache whose
    cross-attention part is filled.
    """
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    b, m, _ = head.shape
    heads = model.config.decoder_attention_heads
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    sil = silence[m:].unsqueeze(0)
    for i, layer in enumerate(model.model.decoder.layers):
        att = layer.encoder_attn
        kc, vc = _kv(att, head, heads)
        base = None if sil_base is None else tuple(t[:, m:] for t in sil_base[i])
        ks, vs = _kv(att, sil, heads, base)
        k = torch.cat([kc, ks.expand(b, -1, -1, -1)], 2)
        v = torch.cat([vc, vs.expand(b, -1, -1, -1)], 2)
        cache.cross_attention_cache.update(k, v, i)
        cache.is_updated[i] = True
    return cache


@torch.no_grad()
def frozen_silence_kv(model, silence: torch.Tensor) -> list:
    """Per decoder layer, the frozen (base) k/v projections of the silence [1, 1500, d]."""
    out = []
    for layer in model.model.decoder.layers:
        att = layer.encoder_attn
        out.append(tuple(getattr(lin, "base_layer", lin)(silence.unsqueeze(0)) for lin in (att.k_proj, att.v_proj)))
    return out


def decoder_logits(model, states: torch.Tensor, dec_in: torch.Tensor, enc_mask: torch.Tensor | None,
                   silence: torch.Tensor | None, sil_kv=None, fast: bool = True,
                   select: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [B, L, V] of the decoder on encoder states.

    Speech: `states` [B, m, d] are the first m frames (content, silence-filled past
    each message's end); frames m..1500 are `silence`. Text: states + enc_mask.
    """
    from transformers.modeling_outputs import BaseModelOutput

    if silence is None:
        out = model(encoder_outputs=BaseModelOutput(last_hidden_state=states), attention_mask=enc_mask,
                    decoder_input_ids=dec_in, use_cache=False)
        return out.logits
    if fast and _is_whisper(model):
        cache = whisper_cross_kv(model, states, silence, sil_kv)
        out = model.model.decoder(input_ids=dec_in, encoder_hidden_states=states[:, :1], past_key_values=cache,
                                  use_cache=True)
        hid = out.last_hidden_state
        return model.proj_out(hid[select] if select is not None else hid)
    b, m, _ = states.shape
    full = torch.cat([states, silence[m:].unsqueeze(0).expand(b, -1, -1)], 1)
    return model(encoder_outputs=BaseModelOutput(last_hidden_state=full), decoder_input_ids=dec_in, use_cache=False).logits


def collate(examples: list[Example], pad_id: int, prefix_len: int) -> dict:
    """Pad a batch: h [B, m, d], mask [B, m], decoder inputs / targets [B, L] (-100 = ignored)."""
    m = max(e.h.shape[0] for e in examples)
    d = examples[0].h.shape[-1]
    L = max(len(e.ids) for e in examples) - 1
    h = torch.zeros(len(examples), m, d)
    target = None
    if examples[0].target is not None:
        target = torch.zeros(len(examples), m, examples[0].target.shape[-1])
    mask = torch.zeros(len(examples), m, dtype=torch.bool)
    dec_in = torch.full((len(examples), L), pad_id, dtype=torch.long)
    tgt = torch.full((len(examples), L), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = e.h.shape[0]
        h[i, :n] = e.h.float()
        if target is not None:
            target[i, :n] = e.target.float()
        mask[i, :n] = True
        ids = torch.tensor(e.ids)
        dec_in[i, : len(ids) - 1] = ids[:-1]
        tgt[i, : len(ids) - 1] = ids[1:]
        tgt[i, : max(0, prefix_len - 1)] = -100  # the forced prefix (language, task, ...) is not learned
    out = {"h": h, "mask": mask, "dec_in": dec_in, "tgt": tgt}
    if target is not None:
        out["target"] = target
    return out


def prefix_length(loaded) -> int:
    """Forced tokens at the start of every target (Whisper: SOT, language, task, notimestamps)."""
    if loaded.kind != "speech":
        return 1
    ids = target_ids(loaded, "a")
    tail = len(loaded.tokenizer(" a", add_special_tokens=False).input_ids) + 1
    return len(ids) - tail


def channel_pass(codec, h: torch.Tensor, mask: torch.Tensor, channel, snr_db: torch.Tensor,
                 k_keep: torch.Tensor | None, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """h [B, m, d] -> (rebuilt features [B, m, d], symbols x [B, m, k]) through the JSC codec and the channel.

    k_keep [B] (or None): per-message kept symbols; the rest are not sent (zero at the receiver).
    """
    from semedge.semcom.jsc import normalize_power

    x = codec.encoder.proj((h - codec.encoder.mean) / codec.encoder.std)
    k = x.shape[-1]
    if k_keep is None:
        x = normalize_power(x)
        keep = None
    else:
        keep = (torch.arange(k).view(1, 1, k) < k_keep.view(-1, 1, 1)).to(x.dtype)
        x = x * keep
        x = x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / k_keep.view(-1, 1, 1).to(x.dtype) + 1e-8)
    x = x * mask.unsqueeze(-1).to(x.dtype)
    y = channel(x, snr_db, generator=generator)
    if keep is not None:
        y = y * keep
    return codec.decoder(y), x


# ------------------------------------------------------------------ trainer


@dataclass
class TrainResult:
    path: Path
    steps: int
    losses: list[float]
    seconds: float
    sec_per_step: float
    peak_rss_mb: float
    metrics: dict = field(default_factory=dict)


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _schedule(step: int, total: int, warm: int = 20) -> float:
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _opt_state(opt) -> dict[str, torch.Tensor]:
    out = {}
    for i, (p, st) in enumerate(((p, opt.state[p]) for g in opt.param_groups for p in g["params"])):
        for key, val in st.items():
            out[f"{i}.{key}"] = val if torch.is_tensor(val) else torch.tensor(val)
    return out


def _load_opt_state(opt, state: dict[str, torch.Tensor]) -> None:
    params = [p for g in opt.param_groups for p in g["params"]]
    for name, val in state.items():
        i, key = name.split(".", 1)
        opt.state[params[int(i)]][key] = val.clone()


class Trainer:
    """Holds the model copy, codec, data and optimizer for one `semedge train` run."""

    def __init__(self, cfg: TrainConfig, loaded=None, examples: list[Example] | None = None,
                 val_examples: list[Example] | None = None, progress: bool = True, encoder=None):
        from semedge.semcom.channels import make_channel
        from semedge.semcom.jsc import JSCCodec, JSCConfig

        cfg.validate()
        self.cfg = cfg
        self.progress = progress
        if loaded is None:
            from semedge.semcom.models import load_model

            loaded = load_model(cfg.model)
        self.loaded = loaded
        self.encoder = encoder or (device_encoder_model(cfg.encoder, loaded) if cfg.encoder else None)
        self.channels = [make_channel(c) for c in cfg.channels]
        if cfg.lora is not None and cfg.lora.touches_encoder:
            raise UserError("LoRA on the encoder is not supported by this trainer yet (encoder outputs are cached)",
                            "use targets on the decoder, e.g. targets=decoder.self_attn+decoder.encoder_attn")
        self.model = prepare_model(loaded, cfg.lora, cfg.qlora)
        if cfg.qlora:  # bitsandbytes repacks nf4 weights for inference-only kernels in eval mode on CPU
            for m in self.model.modules():
                if type(m).__name__ == "Linear4bit":
                    m.train()
        if examples is None:
            if loaded.kind != "speech":
                raise UserError(f"{loaded.source} is a text model: pass training texts", "train speech models from the CLI")
            if cfg.data:
                examples, val_examples = folder_examples(loaded, cfg.data, cfg.n_train, cfg.n_val, progress, self.encoder)
            else:
                examples = speech_examples(loaded, cfg.split, cfg.n_train, progress=progress, encoder=self.encoder,
                                           family=cfg.voice_family(), augment=cfg.augment)
        if val_examples is None and loaded.kind == "speech" and cfg.n_val:
            val_examples = speech_examples(loaded, "val", cfg.n_val, progress=progress, encoder=self.encoder,
                                           family=cfg.voice_family())
        self.examples, self.val_examples = examples, val_examples or []
        torch.manual_seed(cfg.seed)
        self.codec = JSCCodec(JSCConfig(d_model=loaded.d_model, k=cfg.k, hidden=cfg.hidden,
                                         tail_frames=cfg.tail_frames if loaded.kind == "speech" else None,
                                         d_in=None if self.encoder is None else self.encoder.d_model))
        calib = examples[:200]
        self.codec.set_stats(torch.cat([e.h.float() for e in calib], 0),
                             None if calib[0].target is None else torch.cat([e.target.float() for e in calib], 0))
        self.silence = None
        if loaded.kind == "speech":
            from semedge.semcom.split import silence_encoding

            self.silence = silence_encoding(loaded)
        self.sil_kv = frozen_silence_kv(self.model, self.silence) if self.silence is not None and _is_whisper(self.model) else None
        self.prefix_len = prefix_length(loaded)
        self.pad_id = loaded.model.config.pad_token_id if loaded.model.config.pad_token_id is not None else 0
        codec_params = [p for p in self.codec.parameters() if p.requires_grad]
        self.lora_params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": codec_params, "lr": cfg.lr, "base_lr": cfg.lr}]
        if self.lora_params:
            groups.append({"params": self.lora_params, "lr": cfg.lora_lr, "base_lr": cfg.lora_lr})
        self.opt = torch.optim.AdamW(groups, weight_decay=0.0)
        self.step = 0
        self.losses: list[float] = []

    # one optimisation step -------------------------------------------------
    def batch(self, step: int) -> tuple[dict, torch.Generator]:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        idx = torch.randint(len(self.examples), (min(self.cfg.batch_size, len(self.examples)),), generator=g).tolist()
        return collate([self.examples[i] for i in idx], self.pad_id, self.prefix_len), g

    def loss(self, b: dict, g: torch.Generator, mse_only: bool = False) -> torch.Tensor:
        from semedge.semcom.channels import sample_snr

        cfg = self.cfg
        n = b["h"].shape[0]
        ch = self.channels[int(torch.randint(len(self.channels), (1,), generator=g))]
        snr = sample_snr(n, cfg.snr_low, cfg.snr_high, generator=g)
        k_keep = None
        if cfg.rate_min is not None and cfg.rate_min < cfg.k:
            kk = torch.randint(cfg.rate_min, cfg.k + 1, (n,), generator=g)
            full = torch.rand(n, generator=g) >= cfg.rate_prob
            k_keep = torch.where(full, torch.full_like(kk, cfg.k), kk)
        h_hat, _ = channel_pass(self.codec, b["h"], b["mask"], ch, snr, k_keep, generator=g)
        m = b["mask"].unsqueeze(-1).float()
        ref = b.get("target", b["h"])  # what the decoder should rebuild
        std = self.codec.decoder.std
        mse = (((h_hat - ref) / std) ** 2 * m).sum() / (m.sum() * ref.shape[-1])
        if mse_only:
            return mse
        sel = b["tgt"] != -100
        logits = self._logits(self.model, h_hat, b, sel)
        loss = cfg.feature_loss * mse if cfg.feature_loss else 0.0
        if cfg.ce_weight:
            loss = loss + cfg.ce_weight * nn.functional.cross_entropy(logits, b["tgt"][sel])
        if cfg.kl_weight:
            with torch.no_grad():  # the unsplit model on the same audio: what the codec should deliver
                teacher = self._logits(self.loaded.model, ref, b, sel)
            t = cfg.temperature
            kl = nn.functional.kl_div(nn.functional.log_softmax(logits / t, -1), nn.functional.log_softmax(teacher / t, -1),
                                      log_target=True, reduction="batchmean")
            loss = loss + cfg.kl_weight * t * t * kl
        return loss

    def _logits(self, model, h: torch.Tensor, b: dict, sel: torch.Tensor) -> torch.Tensor:
        """Decoder logits [N, V] at the scored positions `sel`, for features h [B, m, d] (silence-filled past each message)."""
        if self.silence is None:
            logits = decoder_logits(model, h, b["dec_in"], b["mask"].long(), None)
            return logits[sel]
        states = torch.where(b["mask"].unsqueeze(-1), h, self.silence[: h.shape[1]].unsqueeze(0))
        sil, sil_kv = self.silence, self.sil_kv
        if self.cfg.tail_frames is not None:  # the context the server will decode with (the batch's longest)
            from semedge.semcom.split import context_length

            end = context_length(states.shape[1], self.cfg.tail_frames)
            sil = sil[:end]
            sil_kv = None if sil_kv is None else [tuple(t[:, :end] for t in kv) for kv in sil_kv]
        return decoder_logits(model, states, b["dec_in"], None, sil, sil_kv, select=sel)

    def train_step(self, step: int) -> float:
        cfg = self.cfg
        mse_only = step < cfg.mse_warmup_steps
        self.codec.train()
        for grp in self.opt.param_groups:
            grp["lr"] = grp["base_lr"] * _schedule(step, cfg.steps)
        b, g = self.batch(step)
        loss = self.loss(b, g, mse_only=mse_only)
        if not torch.isfinite(loss):
            return float("nan")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for grp in self.opt.param_groups for p in grp["params"]]
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if not torch.isfinite(gn):
            return float("nan")
        self.opt.step()
        return loss.item()

    # checkpoints -----------------------------------------------------------
    def info(self, metrics: dict | None = None) -> dict:
        cfg = self.cfg
        return {
            "channels": list(cfg.channels), "snr_range_db": [cfg.snr_low, cfg.snr_high],
            "data": {"task": "speech" if self.loaded.kind == "speech" else "text", "split": cfg.split,
                     "n_train": len(self.examples), "n_val": len(self.val_examples)},
            "seed": cfg.seed, "step": self.step,
            "lora": None if cfg.lora is None else dataclasses.asdict(cfg.lora), "qlora": cfg.qlora,
            "rate_training": None if cfg.rate_min is None else {"rate_min": cfg.rate_min, "rate_prob": cfg.rate_prob},
            "train_config": cfg.to_dict(),
            "device_encoder": None if self.encoder is None else {
                "source": self.encoder.source, "weight_hash": self.encoder.weight_hash, "d_model": self.encoder.d_model},
            "loss_last": self.losses[-1] if self.losses else None,
            "metrics": metrics or {},
        }

    def save(self, path, metrics: dict | None = None, with_trainer: bool = True, dtype: str = "float32",
             extra: dict | None = None) -> Path:
        from semedge.semcom.checkpoint import save_checkpoint

        state = None
        if with_trainer:
            state = _opt_state(self.opt)
            state["__step"] = torch.tensor(self.step)
            state["__losses"] = torch.tensor(self.losses or [0.0], dtype=torch.float64)
        adapters = adapter_state(self.model) if self.lora_params else None
        info = self.info(metrics)
        info.update(extra or {})
        return save_checkpoint(path, self.loaded, self.codec, adapters=adapters, trainer_state=state, info=info, dtype=dtype)

    def resume(self, path) -> bool:
        """Continue from a checkpoint folder written by the same configuration. False if there is none."""
        from safetensors.torch import load_file

        from semedge.semcom.checkpoint import TRAINER_FILE, load_checkpoint, read_manifest

        path = Path(path)
        if not (path / "manifest.json").exists():
            return False
        man = read_manifest(path)
        old = TrainConfig.from_dict(man.get("train_config", {})).to_dict()
        new = self.cfg.to_dict()
        diff = [k for k in new if k not in ("steps", "eval_every", "max_minutes") and old.get(k) != new.get(k)]
        if diff:
            raise UserError(f"{path} was trained with different settings ({', '.join(diff)})",
                            "use a new --out folder, or the same settings to resume")
        ck = load_checkpoint(path, self.loaded, k=self.cfg.k)
        self.codec.load_state_dict(ck.codec.state_dict())
        if ck.adapters:
            load_adapter_state(self.model, ck.adapters)
        if (path / TRAINER_FILE).exists():
            st = load_file(str(path / TRAINER_FILE))
            self.step = int(st.pop("__step"))
            self.losses = [float(x) for x in st.pop("__losses")][: self.step]
            _load_opt_state(self.opt, st)
        else:
            self.step = int(man.get("step", 0))
        return True

    # the loop --------------------------------------------------------------
    def fit(self, out=None, log=print) -> TrainResult:
        cfg = self.cfg
        start = self.step
        t0 = time.perf_counter()
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
        last_good = None
        timed = []
        for step in range(start, cfg.steps):
            ts = time.perf_counter()
            loss = self.train_step(step)
            if not math.isfinite(loss):
                if bar is not None:
                    bar.close()
                where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written"
                raise UserError(f"training loss became NaN/inf at step {step} ({where})",
                                "lower --lr (e.g. by 3x) and resume with --resume, or narrow --snr-range")
            if step >= cfg.mse_warmup_steps:
                timed.append(time.perf_counter() - ts)
            self.losses.append(loss)
            self.step = step + 1
            if bar is not None:
                bar.set_postfix(loss=f"{np.mean(self.losses[-20:]):.3f}", phase="mse" if step < cfg.mse_warmup_steps else "ce")
                bar.update(1)
            if out is not None and cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                last_good = self.save(out)
            if cfg.max_minutes is not None and time.perf_counter() - t0 > 60 * cfg.max_minutes:
                log(f"time limit of {cfg.max_minutes:g} min reached at step {self.step}/{cfg.steps}; saving")
                break
        if bar is not None:
            bar.close()
        secs = time.perf_counter() - t0
        path = self.save(out) if out is not None else None
        return TrainResult(path, self.step, self.losses, secs, float(np.mean(timed)) if timed else float("nan"), peak_rss_mb())

    def receiver(self):
        """(LoadedModel with the trained adapters, codec) for evaluation."""
        self.codec.eval()
        return dataclasses.replace(self.loaded, model=self.model), self.codec


# ------------------------------------------------------------------ evaluation on cached features


@torch.no_grad()
def transmit_examples(loaded, codec, examples: list[Example], channel: str, snr_db: float, k_keep: int | None = None,
                      seed: int = 0, batch_size: int = 8, max_new_tokens: int = 96, silence=None,
                      backend: str = "torch") -> tuple[list[str], list[int]]:
    """Send each example's encoder output through codec + channel; return (hypotheses, real symbols sent per message).

    Equal to `system.run_link` on the same audio except that the encoder output
    comes from the cache (fp16-rounded). backend: "torch", or "ct2" / "ct2-float32"
    (the server's CTranslate2 decoder, int8 by default).
    """
    from semedge.semcom.channels import make_channel
    from semedge.semcom.split import ServerHalf, silence_encoding

    if silence is None and loaded.kind == "speech":
        silence = silence_encoding(loaded)
    server = ServerHalf(loaded, codec.decoder, silence).eval()
    if backend.startswith("ct2"):
        from semedge.semcom.ct2_backend import engine_for

        server.ct2 = engine_for(loaded, "float32" if backend == "ct2-float32" else "int8")
    elif backend != "torch":
        raise UserError(f"backend {backend!r} is unknown", "use torch, ct2 or ct2-float32")
    ch = make_channel(channel)
    gen = torch.Generator().manual_seed(seed)
    hyps, sent = [], []
    for b in range(0, len(examples), batch_size):
        msgs = []
        for e in examples[b : b + batch_size]:
            x = codec.encoder(e.h.float().unsqueeze(0), k_keep=k_keep)[0]
            if k_keep is not None:
                x = x[:, :k_keep]
            msgs.append(x)
        rx = [ch(m.unsqueeze(0), snr_db, generator=gen)[0] for m in msgs]
        hyps += server.transcribe(rx, max_new_tokens=max_new_tokens)
        sent += [m.numel() for m in msgs]
    return hyps, sent


def validate(tr: "Trainer", snrs=(10.0,), channel: str = "awgn") -> dict:
    """WER of the trained receiver on the validation examples, clean and at each SNR."""
    from semedge.semcom.metrics import wer

    loaded, codec = tr.receiver()
    refs = [e.text for e in tr.val_examples]
    out = {"n": len(refs), "channel": channel}
    for s in [math.inf, *snrs]:
        hyps, _ = transmit_examples(loaded, codec, tr.val_examples, channel if math.isfinite(s) else "none", s,
                                    seed=tr.cfg.seed, silence=tr.silence)
        out["wer_clean" if not math.isfinite(s) else f"wer_{s:g}dB"] = round(wer(refs, hyps), 4)
    return out


def measure_rate_table(loaded, codec, examples: list[Example], snrs, candidates, channel: str = "awgn",
                       seed: int = 0, silence=None, progress: bool = True, backend: str = "torch") -> dict[float, dict[int, float]]:
    """WER for each SNR x kept-symbol count k' (the data `rate.fit_policy` fits)."""
    from semedge.semcom.metrics import wer

    refs = [e.text for e in examples]
    table: dict[float, dict[int, float]] = {}
    grid = [(float(s), int(kk)) for s in snrs for kk in candidates]
    it = grid
    if progress:
        from tqdm import tqdm

        it = tqdm(grid, desc="rate table", unit="point")
    for s, kk in it:
        hyps, _ = transmit_examples(loaded, codec, examples, channel, s, k_keep=None if kk >= codec.cfg.k else kk,
                                    seed=seed, silence=silence, backend=backend)
        table.setdefault(s, {})[kk] = wer(refs, hyps)
    return table


def write_json(obj, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float) + "\n")
    os.replace(tmp, path)


def score_row(refs, hyps, with_similarity: bool = True, normalizer: str = "whisper", keep_errors: bool = False) -> dict:
    """WER, BLEU (and similarity) with their bootstrap 95% intervals (`wer_ci95` ...), the
    normaliser's name, the median per-utterance WER and the runaway rate. keep_errors adds
    `word_errors` (per-utterance [errors, words]) for paired comparisons (semcom.stats)."""
    from semedge.semcom import metrics

    s = metrics.score(refs, hyps, with_similarity, normalizer, keep_errors=True)
    per = [e / max(w, 1) for e, w in s["word_errors"]]
    out = {"wer": s["wer"], "bleu": s["bleu"], "wer_ci95": s["wer_ci95"], "bleu_ci95": s["bleu_ci95"],
           "normalizer": s["normalizer"],
           "wer_median": float(np.median(per)) if per else float("nan"),
           "runaway_rate": float(np.mean([w > 1.0 for w in per])) if per else float("nan")}  # share of utterances with WER > 1 (repetition loops)
    if with_similarity:
        out.update(similarity=s["similarity"], similarity_ci95=s["similarity_ci95"])
    if keep_errors:
        out["word_errors"] = s["word_errors"]
    return out


def eval_codec(base, jsc: str):
    """(receiver, codec, Checkpoint | None) to evaluate: a trained codec, or with jsc='identity'
    the calibrated identity codec (the unsplit model's features, standardised)."""
    from semedge.semcom.checkpoint import load_for_inference
    from semedge.semcom.split import identity_codec

    rx, ck = load_for_inference(base, jsc)
    if ck is not None:
        return rx, ck.codec, ck
    if jsc != "identity":
        raise UserError(f"no JSC codec to evaluate for {base.source} (--jsc {jsc})",
                        "pass --jsc CKPT (a folder semedge train wrote), or --jsc identity for unsplit features")
    return rx, identity_codec(base), None


def _k_sent(ck, codec, k, snr_db: float) -> int:
    """Symbols per token sent at this SNR: the codec's k, a given k' <= k, or the rate policy's ('auto')."""
    from semedge.semcom.rate import choose_k

    kmax = codec.cfg.k
    if k == "auto" and ck is not None:
        return choose_k(ck, snr_db)
    kk = kmax if k in (None, "auto") else int(k)
    if codec.cfg.identity and kk != kmax:
        raise UserError(f"--k {kk}: the identity codec sends all {kmax} features per token", "drop --k")
    if not 1 <= kk <= kmax:
        raise UserError(f"--k {kk} is outside [1, {kmax}] for this codec", f"give 1..{kmax} or auto")
    return kk


def data_examples(loaded, utts, encoder=None, max_s: float = 30.0, progress: bool = True):
    """(examples, groups, max_new_tokens) for the user's utterances: a recording longer than `max_s`
    is cut at quiet points (runtime.segment) and each segment is its own example (message);
    groups[i] lists utterance i's segments. Encoder outputs come from the feature cache."""
    from semedge.runtime.segment import new_tokens_for, segment_bounds

    segs, groups = [], []
    for u in utts:
        bounds = segment_bounds(u.audio, max_s)
        groups.append(list(range(len(segs), len(segs) + len(bounds))))
        segs += [u if len(bounds) == 1 else dataclasses.replace(u, id=f"{u.id}@{a}-{b}", audio=u.audio[a:b])
                 for a, b in bounds]
    feats = cached_speech_features(encoder or loaded, segs, progress=progress)
    examples = [Example(s.id, feats[s.id], [], "") for s in segs]
    return examples, groups, new_tokens_for(max(len(s.audio) for s in segs) / 16000)


def join_segments(groups, hyps: list[str], sent: list[int]) -> tuple[list[str], list[int]]:
    """Per utterance: its segments' transcripts joined, and the channel uses (complex symbols) of all of them."""
    from semedge.runtime.segment import join_texts

    return ([join_texts(hyps[j] for j in g) for g in groups],
            [sum((sent[j] + 1) // 2 for j in g) for g in groups])


def evaluate_system(model: str, jsc: str, channels, snrs, k=None, n: int = 200, split: str = "test", seed: int = 0,
                    with_similarity: bool = True, progress: bool = True, system: str | None = None,
                    backend: str = "torch", data=None, max_segment_s: float | None = None) -> list[dict]:
    """Rows {system, channel, snr_db, k_sent, wer, bleu, similarity, channel_uses, n} for a JSC checkpoint
    (or jsc='identity': the unsplit model's features); each figure has its 95% interval beside it
    (`wer_ci95` ..., see score_row) and the row names its text normaliser.

    `k`: None (the codec's k), an int k' <= k, or 'auto' (the checkpoint's rate policy per SNR).
    `data`: Utterances to measure on (e.g. semcom.tasks.audiofolder.load_audiofolder) instead of
    the first `n` of the built-in `split`; recordings longer than `max_segment_s` (default:
    runtime.segment.default_segment_s) are sent as several messages and their transcripts
    joined (rows then carry `segments` and `segment_s`).
    Encoder outputs come from the feature cache (fp16-rounded), the rest runs as on the link.
    """
    from semedge.semcom.channel_spec import parse_snr
    from semedge.semcom.checkpoint import device_encoder
    from semedge.semcom.models import load_model
    from semedge.semcom.split import silence_encoding

    base = load_model(model)
    rx, codec, ck = eval_codec(base, jsc)
    if data is None:
        examples = speech_examples(base, split, n, progress=progress, encoder=device_encoder(ck))
        groups, refs, tokens = [[i] for i in range(len(examples))], [e.text for e in examples], 96
    else:
        from semedge.runtime.segment import default_segment_s

        max_segment_s = max_segment_s or default_segment_s(codec.cfg.identity)
        examples, groups, tokens = data_examples(base, data, device_encoder(ck), max_segment_s, progress)
        refs = [u.text for u in data]
    silence = silence_encoding(base)
    name = system or ("identity" if codec.cfg.identity else
                      f"jsc-k{codec.cfg.k}" + ("-auto" if k == "auto" else f"-k{k}" if k else ""))
    rows = []
    for ch in channels:
        for s in map(parse_snr, snrs):
            kk = _k_sent(ck, codec, k, s)
            hyps, sent = transmit_examples(rx, codec, examples, ch, s, k_keep=None if kk == codec.cfg.k else kk,
                                           seed=seed, silence=silence, backend=backend, max_new_tokens=tokens)
            hyps, uses = join_segments(groups, hyps, sent)
            row = {"system": name, "channel": ch, "snr_db": s, "k_sent": kk, "n": len(refs),
                   "channel_uses": float(np.mean(uses)), **score_row(refs, hyps, with_similarity)}
            if data is not None:
                row.update(segments=len(examples), segment_s=max_segment_s)
            rows.append(row)
            if progress:
                print(f"  {name} {ch} {s:g} dB: WER {fmt_ci(row['wer_ci95'])}  uses {row['channel_uses']:.0f}", flush=True)
    return rows


def ci_yerr(rows: list[dict], m: str) -> np.ndarray:
    """(2, len(rows)) distances from each row's `m` to the ends of its 95% interval (0 without one)."""
    out = []
    for r in rows:
        lo, hi = (r.get(f"{m}_ci95") or {}).get("ci95", (r[m], r[m]))
        out.append((max(0.0, r[m] - lo), max(0.0, hi - r[m])))
    return np.array(out, dtype=np.float64).reshape(-1, 2).T


def plot_results(rows: list[dict], path, metrics_to_plot=("wer", "bleu", "similarity")) -> None:
    """One panel per metric vs SNR, one line per (system, channel), 95% error bars. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mets = [m for m in metrics_to_plot if any(m in r for r in rows)]
    fig, axes = plt.subplots(1, len(mets), figsize=(5 * len(mets), 4), squeeze=False)
    series: dict[tuple, list] = {}
    for r in rows:
        series.setdefault((r["system"], r["channel"]), []).append(r)
    for ax, m in zip(axes[0], mets):
        for (sysname, ch), rs in sorted(series.items()):
            rs = sorted((r for r in rs if m in r and math.isfinite(r["snr_db"])), key=lambda r: r["snr_db"])
            if rs:
                ax.errorbar([r["snr_db"] for r in rs], [r[m] for r in rs], yerr=ci_yerr(rs, m), marker="o",
                            capsize=3, linestyle="-" if ch == "awgn" else "--", label=f"{sysname} / {ch}")
        ax.set_xlabel("SNR (dB)")
        ax.set_ylabel(m.upper() if m != "similarity" else "similarity")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def fit_rate_policy(tr: "Trainer", snrs, candidates=None, channel: str = "awgn", tolerance: float = 0.02):
    """Measure WER per SNR x k' on the validation examples and fit the rate policy (see semcom.rate)."""
    from semedge.semcom.rate import fit_policy

    if not tr.val_examples:
        raise UserError("--fit-rate needs validation utterances", "give --n-val 16 or more")
    k = tr.cfg.k
    if candidates is None:
        lo = tr.cfg.rate_min or k
        candidates = sorted({kk for kk in (lo, k // 4, k // 2, k) if lo <= kk <= k})
    loaded, codec = tr.receiver()
    table = measure_rate_table(loaded, codec, tr.val_examples, snrs, candidates, channel, seed=tr.cfg.seed,
                               silence=tr.silence, progress=tr.progress)
    return fit_policy(k, table, tolerance)
