"""Text: the device encodes token ids, the server decodes the received token features
(padding masked, no silence fill). Data: the speech corpus's sentences (tasks.corpus).

Models: BART, T5, Marian (one seq2seq model split at the link), and the text task's own
pair `minilm-whisper-base` (semcom/text_pair.py): all-MiniLM-L6-v2 on the device, Whisper's
decoder with LoRA on the server; its trained codec ships in semcom/assets/ (DEFAULT_CODEC)."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from semedge.semcom.tasks.base import ExportSpec, Task

_EXPORT = ExportSpec(
    inputs=("input_ids", "attention_mask"),
    dynamic_axes={"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
                  "symbols": {0: "batch", 1: "tokens"}},
    computes="the text encoder on (input_ids, attention_mask) [batch, tokens] + JSC encoder -> symbols [batch, tokens, k]",
)
# The shipped codec of the text task's own pair (minilm-whisper-base): codec + LoRA, a JSC checkpoint.
DEFAULT_CODEC = Path(__file__).resolve().parent.parent / "assets" / "minilm-whisper-base-jsc"
# Parity-check sentences of different lengths.
_CALIBRATION = ("the radio link carries only the symbols", "a short one",
                "semantic communication sends meaning rather than bits over a noisy channel", "hello")


@dataclass(frozen=True)
class TextTask(Task):
    name: str = "text"
    modality: str = "text"
    export: ExportSpec = _EXPORT
    fills_silence: bool = False
    features: frozenset = field(default=frozenset())

    def examples(self, split: str, n: int | None = None, **options) -> list[str]:
        """Sentences of the speech corpus's split (tasks.speech.sentences)."""
        from semedge.semcom.tasks.speech import sentences

        s = sentences(split)
        return s if n is None else s[:n]

    def make_device_half(self, encoder, jsc_encoder):
        from semedge.semcom.split import TextDeviceHalf

        return TextDeviceHalf(encoder, jsc_encoder)

    def device_encode(self, split, raw: Sequence, frames: str = "content", window: str = "fit") -> list:
        """One batch, padded; each message is its tokens."""
        enc = split.loaded.tokenizer(list(raw), return_tensors="pt", padding=True, truncation=True)
        x = split.device(enc["input_ids"], enc["attention_mask"])
        return [x[i][:n] for i, n in enumerate(enc["attention_mask"].sum(1).tolist())]

    def calibration_inputs(self, loaded, n: int = 2) -> dict:
        import numpy as np

        texts = [_CALIBRATION[i % len(_CALIBRATION)] for i in range(n)]
        enc = loaded.tokenizer(texts, return_tensors="np", padding=True)
        return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}

    def check_device_encoder(self, loaded, encoder) -> None:
        from semedge.core.errors import UserError

        if encoder is not None and encoder.tokenizer is not loaded.tokenizer:  # a pruned copy shares the tokenizer
            raise UserError("another model's encoder is supported for speech models only", "drop the encoder")

    def calibration_states(self, loaded, n: int):
        """Encoder output over the tokens of n training sentences, [N, d]."""
        enc = loaded.tokenizer(self.examples("train", n), return_tensors="pt", padding=True)
        h = loaded.model.get_encoder()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        return h[enc["attention_mask"].bool()]

    def write_frontend(self, loaded, root: Path) -> dict:
        """The fast tokenizer's files (the device tokenizes with the `tokenizers` library)."""
        from semedge.core.errors import UserError
        from semedge.core.layout import TEXT_TOKENIZER_FILES, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE

        with tempfile.TemporaryDirectory() as tmp:
            loaded.tokenizer.save_pretrained(tmp)
            if not (Path(tmp) / TOKENIZER_FILE).is_file():
                raise UserError(f"the tokenizer of {loaded.source} has no fast (tokenizer.json) form",
                                "use a model with a fast tokenizer; the device reads tokenizer.json with the `tokenizers` library")
            names = [n for n in TEXT_TOKENIZER_FILES if (Path(tmp) / n).is_file()]
            for n in names:
                shutil.copyfile(Path(tmp) / n, root / n)
        max_len = getattr(loaded.tokenizer, "model_max_length", None)
        pos = getattr(loaded.model.config, "max_position_embeddings", None)
        limits = [int(x) for x in (max_len, pos) if isinstance(x, int) and 0 < x < 1_000_000]
        return {"type": "tokenizer", "tokenizer": TOKENIZER_FILE,
                "tokenizer_config": TOKENIZER_CONFIG_FILE if TOKENIZER_CONFIG_FILE in names else None,
                "max_length": min(limits) if limits else None}

    def unsplit_ids(self, loaded, raw: Sequence, max_new_tokens: int):
        enc = loaded.tokenizer(list(raw), return_tensors="pt", padding=True, truncation=True)
        return loaded.model.generate(**enc, max_new_tokens=max_new_tokens, **self.generate_kwargs(loaded))

    def target_ids(self, loaded, text: str) -> list[int]:
        """The decoder's tokens for `text`: the pair's Whisper prefix + BPE + end; else the tokenizer's ids."""
        own = getattr(loaded.tokenizer, "target_ids", None)
        return own(text) if own is not None else list(loaded.tokenizer(text).input_ids)

    def prefix_length(self, loaded) -> int:
        from semedge.semcom.text_pair import PREFIX_TOKENS, is_pair

        return len(PREFIX_TOKENS) if is_pair(loaded) else 1


TEXT = TextTask()
