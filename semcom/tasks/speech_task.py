"""Speech transcription (Whisper): the built-in task. Its data lives in tasks/speech.py.

Device: 16 kHz audio -> log-mel [B, 80, frames] -> Whisper's encoder on a window fitted
to the utterance -> JSC encoder; only the utterance's frames (core.frames.content_frames)
are sent. Server: frames past the message are the encoder's output for silence
(`fills_silence`), then Whisper decodes English without timestamps. Metric: WER.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from semedge.core.frames import ENC_FRAMES, SAMPLE_RATE
from semedge.semcom.tasks.base import ExportSpec, Task

_EXPORT = ExportSpec(
    inputs=("input_features",),
    # frames: the device runs its encoder on a window fitted to the utterance
    dynamic_axes={"input_features": {0: "batch", 2: "frames"}, "symbols": {0: "batch", 1: "tokens"}},
    computes="Whisper's encoder on log-mel [batch, 80, frames<=3000] + JSC encoder -> symbols [batch, frames/2, k]",
)


def _np_audio(raw: Sequence) -> list:
    import numpy as np

    return [np.asarray(a, dtype=np.float32) for a in raw]


def speech_frontend(loaded) -> tuple[dict, "object"]:
    """(frontend dict, mel filterbank [n_mels, n_fft//2+1] float32) from the Whisper feature extractor."""
    import numpy as np

    from semedge.core.layout import MEL_FILTERS_FILE

    fe = loaded.feature_extractor
    fb = np.ascontiguousarray(np.asarray(fe.mel_filters, dtype=np.float32).T)  # [80, 201]
    n_frames = fe.n_samples // fe.hop_length
    front = {
        "type": "whisper-log-mel",
        "sample_rate": int(fe.sampling_rate),
        "n_fft": int(fe.n_fft),
        "hop_length": int(fe.hop_length),
        "n_mels": int(fb.shape[0]),
        "chunk_seconds": int(fe.chunk_length),
        "n_samples": int(fe.n_samples),
        "n_frames": int(n_frames),
        "samples_per_frame": int(2 * fe.hop_length),  # one encoder frame = 2 mel frames (conv stride 2)
        "max_frames": int(n_frames // 2),
        "mel_filters": MEL_FILTERS_FILE,
        "mel_filters_shape": list(fb.shape),
        "window": "fit",  # the encoder runs on the utterance + 0.4 s (core.frames.window_frames)
    }
    return front, fb


@dataclass(frozen=True)
class SpeechTask(Task):
    name: str = "speech"
    modality: str = "audio"
    export: ExportSpec = _EXPORT
    fills_silence: bool = True
    features: frozenset = field(default=frozenset({"link-eval", "train", "distill", "baseline", "other-encoder", "federated"}))

    def examples(self, split: str, n: int | None = None, **options) -> list:
        """Utterances (tasks.speech.load_split: audio, text, voice, ...)."""
        from semedge.semcom.tasks.speech import load_split

        return load_split(split, n, **options)

    def make_device_half(self, encoder, jsc_encoder):
        from semedge.semcom.split import SpeechDeviceHalf

        return SpeechDeviceHalf(encoder, jsc_encoder)

    def device_encode(self, split, raw: Sequence, frames: str = "content", window: str = "fit") -> list:
        """Each utterance's encoder runs on its own window (core.frames.window_frames: "fit" =
        the utterance + 0.4 s, as the device runtime does; "full" = 30 s). frames="all": all 1500 sent."""
        from semedge.core.frames import window_frames
        from semedge.semcom.system import content_frames

        audio = _np_audio(raw)
        feats = split.loaded.feature_extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        if frames == "all":
            window = "full"
        out = []
        for i, a in enumerate(audio):
            n = ENC_FRAMES if frames == "all" else content_frames(len(a))
            out.append(split.device(feats[i : i + 1, :, : window_frames(len(a), window)])[0][:n])
        return out

    def calibration_inputs(self, loaded, n: int = 2) -> dict:
        """Log-mel of tones + noise of different lengths."""
        import numpy as np

        rng = np.random.default_rng(0)
        audios = []
        for i in range(n):
            t = np.arange(int(16000 * (1.5 + 2.0 * i))) / 16000
            a = 0.3 * np.sin(2 * np.pi * (220 + 110 * i) * t * (1 + t)) + 0.05 * rng.standard_normal(t.size)
            audios.append(a.astype(np.float32))
        feats = loaded.feature_extractor(audios, sampling_rate=16000, return_tensors="np").input_features
        return {"input_features": feats.astype(np.float32)}

    def calibration_states(self, loaded, n: int):
        """Encoder output over the content frames of n training utterances, [N, d]."""
        import torch

        from semedge.semcom.system import content_frames
        from semedge.semcom.tasks.speech import load_split

        utts = load_split("train", n, progress=False)
        feats = loaded.feature_extractor([u.audio for u in utts], sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        h = loaded.model.get_encoder()(feats).last_hidden_state
        return torch.cat([h[i, : content_frames(len(u.audio))] for i, u in enumerate(utts)])

    def write_frontend(self, loaded, root: Path) -> dict:
        """mel_filters.npy and frontend.json (the device computes the log-mel itself)."""
        import numpy as np

        from semedge.core.layout import FRONTEND_FILE, MEL_FILTERS_FILE

        front, fb = speech_frontend(loaded)
        with open(root / MEL_FILTERS_FILE, "wb") as f:
            np.save(f, fb, allow_pickle=False)
        (root / FRONTEND_FILE).write_text(json.dumps(front, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return front

    def generate_kwargs(self, loaded) -> dict:
        """Greedy; English transcription without timestamps."""
        kw = {"do_sample": False, "num_beams": 1}
        if getattr(loaded.model.generation_config, "is_multilingual", False):
            kw.update(language="en", task="transcribe")
        kw["return_timestamps"] = False
        return kw

    def unsplit_ids(self, loaded, raw: Sequence, max_new_tokens: int):
        feats = loaded.feature_extractor(_np_audio(raw), sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        return loaded.model.generate(input_features=feats, max_new_tokens=max_new_tokens, **self.generate_kwargs(loaded))

    def max_message_tokens(self, loaded, cap: int) -> int:
        return ENC_FRAMES  # the encoder's window

    def target_ids(self, loaded, text: str) -> list[int]:
        """Decoder targets: Whisper's prefix tokens, " " + text, end token."""
        return list(loaded.tokenizer(" " + text.strip()).input_ids)

    def prefix_length(self, loaded) -> int:
        """Forced tokens at the start of every target (SOT, language, task, notimestamps)."""
        ids = self.target_ids(loaded, "a")
        return len(ids) - (len(loaded.tokenizer(" a", add_special_tokens=False).input_ids) + 1)


SPEECH = SpeechTask()
