"""What a training run is: TrainConfig, and LoRASpec (the adapters, parsed from `--lora`).

Plain data without torch, so the CLI reads its defaults from here at start-up.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from semedge.core.errors import UserError

_LORA_EXAMPLE = "use e.g. --lora r=8,alpha=16,targets=decoder.encoder_attn+decoder.self_attn"


@dataclass
class LoRASpec:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = ("decoder.self_attn", "decoder.encoder_attn")  # module-name prefixes (adapters.lora_target_modules)
    projections: tuple[str, ...] = ("q_proj", "v_proj")

    @classmethod
    def parse(cls, text: str) -> "LoRASpec":
        """'r=8,alpha=16,targets=decoder.encoder_attn+decoder.self_attn,proj=q_proj+v_proj'."""
        spec = cls()
        if not text or text.strip() in ("", "default"):
            return spec
        for part in text.split(","):
            if "=" not in part:
                raise UserError(f"--lora part {part!r} is not key=value", _LORA_EXAMPLE)
            key, val = (s.strip() for s in part.split("=", 1))
            spec._set(key, val)
        spec._check()
        return spec

    def _set(self, key: str, val: str) -> None:
        """One `key=value` of --lora."""
        try:
            if key == "r":
                self.r = int(val)
            elif key == "alpha":
                self.alpha = int(val)
            elif key == "dropout":
                self.dropout = float(val)
            elif key == "targets":
                self.targets = tuple(t for t in val.split("+") if t)
            elif key in ("proj", "projections"):
                self.projections = tuple(t for t in val.split("+") if t)
            else:
                raise UserError(f"--lora key {key!r} is unknown", "keys: r, alpha, dropout, targets, proj")
        except ValueError as e:
            raise UserError(f"--lora {key}={val!r} is not a number", "give e.g. r=8") from e

    def _check(self) -> None:
        if self.r < 1:
            raise UserError(f"LoRA rank r={self.r} must be >= 1", "give e.g. r=8")
        for t in self.targets:
            if t.split(".")[0] not in ("encoder", "decoder"):
                raise UserError(f"LoRA target {t!r} must start with encoder. or decoder.",
                                "e.g. targets=decoder.encoder_attn+decoder.self_attn+encoder.self_attn")

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
    """One `semedge train` run; the CLI's defaults are these."""

    model: str = "whisper-base"
    encoder: str | None = None  # the device's encoder when it is another (smaller) model's, e.g. whisper-tiny.en
    k: int = 64
    hidden: int = 1024
    init: str = "random"  # codec start: random, or pca (linear PCA code + skip path; decoder MLP at zero)
    power: str = "token"  # power normalisation of the sent symbols: per token or per message (semcom.jsc)
    tail_frames: int | None = None  # speech: silence frames after the content the decoder sees (None: whole window)
    channels: tuple[str, ...] = ("awgn",)
    snr_low: float = -5.0
    snr_high: float = 20.0
    steps: int = 400
    batch_size: int = 8
    lr: float = 1e-3
    lora_lr: float = 3e-4
    mse_warmup_steps: int = 150  # feature-MSE-only steps before the decoder loss (cheap warm start)
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
    n_train: int = 240
    n_val: int = 16
    split: str = "train"
    seed: int = 0
    save_every: int = 50  # steps between checkpoints while training (0: only at the end)
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
        if "eval_every" in d and "save_every" not in d:  # written before the field had its true name
            d["save_every"] = d["eval_every"]
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
        if self.init not in ("random", "pca"):
            raise UserError(f"--init {self.init!r} is not a codec start", "give --init random or --init pca")
        if self.power not in ("token", "message"):
            raise UserError(f"--power {self.power!r} is not a power normalisation", "give --power token or --power message")
        if self.temperature <= 0:
            raise UserError(f"--temperature {self.temperature} must be > 0", "give e.g. --temperature 1")
        if not 0.0 <= self.augment <= 1.0:
            raise UserError(f"--augment {self.augment} must lie in [0, 1]", "give the share of augmented utterances, e.g. 0.5")

    def voice_family(self):
        """The `family` argument of tasks.speech.load_split for --voices."""
        return tuple(self.voices.split("+")) if "+" in self.voices else self.voices
