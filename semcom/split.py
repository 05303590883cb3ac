"""The model split at the radio link: DeviceHalf (ONNX-exportable) and ServerHalf.

What varies by task (device inputs, silence fill, generation settings) comes from the
task plug-in (`loaded.task`, semcom/tasks/). Speech (Whisper): the device encodes a log-mel
window and sends only the utterance's frames (`n_frames`, see core.frames.content_frames);
the server fills frames n..1500 with the encoder's output for silence, computed once from
silent audio (knowledge both ends share), then decodes. Text (BART, T5, Marian): the
device encodes the tokens; the server decodes from the received token features (masked).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import logging as hf_logging

from semedge.core.files import cached
from semedge.core.frames import ENC_FRAMES, SAMPLE_RATE
from semedge.semcom.jsc import JSCCodec, JSCConfig
from semedge.semcom.models import LoadedModel


def context_length(n: int, tail: int | None) -> int:
    """Encoder frames the decoder attends to for a message of n frames: the whole window
    (tail None), else the content plus `tail` silence frames, at least 2 x tail. The floor
    gives most messages the same length, so they batch together (ServerHalf groups by it)
    and a message decodes the same alone or in a batch."""
    if tail is None:
        return ENC_FRAMES
    return min(ENC_FRAMES, max(int(n) + tail, 2 * tail))

# generate() warns on every call about logits processors and pad == eos; our calls are
# deliberate (greedy, the model's own suppress lists), so keep the CLI output readable.
hf_logging.set_verbosity_error()


def whisper_front(enc: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """Whisper's encoder front end on log-mel [B, 80, T]: conv1, conv2, positions cut to T/2 -> [B, T/2, d]."""
    h = nn.functional.gelu(enc.conv1(feats))
    h = nn.functional.gelu(enc.conv2(h)).permute(0, 2, 1)
    return h + enc.embed_positions.weight[: h.shape[1]]


def whisper_layer_outputs(enc: nn.Module, h: torch.Tensor) -> list[torch.Tensor]:
    """Each of Whisper's encoder layers' outputs on [B, N, d] (before the final norm)."""
    outs = []
    for layer in enc.layers:
        h = layer(h, None, layer_head_mask=None)[0]
        outs.append(h)
    return outs


def whisper_layers(enc: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Whisper's encoder layers and final norm on [B, N, d]."""
    return enc.layer_norm(whisper_layer_outputs(enc, h)[-1])


class SpeechDeviceHalf(nn.Module):
    """input_features [B, 80, T] (T <= 3000, even) -> channel symbols [B, T/2, k].

    Whisper's encoder with its positions cut to the input: T = 3000 is exactly
    `encoder(input_features)`; a shorter window (core.frames.window_frames) runs
    the encoder on the utterance only, which is what makes short messages cheap.
    """

    def __init__(self, encoder: nn.Module, jsc_encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.jsc = jsc_encoder

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        return self.jsc(whisper_layers(self.encoder, whisper_front(self.encoder, input_features)))


class TextDeviceHalf(nn.Module):
    """(input_ids, attention_mask) [B, T] -> channel symbols [B, T, k]."""

    def __init__(self, encoder: nn.Module, jsc_encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.jsc = jsc_encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.jsc(h)


class ServerHalf(nn.Module):
    """JSC decoder + the model's decoder and generation. `silence` [1500, d]: the encoder's
    output for silence, given when the task fills it in (task.fills_silence), else None."""

    def __init__(self, loaded: LoadedModel, jsc_decoder: nn.Module, silence: torch.Tensor | None):
        super().__init__()
        self.loaded = loaded
        self.model = loaded.model
        self.jsc = jsc_decoder
        self.fills_silence = loaded.task.fills_silence
        if self.fills_silence != (silence is not None):
            raise ValueError(f"the {loaded.task.name} task {'needs' if self.fills_silence else 'takes no'} a silence encoding")
        if self.fills_silence:
            self.register_buffer("silence", silence)  # [1500, d]
        else:
            self.silence = None
        self.ct2 = None  # a semcom.ct2_backend.CT2Whisper when CTranslate2 decodes (set by the server)

    @property
    def backend(self) -> str:
        return "torch" if self.ct2 is None else f"ct2-{self.ct2.compute_type}"

    def encoder_states(self, messages: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Received symbols, one [n_i, k] tensor per message -> (states [B, N, d], mask [B, N])."""
        feats = [self.jsc(y.float()) for y in messages]
        if self.fills_silence:  # content + silence, to the window or to the trained tail
            end = self.context_frames([f.shape[0] for f in feats])  # equal within a group (generate)
            states = []
            for f in feats:
                n = min(f.shape[0], end)
                states.append(torch.cat([f[:n], self.silence[n:end]], 0))
            h = torch.stack(states)
            return h, torch.ones(h.shape[:2], dtype=torch.long)
        n_max = max(f.shape[0] for f in feats)
        h = torch.zeros(len(feats), n_max, feats[0].shape[-1])
        mask = torch.zeros(len(feats), n_max, dtype=torch.long)
        for i, f in enumerate(feats):
            h[i, : f.shape[0]] = f
            mask[i, : f.shape[0]] = 1
        return h, mask

    @property
    def tail(self) -> int | None:
        return getattr(getattr(self.jsc, "cfg", None), "tail_frames", None)

    def context_frames(self, lengths: list[int]) -> int:
        """Frames the decoder attends to for a batch of messages with these lengths."""
        return max(context_length(n, self.tail) for n in lengths)

    def _silence_cross_kv(self) -> list | None:
        """Each Whisper decoder layer's cross-attention K, V of the silence frames, computed
        once (every speech message ends in the same frames). None for other layouts."""
        try:
            attns = [layer.encoder_attn for layer in self.model.model.decoder.layers]
            key = tuple((id(a.k_proj), id(a.v_proj), getattr(getattr(a.k_proj, "weight", None), "_version", 0)) for a in attns)
        except AttributeError:
            return None
        if getattr(self, "_sil_key", None) != key:
            self._sil_kv = [(a.k_proj(self.silence), a.v_proj(self.silence)) for a in attns]
            self._sil_key = key
        return self._sil_kv

    def _speech_cache(self, feats: list[torch.Tensor], sil_kv: list):
        """A cross-attention cache filled from each message's frames plus the silence rows."""
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        cross = DynamicCache()
        cache = EncoderDecoderCache(DynamicCache(), cross)
        b = len(feats)
        for i, layer in enumerate(self.model.model.decoder.layers):
            a = layer.encoder_attn
            ks, vs = [], []
            for f in feats:
                n = min(f.shape[0], ENC_FRAMES)
                ks.append(torch.cat([a.k_proj(f[:n]), sil_kv[i][0][n:]], 0))
                vs.append(torch.cat([a.v_proj(f[:n]), sil_kv[i][1][n:]], 0))
            cross.update(torch.stack(ks).view(b, ENC_FRAMES, -1, a.head_dim).transpose(1, 2),
                         torch.stack(vs).view(b, ENC_FRAMES, -1, a.head_dim).transpose(1, 2), i)
            cache.is_updated[i] = True
        return cache

    def prompt_ids(self, text: str) -> list[int]:
        """Whisper's previous-text prompt: <|startofprev|> + the text's last tokens (at most half the
        decoder's context, as Whisper was trained); [] for empty text or a model without the token."""
        tok = self.loaded.tokenizer
        prev = tok.convert_tokens_to_ids("<|startofprev|>") if text and text.strip() else None
        if prev is None or prev == tok.unk_token_id:
            return []
        room = self.model.config.max_target_positions // 2 - 1
        return [prev] + tok.encode(" " + text.strip(), add_special_tokens=False)[-room:]

    @torch.no_grad()
    def generate(self, messages: list[torch.Tensor], max_new_tokens: int = 96, prompts: list[str] | None = None):
        """Token ids per message: a [B, L] tensor (torch backend) or lists of ids (CTranslate2).

        prompts: previous text per message ("" for none; semcom/memory.py), Whisper's
        <|startofprev|> prompt on both backends; messages with different prompts decode in
        separate groups. Silence-filled with a trained tail: messages whose contexts differ are
        decoded in separate groups too (then the torch backend returns a list of 1-D tensors)."""
        if prompts is None or not any(prompts):
            return self._generate(messages, max_new_tokens, [])
        if len(prompts) != len(messages):
            raise ValueError(f"{len(prompts)} prompts for {len(messages)} messages")
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(tuple(self.prompt_ids(p)), []).append(i)
        out: list = [None] * len(messages)
        for ids, idx in groups.items():
            res = self._generate([messages[i] for i in idx], max_new_tokens, list(ids))
            for j, i in enumerate(idx):
                out[i] = res[j]
        return out

    def _generate(self, messages: list[torch.Tensor], max_new_tokens: int, prompt: list[int]):
        """generate() for messages sharing one prompt (token ids, [] for none)."""
        if self.fills_silence and self.tail is not None and len(messages) > 1:
            groups: dict[int, list[int]] = {}
            for i, m in enumerate(messages):
                groups.setdefault(context_length(m.shape[0], self.tail), []).append(i)
            if len(groups) > 1:
                out: list = [None] * len(messages)
                for idx in groups.values():
                    ids = self._generate([messages[i] for i in idx], max_new_tokens, prompt)
                    for j, i in enumerate(idx):
                        out[i] = ids[j]
                return out
        if self.ct2 is not None:
            return self.ct2.generate(self.encoder_states(messages)[0].numpy(), max_new_tokens, prompt)
        kwargs = generate_kwargs(self.loaded)
        if prompt:
            kwargs["prompt_ids"] = torch.tensor(prompt)
        tail = getattr(getattr(self.jsc, "cfg", None), "tail_frames", None)
        sil_kv = self._silence_cross_kv() if self.fills_silence and tail is None else None
        if sil_kv is not None:  # silence-filled: cross K/V from the cache, the states only give the shape
            feats = [self.jsc(y.float()) for y in messages]
            h = self.silence.expand(len(feats), -1, -1)
            kwargs["past_key_values"] = self._speech_cache(feats, sil_kv)
        else:  # masked padding (text), or silence with a trained tail (a short context: no cache to gain)
            h, mask = self.encoder_states(messages)
            if not self.fills_silence:
                kwargs["attention_mask"] = mask
        return self.model.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=h), max_new_tokens=max_new_tokens, **kwargs
        )

    def transcribe(self, messages: list[torch.Tensor], max_new_tokens: int = 96,
                   prompts: list[str] | None = None) -> list[str]:
        """Transcripts; a speech model's runaway loops cut (semcom/loops.py; text models' output as generated)."""
        from semedge.semcom.loops import cut_loop

        ids = self.generate(messages, max_new_tokens, prompts)
        if self.ct2 is not None:
            return self.ct2.decode(ids)
        texts = [t.strip() for t in self.loaded.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        return [cut_loop(t) for t in texts] if self.fills_silence else texts


@dataclass
class SplitModel:
    loaded: LoadedModel
    codec: JSCCodec
    device: nn.Module
    server: ServerHalf
    device_model: LoadedModel | None = None  # whose encoder the device runs, when not `loaded`'s own

    @property
    def k(self) -> int:
        return self.codec.cfg.k

    @property
    def kind(self) -> str:
        return self.loaded.kind

    @property
    def task(self):
        return self.loaded.task


def generate_kwargs(loaded: LoadedModel) -> dict:
    """Greedy decoding with the task's settings (Whisper: English transcription without timestamps)."""
    return loaded.task.generate_kwargs(loaded)


def silence_features(loaded: LoadedModel) -> np.ndarray:
    """Log-mel features of one second of digital silence, padded to the 30 s window."""
    fe = loaded.feature_extractor
    return fe(np.zeros(SAMPLE_RATE, dtype=np.float32), sampling_rate=SAMPLE_RATE, return_tensors="np").input_features


@torch.no_grad()
def silence_encoding(loaded: LoadedModel) -> torch.Tensor:
    """The encoder's output for silence [1500, d]: computed once, known to both ends."""
    feats = torch.from_numpy(silence_features(loaded))
    return loaded.model.get_encoder()(feats).last_hidden_state[0]


@torch.no_grad()
def identity_codec(loaded: LoadedModel, n_calib: int = 16) -> JSCCodec:
    """Identity codec (k = d_model) standardised with per-dimension statistics of the
    encoder's output on the task's training inputs (task.calibration_states; cached per model weights)."""
    from safetensors.torch import load_file, save_file

    from semedge.semcom.tasks.speech import cache_dir

    codec = JSCCodec(JSCConfig(d_model=loaded.d_model, k=loaded.d_model, identity=True))
    path = cache_dir().parent / "stats" / f"{loaded.weight_hash[:16]}-{n_calib}.safetensors"

    def build(tmp):
        codec.set_stats(loaded.task.calibration_states(loaded, n_calib))
        save_file({"mean": codec.encoder.mean.contiguous(), "std": codec.encoder.std.contiguous()}, str(tmp))

    st = load_file(str(cached(path, build, "calibration statistics")))  # verified by its sums
    for m in (codec.encoder, codec.decoder):
        m.mean.copy_(st["mean"])
        m.std.copy_(st["std"])
    return codec


def build_split(loaded: LoadedModel, codec: JSCCodec | None = None, encoder: LoadedModel | None = None) -> SplitModel:
    """Split `loaded` around `codec` (the calibrated identity codec when None).

    `encoder`: another model whose encoder the device runs (a codec trained with
    `semedge train --encoder`, or a pruned / distilled copy of `loaded`); the server
    keeps `loaded`'s decoder and silence encoding.
    """
    from semedge.core.errors import UserError

    if codec is None:
        codec = identity_codec(loaded)
    if codec.cfg.d_model != loaded.d_model:
        raise UserError(
            f"the JSC codec expects d_model={codec.cfg.d_model} but {loaded.source} has d_model={loaded.d_model}",
            "use a codec trained for this model (semedge train --model ...)",
        )
    dev = encoder or loaded
    if codec.cfg.d_enc != dev.d_model:
        raise UserError(f"the JSC codec takes {codec.cfg.d_enc}-wide features but {dev.source}'s encoder gives {dev.d_model}",
                        "pass the encoder the codec was trained with (its manifest's device_encoder)")
    codec.eval()
    task = loaded.task
    if encoder is not None:
        task.check_device_encoder(loaded, encoder)
    device = task.make_device_half(dev.model.get_encoder(), codec.encoder)
    server = ServerHalf(loaded, codec.decoder, silence_encoding(loaded) if task.fills_silence else None)
    return SplitModel(loaded, codec, device.eval(), server.eval(), encoder)
