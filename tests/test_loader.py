"""Model loader: CT2 reader, CT2 -> HF parity against ctranslate2 itself, sources, tiny models."""

import hashlib
import shutil
import struct
import subprocess
import time

import numpy as np
import pytest
import torch

from semedge.semcom import ct2, models
from semedge.core.errors import UserError

SENTENCES = [
    "The weather is nice today.",
    "Please send the report before noon.",
    "Open the door and turn on the light.",
]


def _say(text: str, tmp) -> np.ndarray:
    """espeak-ng (22050 Hz) -> float32 mono 16 kHz."""
    import soundfile as sf
    from scipy.signal import resample_poly

    wav = tmp / "say.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), text], check=True, capture_output=True, timeout=30)
    audio, sr = sf.read(str(wav), dtype="float32")
    assert sr == 22050
    return resample_poly(audio, 160, 221).astype(np.float32)  # 22050 * 160/221 = 16000


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed")
    tmp = tmp_path_factory.mktemp("speech")
    return [_say(s, tmp) for s in SENTENCES]


@pytest.fixture(scope="module", params=["whisper-tiny.en", "whisper-base"])
def pair(request, audio):
    """(LoadedModel, ctranslate2 Whisper, log-mel features [n,80,3000], reference sentences)."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    torch.set_num_threads(1)
    loaded = models.load_model(request.param)
    ref = ctranslate2.models.Whisper(str(ct2.ct2_model_dir(request.param)), device="cpu", compute_type="float32", intra_threads=1)
    clips = audio if request.param == "whisper-tiny.en" else audio[1:]  # base: two clips keep the file fast
    feats = loaded.feature_extractor(clips, sampling_rate=16000, return_tensors="np").input_features.astype(np.float32)
    return loaded, ref, np.ascontiguousarray(feats), SENTENCES[-len(clips):]


def _prompt(loaded):
    mid = ["<|en|>", "<|transcribe|>"] if loaded.model.generation_config.is_multilingual else []
    return ["<|startoftranscript|>", *mid, "<|notimestamps|>"]


def test_encoder_and_transcript_parity_with_ctranslate2(pair):
    import ctranslate2
    from transformers.modeling_outputs import BaseModelOutput

    loaded, ref, feats, sentences = pair
    enc = ref.encode(ctranslate2.StorageView.from_array(feats))
    with torch.no_grad():
        h = loaded.model.get_encoder()(torch.from_numpy(feats)).last_hidden_state
    diff = float(np.abs(np.asarray(enc) - h.numpy()).max())
    print(f"{loaded.source}: encoder max abs diff vs ctranslate2 = {diff:.3g} (max |h| {float(h.abs().max()):.3g})")
    assert diff <= 1e-3

    res = ref.generate(enc, [_prompt(loaded)] * len(feats), beam_size=1, max_length=64)
    want = [loaded.tokenizer.decode(r.sequences_ids[0], skip_special_tokens=True).strip() for r in res]
    with torch.no_grad():
        # The server half decodes from encoder states passed in directly.
        out = loaded.model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=h), max_new_tokens=60)
        if loaded.source == "whisper-tiny.en":  # and from features (one model: it re-runs the encoder)
            out2 = loaded.model.generate(torch.from_numpy(feats), max_new_tokens=60)
            assert torch.equal(out, out2)
        else:  # the default (English) equals an explicit language/task
            out3 = loaded.model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=h), max_new_tokens=60, language="en", task="transcribe")
            assert torch.equal(out, out3)
    got = [t.strip() for t in loaded.tokenizer.batch_decode(out, skip_special_tokens=True)]
    print(loaded.source, got)
    assert got == want
    # The speech is intelligible enough that most words come through.
    words = sum(len(set(s.lower().strip(".").split()) & set(g.lower().replace(".", "").split())) for s, g in zip(sentences, got))
    assert words >= 0.6 * sum(len(s.split()) for s in sentences)


def test_english_prefix_and_explicit_language():
    loaded = models.load_model("whisper-base")
    tok = loaded.tokenizer
    ids = tok("hello").input_ids
    assert tok.convert_ids_to_tokens(ids[:4]) == ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
    assert tok.decode(ids, skip_special_tokens=True) == "hello"
    g = loaded.model.generation_config
    assert g.decoder_start_token_id == tok.convert_tokens_to_ids("<|startoftranscript|>")
    assert g.no_timestamps_token_id == tok.convert_tokens_to_ids("<|notimestamps|>")
    en = models.load_model("whisper-tiny.en")
    assert en.model.generation_config.is_multilingual is False
    assert en.tokenizer.convert_ids_to_tokens(en.tokenizer("hi").input_ids[:2]) == ["<|startoftranscript|>", "<|notimestamps|>"]


def test_builtin_metadata_hash_and_memo():
    loaded = models.load_model("whisper-tiny.en")
    assert models.load_model("whisper-tiny.en") is loaded
    assert loaded.kind == "speech" and loaded.d_model == 384
    cfg = loaded.model.config
    assert (cfg.encoder_layers, cfg.encoder_attention_heads, cfg.vocab_size) == (4, 6, 51864)
    assert loaded.model.proj_out.weight.data_ptr() == loaded.model.model.decoder.embed_tokens.weight.data_ptr()
    assert not loaded.model.training and next(loaded.model.parameters()).dtype == torch.float32
    (path,) = ct2.builtin_files("whisper-tiny.en").weights
    assert loaded.weight_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    base = models.load_model("whisper-base")
    assert (base.d_model, base.model.config.decoder_attention_heads, base.model.config.encoder_layers) == (512, 8, 6)


def test_fresh_conversion_equals_cached_model():
    files = ct2.builtin_files("whisper-tiny.en")
    fresh = ct2.ct2_whisper_to_hf(files.files_dir, files.weights).state_dict()
    cached = models.load_model("whisper-tiny.en").model.state_dict()
    assert fresh.keys() == cached.keys()
    for k in fresh:
        assert torch.equal(fresh[k], cached[k]), k


# ----------------------------------------------------------------------------- CT2 reader


def _ct2_bytes(version=6, variables=(), aliases=()):
    def s(x: str) -> bytes:
        b = x.encode() + b"\0"
        return struct.pack("<H", len(b)) + b

    out = struct.pack("<I", version) + s("TestSpec") + struct.pack("<I", 1) + struct.pack("<I", len(variables))
    codes = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.float16): 4}
    for name, arr in variables:
        out += s(name) + struct.pack("<B", arr.ndim) + b"".join(struct.pack("<I", d) for d in arr.shape)
        out += struct.pack("<BI", codes[arr.dtype], arr.nbytes) + arr.tobytes()
    out += struct.pack("<I", len(aliases)) + b"".join(s(a) + s(t) for a, t in aliases)
    return out


def test_read_model_bin_roundtrip_parts_and_aliases(tmp_path):
    w = np.arange(12, dtype=np.float16).reshape(3, 4)
    b = np.array([1.5, -2.0], dtype=np.float32)
    n = np.array(8, dtype=np.int16)
    data = _ct2_bytes(variables=[("a/weight", w), ("a/bias", b), ("heads", n)], aliases=[("proj/weight", "a/weight")])
    (tmp_path / "p1").write_bytes(data[:37])  # split mid-variable, like whisper-base's two packages
    (tmp_path / "p2").write_bytes(data[37:])
    m = ct2.read_model_bin([tmp_path / "p1", tmp_path / "p2"])
    assert m.spec == "TestSpec" and m.revision == 1
    assert m.variables["a/weight"].dtype == np.float16 and np.array_equal(m.variables["a/weight"], w)
    assert np.array_equal(m.variables["a/bias"], b) and int(m.variables["heads"]) == 8
    assert m.aliases == {"proj/weight": "a/weight"} and m.variables["proj/weight"] is m.variables["a/weight"]
    assert m.sha256 == hashlib.sha256(data).hexdigest()


def test_read_model_bin_rejects_bad_files(tmp_path):
    data = _ct2_bytes(variables=[("x", np.zeros(4, np.float32))])
    (tmp_path / "trunc.bin").write_bytes(data[:-10])
    with pytest.raises(UserError, match="ends early"):
        ct2.read_model_bin(tmp_path / "trunc.bin")
    (tmp_path / "v5.bin").write_bytes(_ct2_bytes(version=5))
    with pytest.raises(UserError, match="version 5"):
        ct2.read_model_bin(tmp_path / "v5.bin")
    with pytest.raises(UserError, match="does not exist"):
        ct2.read_model_bin(tmp_path / "missing.bin")


# ----------------------------------------------------------------------------- sources


def test_unknown_source_lists_builtins():
    with pytest.raises(UserError) as e:
        models.load_model("whisper-huge")
    assert e.value.problem.startswith("unknown model source") and "whisper-huge" in e.value.problem
    assert "whisper-base" in e.value.fix and "whisper-tiny.en" in e.value.fix


def test_missing_local_path():
    with pytest.raises(UserError, match="no such directory"):
        models.load_model("./no/such/checkpoint")


def test_hub_id_fails_fast_offline(monkeypatch):
    t = time.monotonic()
    with pytest.raises(UserError) as e:
        models.load_model("openai/whisper-small")
    assert "openai/whisper-small" in e.value.problem and "local" in e.value.fix
    # Without the offline flags the reachability probe must still give up quickly
    # (unroutable address: connect would otherwise hang).
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_HUB_URL", "https://10.255.255.1/api/models")
    with pytest.raises(UserError, match="not reachable"):
        models.load_model("facebook/bart-base")
    assert time.monotonic() - t < 5


def test_missing_package_names_pip(monkeypatch):
    monkeypatch.setitem(ct2.BUILTINS, "whisper-x", ct2.Builtin("whisper-x", (("no_such_pkg_xyz", "m.bin"),), "no_such_pkg_xyz", "d", "no-such-pkg"))
    with pytest.raises(UserError, match="pip install no-such-pkg"):
        ct2.builtin_files("whisper-x")


@pytest.mark.parametrize("arch", ["bart", "whisper"])
def test_local_checkpoint_directory(tmp_path, arch):
    tiny = models.tiny_model(arch, seed=1)
    tiny.model.save_pretrained(tmp_path, safe_serialization=True)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = models.load_model(str(tmp_path))
    assert loaded.kind == ("speech" if arch == "whisper" else "text")
    assert loaded.weight_hash == hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    assert loaded.d_model == 64
    for k, v in tiny.model.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k]), k
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        models.load_model(str(tmp_path / "empty"))


# ----------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("arch", models.TINY_ARCHS)
def test_tiny_model_forward(arch):
    m = models.tiny_model(arch)
    assert m.d_model == 64 and m.model.config.vocab_size == len(m.tokenizer)
    again = models.tiny_model(arch)
    assert m.weight_hash == again.weight_hash != models.tiny_model(arch, seed=1).weight_hash
    with torch.no_grad():
        if arch == "whisper":
            assert m.kind == "speech" and m.feature_extractor is not None
            feats = torch.from_numpy(m.feature_extractor(np.zeros(16000, np.float32), sampling_rate=16000, return_tensors="np").input_features)
            dec = torch.tensor([[m.model.config.decoder_start_token_id]])
            out = m.model(input_features=feats, decoder_input_ids=dec)
            gen = m.model.generate(feats, max_new_tokens=4)
        else:
            assert m.kind == "text" and m.feature_extractor is None
            enc = m.tokenizer(["hello world", "a longer sentence here"], padding=True, return_tensors="pt")
            assert enc.input_ids[0, -1] == m.tokenizer.pad_token_id and m.tokenizer.eos_token_id in enc.input_ids[0].tolist()
            dec = torch.full((2, 1), m.model.config.decoder_start_token_id)
            out = m.model(**enc, decoder_input_ids=dec)
            gen = m.model.generate(**enc, max_new_tokens=4)
    assert out.logits.shape[-1] == len(m.tokenizer)
    assert torch.isfinite(out.logits).all() and gen.shape[-1] >= 2
