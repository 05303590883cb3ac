"""Train the text task's codec through the channel: JSC codec + LoRA on Whisper's decoder.

The model is the MiniLM-Whisper pair (semcom/text_pair.py). MiniLM is frozen, so its token
features are computed once per sentence and cached (keyed by the weights and the sentences).
Each step:

    feats [B, T, 384] (one batch of sentences of equal MiniLM length T: no padding reaches the
    decoder, which has no cross-attention mask) -> JSC encoder -> symbols [B, T, k]
    -> one channel for the batch (drawn from `channels`), one SNR per sentence uniform in
       [snr_low, snr_high] dB (channels.sample_snr) -> JSC decoder -> [B, T, 384]
    -> Whisper decoder with LoRA, teacher-forced on Whisper's prefix + BPE(sentence) + <|endoftext|>
    loss = cross-entropy over the sentence's tokens and <|endoftext|>
           + aux x MSE(standardised JSC output, standardised MiniLM features)

Adam; warm-up + cosine over `steps`, or over `max_minutes` when that ends the run first.
Data: `tasks.corpus.sentences("train")` (test and val are disjoint from it by construction:
splits hash the normalised text). The result is a
JSC checkpoint (semcom.checkpoint: codec + LoRA adapters + manifest) that `load_for_inference`,
`semedge export`, `semedge serve` and `semedge transmit --task text` read as they read speech codecs.

    python -m semedge.semcom.text_codec --out runs/text-jsc --k 64 --max-minutes 40
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from semedge.core.errors import UserError
from semedge.semcom.jsc import JSCCodec, JSCConfig, init_pca
from semedge.semcom.training.config import LoRASpec

DEFAULT_LORA = LoRASpec(r=16, alpha=32, targets=("decoder.self_attn", "decoder.encoder_attn"),
                        projections=("q_proj", "k_proj", "v_proj", "out_proj"))
TASK = "text"


@dataclass(frozen=True)
class TextTrainConfig:
    source: str = "minilm-whisper-base"
    k: int = 64  # real symbols per MiniLM token
    hidden: int = 512  # JSC decoder MLP width
    lora: LoRASpec = field(default_factory=lambda: dataclasses.replace(DEFAULT_LORA))
    steps: int = 2000  # the schedule's length; training stops earlier at max_minutes
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 50
    aux: float = 0.1  # weight of the feature MSE
    channels: tuple[str, ...] = ("awgn", "rayleigh")
    snr_low: float = -5.0
    snr_high: float = 20.0
    n_train: int | None = None  # first n training sentences (None: all)
    n_val: int = 64  # validation sentences for the loss reported at the end
    seed: int = 0
    max_minutes: float | None = None

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise UserError(f"steps={self.steps}, batch_size={self.batch_size}: both must be >= 1",
                            "e.g. --steps 2000 --batch-size 32")
        if not self.snr_low <= self.snr_high:
            raise UserError(f"SNR range [{self.snr_low}, {self.snr_high}] is empty", "give --snr-low <= --snr-high")


# ----------------------------------------------------------------------------- data


def sentences(split: str, n: int | None = None) -> list[str]:
    """The corpus split (tasks.corpus: train / val / test, disjoint by normalised text)."""
    from semedge.semcom.tasks.corpus import sentences as corpus

    s = corpus(split)
    return s if n is None else s[:n]


@torch.no_grad()
def token_features(loaded, texts: list[str], batch_size: int = 64) -> list[torch.Tensor]:
    """MiniLM's token features [n_i, d] (fp16) of each sentence, cached on disk by weights + texts."""
    from safetensors.torch import load_file, save_file

    from semedge.core.files import cached, sha256_bytes
    from semedge.semcom.ct2 import cache_root

    key = sha256_bytes(loaded.weight_hash + "\n" + "\n".join(texts))[:24]
    path = cache_root() / "text-features" / f"{key}.safetensors"

    def build(tmp):
        feats = _encode(loaded, texts, batch_size)
        save_file({"feats": torch.cat(feats).half().contiguous(),
                   "lengths": torch.tensor([len(f) for f in feats], dtype=torch.int64)}, str(tmp))

    st = load_file(str(cached(path, build, "MiniLM token features")))
    return list(torch.split(st["feats"], st["lengths"].tolist()))


def _encode(loaded, texts: list[str], batch_size: int) -> list[torch.Tensor]:
    enc_model, out = loaded.model.get_encoder(), []
    for b in range(0, len(texts), batch_size):
        enc = loaded.tokenizer(texts[b : b + batch_size], return_tensors="pt", padding=True, truncation=True)
        h = enc_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        out += [h[i, :n] for i, n in enumerate(enc["attention_mask"].sum(1).tolist())]
    return out


def length_batches(lengths: list[int], batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of sentence indices, each of one token length (at most batch_size)."""
    by_len: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_len.setdefault(int(n), []).append(i)
    batches = []
    for idx in by_len.values():
        idx = rng.permutation(idx)
        batches += [idx[s : s + batch_size] for s in range(0, len(idx), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def targets(loaded, texts: list[str]) -> list[list[int]]:
    return [loaded.tokenizer.target_ids(t) for t in texts]


def _pad_targets(rows: list[list[int]], eot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoder inputs [B, L-1], labels [B, L-1] with -100 on the forced prefix and the padding)."""
    from semedge.semcom.text_pair import PREFIX_TOKENS

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), eot, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, len(PREFIX_TOKENS) : len(r)] = torch.tensor(r[len(PREFIX_TOKENS):])
    return ids[:, :-1], labels[:, 1:]


# ----------------------------------------------------------------------------- model


def new_codec(feats: list[torch.Tensor], k: int, hidden: int) -> JSCCodec:
    """A JSC codec (skip path) standardised on and PCA-started from training features."""
    h = torch.cat(feats).float()
    codec = JSCCodec(JSCConfig(d_model=h.shape[-1], k=k, hidden=hidden, skip=True))
    codec.set_stats(h)
    init_pca(codec, h)
    return codec


def batch_loss(model, codec, feats, ids, labels, channel, snr, aux: float, gen=None) -> tuple[torch.Tensor, float]:
    """(loss, cross-entropy) of one equal-length batch: feats [B, T, d], ids/labels [B, L], snr [B]."""
    x = codec.encoder(feats)  # [B, T, k]
    y = codec.decoder(channel(x, snr, generator=gen))  # [B, T, d]
    logits = model.logits(ids, y)  # [B, L, vocab]
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    std = codec.decoder.std
    mse = ((y - feats) / std).pow(2).mean()
    return ce + aux * mse, float(ce.detach())


# ----------------------------------------------------------------------------- training


@dataclass
class TextTrainResult:
    codec: JSCCodec
    model: torch.nn.Module  # the pair with LoRA (unmerged)
    losses: list[float]  # training loss per step (cross-entropy + aux x feature MSE)
    ce: list[float]  # its cross-entropy part
    val: dict  # channel -> cross-entropy on the validation sentences at 10 dB, after training
    val_start: dict  # the same before training
    seconds: float
    steps_done: int

    def summary(self) -> dict:
        n = max(1, min(50, len(self.losses) // 4))
        first, last = (lambda v: float(np.mean(v[:n]))), (lambda v: float(np.mean(v[-n:])))
        return {"loss_first": first(self.losses), "loss_last": last(self.losses), "ce_first": first(self.ce), "ce_last": last(self.ce),
                "steps_done": self.steps_done, "train_seconds": round(self.seconds, 1),
                "sec_per_step": round(self.seconds / max(1, self.steps_done), 3), "val_ce_10db": self.val,
                "val_ce_10db_before": self.val_start}


class _Data:
    """One split's MiniLM features, lengths and target ids."""

    def __init__(self, loaded, texts: list[str]):
        self.texts = texts
        self.feats = token_features(loaded, texts)
        self.targets = targets(loaded, texts)
        self.eot = loaded.model.eot

    def batch(self, idx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, labels = _pad_targets([self.targets[i] for i in idx], self.eot)
        return torch.stack([self.feats[i] for i in idx]).float(), ids, labels


def train_text_codec(cfg: TextTrainConfig, log=None) -> TextTrainResult:
    """Train a fresh codec + LoRA for cfg.steps (or until cfg.max_minutes); returns them in eval mode."""
    from semedge.semcom.channels import make_channel, sample_snr
    from semedge.semcom.models import load_source
    from semedge.semcom.training.adapters import prepare_model
    from semedge.semcom.training.schedule import warmup_cosine

    log = log or (lambda s: None)
    torch.manual_seed(cfg.seed)
    loaded = load_source(cfg.source)
    data = _Data(loaded, sentences("train", cfg.n_train))
    model, codec = prepare_model(loaded, cfg.lora, False), new_codec(data.feats, cfg.k, cfg.hidden)
    params = [p for p in model.parameters() if p.requires_grad] + list(codec.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr)
    layers = [make_channel(c) for c in cfg.channels]
    val_start = validate(loaded, model, codec.eval(), cfg, layers)
    rng, gen = np.random.default_rng(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    batches, losses, ces, t0 = [], [], [], time.perf_counter()
    codec.train()
    for step in range(cfg.steps):
        if cfg.max_minutes is not None and time.perf_counter() - t0 > 60 * cfg.max_minutes:
            log(f"time box: {cfg.max_minutes:g} min reached after {step} steps")
            break
        batches = batches or length_batches([len(f) for f in data.feats], cfg.batch_size, rng)
        feats, ids, labels = data.batch(batches.pop())
        for g in opt.param_groups:
            g["lr"] = cfg.lr * warmup_cosine(_progress(step, cfg, time.perf_counter() - t0), cfg.steps, cfg.warmup, 0.05)
        ch = layers[int(rng.integers(len(layers)))]
        loss, ce = batch_loss(model, codec, feats, ids, labels, ch, sample_snr(len(ids), cfg.snr_low, cfg.snr_high, gen), cfg.aux, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        ces.append(ce)
        if step % 25 == 0:
            log(f"step {step}  loss {np.mean(losses[-25:]):.3f}  ce {np.mean(ces[-25:]):.3f}  {time.perf_counter() - t0:.0f} s")
    seconds = time.perf_counter() - t0
    codec.eval()
    val = validate(loaded, model, codec, cfg, layers)
    return TextTrainResult(codec, model, losses, ces, val, val_start, seconds, len(losses))


def _progress(step: int, cfg: TextTrainConfig, seconds: float) -> int:
    """The schedule's step: `step`, or further when the time box will end the run first (so the
    learning rate anneals either way; a time-boxed run then depends on the machine's speed)."""
    if cfg.max_minutes is None:
        return step
    return max(step, int(cfg.steps * seconds / (60 * cfg.max_minutes)))


@torch.no_grad()
def validate(loaded, model, codec, cfg: TextTrainConfig, layers, snr_db: float = 10.0) -> dict:
    """Cross-entropy on the first n_val validation sentences at `snr_db`, per channel."""
    data = _Data(loaded, sentences("val", cfg.n_val))
    out = {}
    for ch in layers:
        gen, tot, n = torch.Generator().manual_seed(cfg.seed), 0.0, 0
        for idx in length_batches([len(f) for f in data.feats], cfg.batch_size, np.random.default_rng(0)):
            feats, ids, labels = data.batch(idx)
            _, ce = batch_loss(model, codec, feats, ids, labels, ch, snr_db, 0.0, gen)
            tot, n = tot + ce * len(idx), n + len(idx)
        out[ch.spec.kind] = round(tot / n, 4)
    return out


# ----------------------------------------------------------------------------- the checkpoint


def save_text_codec(out, cfg: TextTrainConfig, result: TextTrainResult, command: str, dtype: str = "float16"):
    """A JSC checkpoint (semcom.checkpoint) with the LoRA adapters and a manifest naming the command,
    the licences, the data split and the measured losses."""
    from semedge.semcom.checkpoint import save_checkpoint
    from semedge.semcom.models import load_source
    from semedge.semcom.text_pair import LICENCES
    from semedge.semcom.training.adapters import adapter_state

    loaded = load_source(cfg.source)
    info = {"task": TASK, "command": command, "lora": dataclasses.asdict(cfg.lora), "qlora": False,
            "licences": LICENCES, "train": config_dict(cfg), "metrics": result.summary(),
            "channels": list(cfg.channels), "snr_range_db": [cfg.snr_low, cfg.snr_high],
            "data": {"train": "tasks.corpus.sentences('train')" + ("" if cfg.n_train is None else f"[:{cfg.n_train}]"),
                     "val": f"sentences('val')[:{cfg.n_val}] (validation loss)",
                     "test": "sentences('test'): never seen in training; the splits hash the normalised text (disjoint)"},
            "channel_uses_per_token": cfg.k / 2}
    return save_checkpoint(out, loaded, result.codec, adapters=adapter_state(result.model), info=info, dtype=dtype)


def config_dict(cfg: TextTrainConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["channels"] = list(cfg.channels)
    return d


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Train the text task's JSC codec + Whisper-decoder LoRA through the channel")
    ap.add_argument("--out", required=True, help="checkpoint folder to write")
    ap.add_argument("--source", default=TextTrainConfig.source, help="minilm-whisper-base, or tiny:minilm-whisper (tests)")
    ap.add_argument("--k", type=int, default=TextTrainConfig.k)
    ap.add_argument("--hidden", type=int, default=TextTrainConfig.hidden)
    ap.add_argument("--lora", default="r=16,alpha=32,targets=decoder.self_attn+decoder.encoder_attn,proj=q_proj+k_proj+v_proj+out_proj")
    ap.add_argument("--steps", type=int, default=TextTrainConfig.steps)
    ap.add_argument("--batch-size", type=int, default=TextTrainConfig.batch_size)
    ap.add_argument("--lr", type=float, default=TextTrainConfig.lr)
    ap.add_argument("--snr-low", type=float, default=TextTrainConfig.snr_low)
    ap.add_argument("--snr-high", type=float, default=TextTrainConfig.snr_high)
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--max-minutes", type=float, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = TextTrainConfig(source=a.source, k=a.k, hidden=a.hidden, lora=LoRASpec.parse(a.lora), steps=a.steps,
                          batch_size=a.batch_size, lr=a.lr, snr_low=a.snr_low, snr_high=a.snr_high, n_train=a.n_train,
                          max_minutes=a.max_minutes, seed=a.seed)
    res = train_text_codec(cfg, log=lambda s: print(s, flush=True))
    command = "python -m semedge.semcom.text_codec " + " ".join(sys.argv[1:] if argv is None else argv)
    path = save_text_codec(a.out, cfg, res, command)
    print(f"wrote {path}: {res.summary()}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
