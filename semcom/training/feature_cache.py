"""Encoder outputs over each utterance's content frames, cached on disk.

The encoder is frozen while the codec trains, so its output per utterance is computed
once and kept as fp16 safetensors under $XDG_CACHE_HOME/semedge/features/<source tag>-<weight
hash>/content-fit.safetensors, keyed by utterance id. The key is the model's source and
weight hash only (no code path), so caches written before this module existed still hit.
The file is verified by its sums (core.files) on every read; a damaged one is rebuilt with a warning.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from semedge.core.files import check_cache, sealed_path

CACHE_FILE = "content-fit.safetensors"  # fitted windows (the 30 s-window cache was content.safetensors)
SAVE_EVERY_BATCHES = 25  # write the cache now and then: the work survives an interrupt


def feature_cache_dir(loaded) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "semedge" / "features"
    tag = "".join(c if c.isalnum() or c in "-_." else "_" for c in loaded.source)[-40:]
    return root / f"{tag}-{loaded.weight_hash[:16]}"


def save_safetensors_atomic(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """Rewrite the cache file and its sums (a kill at any point leaves a matching pair)."""
    from safetensors.torch import save_file

    with sealed_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


@torch.no_grad()
def encode_content(loaded, audios: list[np.ndarray]) -> list[torch.Tensor]:
    """Whisper encoder outputs over each utterance's content frames, [n_i, d] fp32, each
    encoded on its fitted window as the device runs it (window_frames)."""
    from semedge.core.frames import content_frames, window_frames
    from semedge.semcom.split import whisper_front, whisper_layers

    enc = loaded.model.get_encoder()
    feats = loaded.feature_extractor([np.asarray(a, dtype=np.float32) for a in audios], sampling_rate=16000,
                                     return_tensors="pt").input_features  # [B, 80, 3000]
    return [whisper_layers(enc, whisper_front(enc, feats[i : i + 1, :, : window_frames(len(a))]))[0, : content_frames(len(a))].clone()
            for i, a in enumerate(audios)]


def _read_cache(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not check_cache(path, "encoder feature", adopt_unsealed=True):  # one from before sums: adopted if it loads
        return {}
    try:
        return load_file(str(path))
    except Exception:  # adopted unsealed but unreadable: rebuilt
        return {}


def cached_speech_features(loaded, utts, batch_size: int = 4, progress: bool = True) -> dict[str, torch.Tensor]:
    """{utterance id: content-frame encoder output [n, d] fp16}, computing and caching the missing ones."""
    path = feature_cache_dir(loaded) / CACHE_FILE
    have = _read_cache(path)
    todo = [u for u in utts if u.id not in have]
    if todo:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc="caching encoder outputs", unit="utt")
        for b in range(0, len(todo), batch_size):
            chunk = todo[b : b + batch_size]
            for u, h in zip(chunk, encode_content(loaded, [u.audio for u in chunk])):
                have[u.id] = h.half()
            if bar is not None:
                bar.update(len(chunk))
            if (b // batch_size) % SAVE_EVERY_BATCHES == SAVE_EVERY_BATCHES - 1:
                save_safetensors_atomic(have, path)
        if bar is not None:
            bar.close()
        save_safetensors_atomic(have, path, {"source": loaded.source, "weight_hash": loaded.weight_hash})
    return {u.id: have[u.id] for u in utts}
