"""The differentiable link the trainer runs: codec -> channel -> decoder logits.

Whisper's decoder cross-attends to all 1500 encoder frames; frames m..1500 are the shared
silence encoding. k_proj / v_proj act per frame, so the silence part of every layer's
cross-attention keys/values is projected once per step and spliced in after the content
frames' (`whisper_cross_kv`; exact), and a step costs the content frames only.
"""

from __future__ import annotations

import torch


def is_whisper(model) -> bool:
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
    """[B, T, d] -> [B, heads, T, d / heads]."""
    b = t.shape[0]
    return t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)


def _kv(att, x: torch.Tensor, heads: int, base=None) -> tuple[torch.Tensor, torch.Tensor]:
    kb, vb = base if base is not None else (None, None)
    return _heads(_proj(att.k_proj, x, kb), heads), _heads(_proj(att.v_proj, x, vb), heads)


def whisper_cross_kv(model, head: torch.Tensor, silence: torch.Tensor, sil_base: list | None = None):
    """Cross-attention keys/values for states = [head (B, m, d) ; silence[m:]] in every decoder layer.

    The silence part is projected once per step and shared by the batch; `sil_base`
    (frozen projections of the silence, per layer) leaves only LoRA's low-rank part to
    run. Returns an EncoderDecoderCache whose cross-attention part is filled.
    """
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    b, m, _ = head.shape
    heads = model.config.decoder_attention_heads
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    sil = silence[m:].unsqueeze(0)  # [1, N - m, d]
    for i, layer in enumerate(model.model.decoder.layers):
        att = layer.encoder_attn
        kc, vc = _kv(att, head, heads)
        base = None if sil_base is None else tuple(t[:, m:] for t in sil_base[i])
        ks, vs = _kv(att, sil, heads, base)
        k = torch.cat([kc, ks.expand(b, -1, -1, -1)], 2)  # [B, heads, N, d / heads]
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
    """Logits [B, L, V] of the decoder on encoder states ([N, V] at `select` on the fast path).

    Speech: `states` [B, m, d] are the first m frames (content, silence-filled past
    each message's end); frames m..1500 are `silence`. Text: states + enc_mask.
    """
    from transformers.modeling_outputs import BaseModelOutput

    if silence is None:
        out = model(encoder_outputs=BaseModelOutput(last_hidden_state=states), attention_mask=enc_mask,
                    decoder_input_ids=dec_in, use_cache=False)
        return out.logits
    if fast and is_whisper(model):
        cache = whisper_cross_kv(model, states, silence, sil_kv)
        out = model.model.decoder(input_ids=dec_in, encoder_hidden_states=states[:, :1], past_key_values=cache,
                                  use_cache=True)
        hid = out.last_hidden_state
        return model.proj_out(hid[select] if select is not None else hid)
    b, m, _ = states.shape
    full = torch.cat([states, silence[m:].unsqueeze(0).expand(b, -1, -1)], 1)
    return model(encoder_outputs=BaseModelOutput(last_hidden_state=full), decoder_input_ids=dec_in, use_cache=False).logits


def channel_pass(codec, h: torch.Tensor, mask: torch.Tensor, channel, snr_db: torch.Tensor,
                 k_keep: torch.Tensor | None, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """h [B, m, d] -> (rebuilt features [B, m, d], symbols x [B, m, k]) through the JSC codec and the channel.

    k_keep [B] (or None): per-message kept symbols; the rest are not sent (zero at the receiver).
    """
    from semedge.semcom.jsc import normalize_power

    x = codec.encoder.proj((h - codec.encoder.mean) / codec.encoder.std)
    k = x.shape[-1]
    per_message = codec.cfg.power == "message"
    if k_keep is None and not per_message:
        x = normalize_power(x)
        keep = None
    else:
        kk = torch.full((x.shape[0],), k, device=x.device) if k_keep is None else k_keep
        keep = (torch.arange(k).view(1, 1, k) < kk.view(-1, 1, 1)).to(x.dtype)
        x = x * keep * mask.unsqueeze(-1).to(x.dtype)
        if per_message:  # one scale over the message's real tokens and kept symbols
            n = mask.sum(1).to(x.dtype).clamp_min(1) * kk.to(x.dtype)
            x = x * torch.rsqrt(x.pow(2).sum((1, 2)) / n + 1e-8).view(-1, 1, 1)
        else:
            x = x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / kk.view(-1, 1, 1).to(x.dtype) + 1e-8)
    x = x * mask.unsqueeze(-1).to(x.dtype)
    y = channel(x, snr_db, generator=generator)
    if keep is not None:
        y = y * keep
    return codec.decoder(y), x
