"""The text task's trained codec (issue 16, item 1): MiniLM on the device, Whisper's decoder with
LoRA on the server (semcom/text_pair.py), trained through the channel (semcom/text_codec.py).

On the tiny random-init pair (`tiny:minilm-whisper`): a short training run lowers the loss; the
checkpoint (codec + LoRA) loads through the inference path; the device half exports to ONNX and
runs on ONNX Runtime with parity against PyTorch; the served package answers what the in-process
server half answers; a message decodes the same alone or in a batch; train and test are disjoint."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from semedge.semcom.training.config import LoRASpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = "tiny:minilm-whisper"
SENTENCES = ["the radio link carries only the symbols", "a short one", "hello there", "the cat sat"]


def _config(**kw):
    from semedge.semcom.text_codec import TextTrainConfig

    base = dict(source=TINY, k=16, hidden=64, lora=LoRASpec(r=4, alpha=8, projections=("q_proj", "k_proj", "v_proj")),
                steps=40, batch_size=16, lr=1e-2, warmup=5, n_train=160, n_val=16)
    return TextTrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(config, result, checkpoint folder) of a 40-step run of the tiny pair."""
    from semedge.semcom.text_codec import save_text_codec, train_text_codec

    torch.set_num_threads(1)
    cfg = _config()
    res = train_text_codec(cfg)
    out = save_text_codec(tmp_path_factory.mktemp("ckpt") / "text-jsc", cfg, res, "test", dtype="float32")
    return cfg, res, out


def _split(folder):
    from semedge.semcom.checkpoint import device_encoder, load_for_inference
    from semedge.semcom.models import load_source
    from semedge.semcom.split import build_split

    receiver, ckpt = load_for_inference(load_source(TINY), str(folder))
    return build_split(receiver, ckpt.codec, encoder=device_encoder(ckpt)), ckpt


@pytest.fixture(scope="module")
def split(trained):
    """The trained checkpoint through the inference path (its tiny decoder soon learns to stop at once)."""
    return _split(trained[2])


@pytest.fixture(scope="module")
def talkative(tmp_path_factory):
    """A one-step checkpoint (adapters nonzero): the tiny decoder still talks, so decoded text can be compared."""
    from semedge.semcom.text_codec import save_text_codec, train_text_codec

    cfg = _config(steps=1, n_train=32, n_val=4)
    out = save_text_codec(tmp_path_factory.mktemp("ckpt1") / "text-jsc", cfg, train_text_codec(cfg), "test", dtype="float32")
    return _split(out)


def test_tiny_training_lowers_the_loss(trained):
    _, res, _ = trained
    s = res.summary()
    assert s["steps_done"] == 40
    # the random tiny decoder learns slowly, but it learns: training batches and the fixed validation set
    assert np.mean(res.ce[-8:]) < np.mean(res.ce[:8]) - 0.05, s
    assert set(res.val) == {"awgn", "rayleigh"}
    assert all(res.val[ch] < res.val_start[ch] - 0.05 for ch in res.val), s


def test_checkpoint_names_command_licences_split_and_adapters(trained, split):
    _, _, out = trained
    man = split[1].manifest
    assert man["task"] == "text" and man["model"]["source"] == "tiny:minilm-whisper:0" and man["command"] == "test"
    assert "Apache-2.0" in man["licences"]["all-MiniLM-L6-v2"] and "MIT" in man["licences"]["whisper-base"]
    assert "sentences('train')" in man["data"]["train"] and "never seen" in man["data"]["test"]
    assert (out / "adapters.safetensors").is_file() and man["lora"]["r"] == 4
    receiver = split[0].loaded
    assert sum("lora_" in n for n, _ in receiver.model.named_parameters()) > 0  # the adapters are on the decoder


def test_train_and_test_sentences_are_disjoint(trained):
    from semedge.semcom.metrics import normalize
    from semedge.semcom.tasks.registry import get_task
    from semedge.semcom.text_codec import sentences

    train = {normalize(s) for s in sentences("train")}
    test = [normalize(s) for s in get_task("text").examples("test")]
    assert test and not train.intersection(test)
    assert trained[0].n_train is not None and sentences("train", 3) == sentences("train")[:3]  # what the trainer reads


def test_device_half_exports_to_onnx_with_parity(split, tmp_path):
    from semedge.export.package import build_package
    from semedge.runtime.package import Package
    from semedge.runtime.runner import DeviceRunner
    from semedge.semcom.system import device_encode

    sp, ckpt = split
    pkg = Package.load(build_package(sp, tmp_path / "pkg", optimize=False, jsc_ckpt=ckpt.path))
    assert pkg.manifest["onnx"]["parity"]["ok"] and pkg.kind == "text"
    runner = DeviceRunner(pkg)
    for s, ref in zip(SENTENCES, device_encode(sp, SENTENCES)):
        got = runner.encode_text(s)  # ONNX Runtime, the package's own (MiniLM) tokenizer.json
        assert got.shape == tuple(ref.shape)
        assert np.abs(got - ref.numpy()).max() < 1e-4


def test_served_package_answers_like_the_server_half(talkative, tmp_path):
    from semedge.export.package import build_package
    from semedge.runtime.client import send
    from semedge.runtime.package import Package
    from semedge.runtime.runner import DeviceRunner
    from semedge.runtime.server import ServerConfig, create_app, serve_in_thread
    from semedge.semcom.models import load_source

    sp, ckpt = talkative
    pkg = Package.load(build_package(sp, tmp_path / "pkg", optimize=False, jsc_ckpt=ckpt.path))
    assert "server/adapters.safetensors" in pkg.manifest["files"] or any("adapters" in f for f in pkg.manifest["files"])
    runner = DeviceRunner(pkg)
    msgs = [runner.encode_text(s) for s in SENTENCES]
    want = sp.server.transcribe([torch.from_numpy(m) for m in msgs], max_new_tokens=8)
    app = create_app([pkg], loader=lambda src: load_source(src),
                     config=ServerConfig(max_batch=8, max_wait_ms=10, max_new_tokens=8, backend="auto"))
    with serve_in_thread(app) as url:
        got = [send(url, pkg.package_id, m, task="text")["text"][0] for m in msgs]
    assert got == want and all(want)


def test_a_message_decodes_the_same_alone_or_in_a_batch(talkative):
    from semedge.semcom.system import device_encode

    sp, _ = talkative
    msgs = device_encode(sp, SENTENCES)
    together = sp.server.transcribe(msgs, max_new_tokens=6)
    assert [sp.server.transcribe([m], max_new_tokens=6)[0] for m in msgs] == together and all(together)


def test_the_pair_has_two_tokenizers_and_pads_to_whisper_width():
    from semedge.semcom.models import load_source

    loaded = load_source(TINY)
    tok = loaded.tokenizer
    assert tok("hello")["input_ids"][0] == 101  # MiniLM's [CLS]
    ids = tok.target_ids("hello")
    assert tok.batch_decode([ids], skip_special_tokens=True)[0].strip() == "hello"
    assert loaded.task.prefix_length(loaded) == 4 and loaded.task.target_ids(loaded, "hello") == ids
    narrow = torch.zeros(1, 3, 48)
    assert loaded.model.memory(narrow).shape == (1, 3, 64)  # zero-padded to the decoder's width


def test_tokenizer_files_for_the_device_do_not_pad(tmp_path):
    import json

    from semedge.semcom.models import load_source

    loaded = load_source(TINY)
    front = loaded.task.write_frontend(loaded, tmp_path)
    spec = json.loads((tmp_path / front["tokenizer"]).read_text())
    assert spec["padding"] is None and spec["model"]["type"] == "WordPiece"


def test_generate_refuses_sampling():
    from semedge.core.errors import UserError
    from semedge.semcom.models import load_source

    with pytest.raises(UserError, match="greedily"):
        load_source(TINY).model.generate(input_ids=torch.tensor([[101, 102]]), num_beams=4)


def test_config_rejects_an_empty_snr_range():
    from semedge.core.errors import UserError

    with pytest.raises(UserError, match="snr-low"):
        dataclasses.replace(_config(), snr_low=10.0, snr_high=0.0)


def _semedge(*args):
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "semedge.cli", *args], capture_output=True, text=True, env=env, timeout=600)


def test_transmit_task_text_json(talkative):
    import json

    r = _semedge("transmit", "--task", "text", "--model", TINY, "--jsc", str(talkative[1].path), "--text", "the boy threw the ball",
                 "--channel", "rayleigh", "--snr", "5", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["reference"] == "the boy threw the ball" and out["channel"] == "rayleigh"
    assert {"bleu", "similarity", "exact_match"} <= set(out) and 0 <= out["similarity"] <= 1
    assert out["symbols_sent"] == out["tokens_sent"] * out["k"] and out["k"] == 16  # 7 MiniLM tokens x k


def test_transmit_task_text_refuses_wav_and_speech_models(tmp_path):
    r = _semedge("transmit", "--task", "text", "--wav", str(tmp_path / "a.wav"))
    assert r.returncode == 2 and "--task text sends --text" in r.stderr and "Traceback" not in r.stderr
    r = _semedge("transmit", "--task", "text", "--model", "tiny:whisper", "--text", "hello there")
    assert r.returncode == 2 and "is a speech model" in r.stderr and "Traceback" not in r.stderr


def test_the_shipped_codec_is_the_default_of_transmit_task_text():
    from semedge.semcom.checkpoint import load_checkpoint
    from semedge.semcom.models import PAIR_SOURCE
    from semedge.semcom.tasks.text import DEFAULT_CODEC
    from semedge.cli_transmit import _task_defaults

    assert _task_defaults("text", None, None, None) == (PAIR_SOURCE, DEFAULT_CODEC)
    assert _task_defaults("speech", None, None, None) == ("whisper-base", None)
    ck = load_checkpoint(DEFAULT_CODEC)  # every file's sha256 checked against the manifest
    man = ck.manifest
    assert man["model"]["source"] == PAIR_SOURCE and man["task"] == "text" and ck.k == 64 and ck.adapters
    assert man["data"]["train"] == "tasks.corpus.sentences('train')" and set(man["licences"]) == {"all-MiniLM-L6-v2", "whisper-base"}
    assert sum(f.stat().st_size for f in DEFAULT_CODEC.iterdir()) < 4_000_000  # codec + LoRA, fp16
