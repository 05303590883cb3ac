"""Model loading: built-ins (CTranslate2 packages), local checkpoints, hub ids, tiny test models.

`load_model(source)` is memoised per source and returns the same object on
each call: copy it (`copy.deepcopy(loaded.model)`) before changing weights.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from semedge.semcom import ct2
from semedge.core.errors import UserError
from semedge.core.files import cached

BUILTIN_NAMES = tuple(ct2.BUILTINS)  # speech models (compress.task_subjects reads them so)
PAIR_SOURCE = "minilm-whisper-base"  # the text task's pair (semcom/text_pair.py)
_NAMED = (*BUILTIN_NAMES, PAIR_SOURCE)  # every source known by name, for the error messages
TINY_ARCHS = ("whisper", "bart", "t5", "marian")  # Hugging Face encoder-decoders (tests run each one's forward)
TINY_PAIR = "minilm-whisper"  # tiny:minilm-whisper, the text pair's random-init twin (semcom/text_pair.py)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_URL = "https://huggingface.co/api/models"
_PROBE_TIMEOUT_S = 2.0

_cache: dict[str, "LoadedModel"] = {}
_lock = threading.RLock()  # re-entrant: the text pair loads whisper-base inside its own load


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel, eval, fp32
    kind: str  # "speech" | "text"
    source: str
    weight_hash: str  # sha256 hex of the weight bytes
    tokenizer: Any
    feature_extractor: Any  # WhisperFeatureExtractor for speech, None for text
    d_model: int

    @property
    def task(self):
        """The task plug-in for this model's kind (semcom.tasks.registry): what varies by task."""
        from semedge.semcom.tasks.registry import get_task

        return get_task(self.kind)


def load_model(source: str) -> LoadedModel:
    """Load `source`: a built-in name, a local HF checkpoint directory, or a hub id."""
    if not isinstance(source, str) or not source.strip():
        raise UserError(f"model source {source!r} is empty", f"use one of the built-ins ({', '.join(_NAMED)}) or a local path")
    source = source.strip()
    key = source if source in ct2.BUILTINS else _local_key(source)
    with _lock:
        if key in _cache:
            return _cache[key]
        loaded = _load_uncached(source)
        _cache[key] = loaded
        return loaded


def _local_key(source: str) -> str:
    p = Path(source).expanduser()
    return str(p.resolve()) if p.exists() else source


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") >= 2


def _load_uncached(source: str) -> LoadedModel:
    if source == PAIR_SOURCE:
        from semedge.semcom.text_pair import load_pair

        return load_pair()
    if source in ct2.BUILTINS:
        return _load_builtin(source)
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_local(path, source)
    if path.exists():
        raise UserError(f"model source {source!r} is a file, not a checkpoint directory", "give the directory that holds config.json")
    if _looks_like_path(source):
        raise UserError(f"model source {source!r}: no such directory", f"give an existing checkpoint directory or a built-in ({', '.join(_NAMED)})")
    if _HUB_ID.match(source):
        return _load_hub(source)
    raise UserError(
        f"unknown model source {source!r}",
        f"use a built-in ({', '.join(_NAMED)}), a local Hugging Face checkpoint directory, or a hub id org/name",
    )


# ----------------------------------------------------------------------------- built-ins


def _load_builtin(name: str) -> LoadedModel:
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    files = ct2.builtin_files(name)
    digest = ct2.weights_sha256(files.weights)
    out = ct2.cache_root() / "models" / f"hf-{name}-{digest[:16]}"

    def save(tmp):
        ct2.ct2_whisper_to_hf(files.files_dir, files.weights).save_pretrained(tmp, safe_serialization=True)

    cached(out, save, "converted model", folder=True)  # verified on every load; rebuilt when damaged
    model = WhisperForConditionalGeneration.from_pretrained(out, dtype="float32", local_files_only=True).float().eval()
    multilingual = model.generation_config.is_multilingual
    tok = ct2.whisper_tokenizer(files.files_dir / "tokenizer.json", multilingual)
    fe = WhisperFeatureExtractor(feature_size=model.config.num_mel_bins)
    return LoadedModel(model, "speech", name, digest, tok, fe, model.config.d_model)


# ----------------------------------------------------------------------------- local / hub


def _weight_files(d: Path) -> list[Path]:
    st = sorted(d.glob("*.safetensors"))
    return st if st else sorted(d.glob("pytorch_model*.bin"))


def _load_local(path: Path, source: str) -> LoadedModel:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"model source {source!r} has no config.json", "give a Hugging Face checkpoint directory (config.json + weights)")
    try:
        model_type = json.loads(cfg_path.read_text()).get("model_type")
    except ValueError as e:
        raise UserError(f"{cfg_path} is not valid JSON ({e})", "fix or re-save the checkpoint") from None
    weights = _weight_files(path)
    if not weights:
        raise UserError(f"model source {source!r} holds no weights (*.safetensors or pytorch_model*.bin)", "save the model with save_pretrained()")
    digest = ct2._sha256_files(weights)
    return _from_pretrained(str(path), model_type, str(path.resolve()), digest, local_only=True)


def _from_pretrained(ref: str, model_type: str | None, source: str, digest: str, local_only: bool) -> LoadedModel:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    kw = dict(local_files_only=local_only)
    if model_type == "whisper":
        from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

        model = WhisperForConditionalGeneration.from_pretrained(ref, dtype="float32", **kw).float().eval()
        tok = AutoTokenizer.from_pretrained(ref, **kw)
        try:
            fe = WhisperFeatureExtractor.from_pretrained(ref, **kw)
        except OSError:  # no preprocessor_config.json: Whisper's defaults
            fe = WhisperFeatureExtractor(feature_size=model.config.num_mel_bins)
        return LoadedModel(model, "speech", source, digest, tok, fe, model.config.d_model)
    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(ref, dtype="float32", **kw).float().eval()
    except ValueError as e:
        raise UserError(f"model source {source!r} (model_type {model_type!r}) is not an encoder-decoder model: {e}", "use Whisper, BART, T5, Marian or another AutoModelForSeq2SeqLM checkpoint") from None
    try:
        tok = AutoTokenizer.from_pretrained(ref, **kw)
    except (OSError, ValueError) as e:
        raise UserError(f"model source {source!r} has no usable tokenizer ({e})", "save the tokenizer into the checkpoint with tokenizer.save_pretrained()") from None
    d_model = getattr(model.config, "d_model", None) or model.config.hidden_size
    return LoadedModel(model, "text", source, digest, tok, None, int(d_model))


def _hub_reachable(timeout: float = _PROBE_TIMEOUT_S) -> bool:
    """An HTTPS answer from the hub within `timeout` s (a bare TCP connect is not enough:
    sandboxes and proxies accept connections they never serve)."""
    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    if any(os.environ.get(f, "0").lower() in ("1", "true", "yes") for f in flags):
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            import httpx

            r = httpx.head(_HUB_URL, timeout=timeout, follow_redirects=False)
            result.append(r.status_code < 500)
        except Exception:
            result.append(False)

    # A daemon thread: a hung DNS lookup or handshake blocks neither us nor interpreter exit.
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(result and result[0])


def _load_hub(repo_id: str) -> LoadedModel:
    fix = f"use a built-in ({', '.join(_NAMED)}) or download the checkpoint elsewhere and give its local directory"
    if not _hub_reachable():
        raise UserError(f"model source {repo_id!r} looks like a Hugging Face hub id, but the hub is not reachable from here (offline)", fix)
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"])
    except Exception as e:  # network or missing repo
        raise UserError(f"could not fetch model source {repo_id!r} from the hub: {e}", fix) from None
    path = Path(local)
    model_type = json.loads((path / "config.json").read_text()).get("model_type") if (path / "config.json").is_file() else None
    weights = _weight_files(path)
    if not weights:
        raise UserError(f"hub model {repo_id!r} has no safetensors weights", "convert it to safetensors and load it from a local directory")
    return _from_pretrained(str(path), model_type, repo_id, ct2._sha256_files(weights), local_only=True)


# ----------------------------------------------------------------------------- tiny models


def _whisper_files() -> ct2.BuiltinFiles:
    return ct2.builtin_files("whisper-base")


@functools.lru_cache(maxsize=None)
def _text_tokenizer():
    """Fast tokenizer over Whisper's BPE: `text <|endoftext|>`, with an added `<pad>`."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_file(str(_whisper_files().files_dir / "tokenizer.json"))
    eot = "<|endoftext|>"
    raw.post_processor = TemplateProcessing(single=f"$A {eot}", pair=f"$A $B {eot}", special_tokens=[(eot, raw.token_to_id(eot))])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token=eot, eos_token=eot, unk_token=eot, pad_token="<pad>",
        model_input_names=["input_ids", "attention_mask"],
    )
    return tok


@functools.lru_cache(maxsize=None)
def _tiny_whisper_tokenizer():
    return ct2.whisper_tokenizer(_whisper_files().files_dir / "tokenizer.json", multilingual=True)


def load_source(source: str) -> LoadedModel:
    """`load_model(source)`, or for `tiny:ARCH[:SEED[:D_MODEL]]` (the source a tiny model
    records; SEED defaults to 0) that tiny model rebuilt: same seed, same weights."""
    if isinstance(source, str) and source.startswith("tiny:"):
        return tiny_model(**_tiny_args(source))
    return load_model(source)


def _tiny_args(source: str) -> dict:
    """`tiny:whisper:3:128` -> {"arch": "whisper", "seed": 3, "d_model": 128}."""
    arch, *nums = source.split(":")[1:]
    if len(nums) > 2 or not all(n.isdigit() for n in nums):
        raise UserError(f"tiny model source {source!r} is not understood",
                        "write tiny:ARCH[:SEED[:D_MODEL]], e.g. tiny:whisper:0")
    return dict(zip(("arch", "seed", "d_model"), [arch, *map(int, nums)]))


def tiny_model(arch: str, seed: int = 0, d_model: int = 64) -> LoadedModel:
    """Random-init tiny encoder-decoder (d_model 64, 2+2 layers, 4 heads) for tests; no download.

    Same `seed` -> same weights. Tokenizers are shared between tiny models (treat as read-only).
    """
    import torch

    if arch == TINY_PAIR:
        from semedge.semcom.text_pair import tiny_pair

        return tiny_pair(seed, d_model)
    if arch not in TINY_ARCHS:
        raise UserError(f"tiny_model arch {arch!r} is unknown", f"use one of {', '.join((*TINY_ARCHS, TINY_PAIR))}")
    torch.manual_seed(seed)
    d, layers, heads, ffn = d_model, 2, 4, 2 * d_model
    if arch == "whisper":
        from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

        files = _whisper_files()
        special = ct2._token_ids(files.files_dir / "tokenizer.json")
        ct2_cfg = json.loads((files.files_dir / "config.json").read_text())
        tok = _tiny_whisper_tokenizer()
        from transformers import WhisperConfig

        eot = special["<|endoftext|>"]
        cfg = WhisperConfig(
            vocab_size=len(tok), num_mel_bins=80, d_model=d, encoder_layers=layers, decoder_layers=layers,
            encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
            max_source_positions=1500, max_target_positions=448, pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,
            decoder_start_token_id=special["<|startoftranscript|>"], suppress_tokens=None, begin_suppress_tokens=None,
        )
        model = WhisperForConditionalGeneration(cfg).float().eval()
        model.generation_config = ct2.whisper_generation_config(cfg, ct2_cfg, special, multilingual=True)
        model.generation_config.max_length = 32
        fe = WhisperFeatureExtractor()
        name = f"tiny:whisper:{seed}" + ("" if d == 64 else f":{d}")
        return LoadedModel(model, "speech", name, _state_hash(model), tok, fe, d)

    tok = _text_tokenizer()
    vocab = len(tok)
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    if arch == "bart":
        from transformers import BartConfig, BartForConditionalGeneration

        cfg = BartConfig(vocab_size=vocab, d_model=d, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=heads,
                         decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, max_position_embeddings=256,
                         decoder_start_token_id=tok.eos_token_id, forced_bos_token_id=None, forced_eos_token_id=None, **ids)
        model = BartForConditionalGeneration(cfg)
    elif arch == "t5":
        from transformers import T5Config, T5ForConditionalGeneration

        cfg = T5Config(vocab_size=vocab, d_model=d, d_kv=d // heads, d_ff=ffn, num_layers=layers, num_decoder_layers=layers,
                       num_heads=heads, decoder_start_token_id=tok.pad_token_id, **ids)
        model = T5ForConditionalGeneration(cfg)
    else:
        from transformers import MarianConfig, MarianMTModel

        cfg = MarianConfig(vocab_size=vocab, d_model=d, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=heads,
                           decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, max_position_embeddings=256,
                           decoder_start_token_id=tok.pad_token_id, decoder_vocab_size=vocab, **ids)
        model = MarianMTModel(cfg)
    model = model.float().eval()
    model.generation_config.max_length = 32
    return LoadedModel(model, "text", f"tiny:{arch}:{seed}", _state_hash(model), tok, None, d)


def derived(loaded: LoadedModel, model, what: str) -> LoadedModel:
    """`loaded` with `model` (a pruned or distilled copy) in place of its own: source
    `<source>+<what>`, weight hash of the new weights; tokenizer and front end shared."""
    import dataclasses

    return dataclasses.replace(loaded, model=model.eval(), source=f"{loaded.source}+{what}", weight_hash=_state_hash(model))


def _state_hash(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()
