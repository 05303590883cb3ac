"""One real server hosting a speech, a text and an image package at once (issue 16, item 3):
interleaved concurrent clients get the answers single-task servers give; a payload of another
task is a 422 naming the field and the fix; decoders are loaded once per base model."""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest
import torch

from semedge.runtime.client import ServerError, answer_images, make_client, send, to_npy
from semedge.runtime.package import Package
from semedge.runtime.runner import DeviceRunner
from semedge.runtime.server import ServerConfig, create_app, serve_in_thread

MAX_NEW = 12
SENTENCES = ("the radio link carries only the symbols", "a short one", "hello there")
CROPS = ((0, 0, 32, 32), (10, 20, 50, 70), (40, 8, 64, 48))  # top, left, height, width: 50 x 70 is padded to 52 x 72


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _text_package(folder):
    from semedge.export.package import build_package
    from semedge.semcom.jsc import JSCCodec, JSCConfig
    from semedge.semcom.models import tiny_model
    from semedge.semcom.split import build_split

    loaded = tiny_model("bart")
    torch.manual_seed(2)
    split = build_split(loaded, JSCCodec(JSCConfig(d_model=64, k=24, hidden=64)))  # k=24: wider than the others
    return loaded, build_package(split, folder, optimize=False)


def _messages(pkgs: dict) -> list[tuple[str, dict]]:
    """(task, {symbols, size}) per message, from each package's own ONNX device runner."""
    from semedge.semcom.image_data import load_photo

    t = np.arange(16000) / 16000
    photo = load_photo("coffee")
    speech = DeviceRunner(pkgs["speech"])
    text = DeviceRunner(pkgs["text"])
    image = DeviceRunner(pkgs["image"])
    out = [("speech", {"symbols": speech.encode_audio((0.3 * np.sin(2 * np.pi * f * t[:n])).astype(np.float32))})
           for f, n in ((300, 16000), (520, 9000), (800, 12000))]
    out += [("text", {"symbols": text.encode_text(s)}) for s in SENTENCES]
    for top, left, h, w in CROPS:
        rgb = np.ascontiguousarray(photo[top:top + h, left:left + w])
        out.append(("image", {"symbols": image.encode_image(rgb), "size": (h, w), "rgb": rgb}))
    return out


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """(packages by task, loader, messages): a tiny Whisper, a tiny BART and the shipped image codec."""
    from conftest import tiny_whisper_package

    from semedge.export.image_package import build_image_package

    root = tmp_path_factory.mktemp("tasks")
    wl, _split, wpath = tiny_whisper_package(root / "speech")
    bl, bpath = _text_package(root / "text")
    ipath = build_image_package(root / "image")
    pkgs = {"speech": Package.load(wpath), "text": Package.load(bpath), "image": Package.load(ipath)}
    models = {wl.source: wl, bl.source: bl}
    return pkgs, models.__getitem__, _messages(pkgs)


def _config():
    return ServerConfig(max_batch=8, max_wait_ms=10, max_new_tokens=MAX_NEW, backend="torch")


def _ask(url: str, pkg: Package, msg: dict, client=None) -> dict:
    return send(url, pkg.package_id, msg["symbols"], client=client, task=pkg.kind, image_size=msg.get("size"))


def _answer(out: dict):
    return out["image"] if "image" in out else out["text"]


def test_image_package_exports_with_parity(three):
    pkgs, _, msgs = three
    man = pkgs["image"].manifest
    assert man["model"]["kind"] == "image" and man["onnx"]["parity"]["ok"]
    assert [i["name"] for i in man["onnx"]["inputs"]] == ["image"]
    assert man["model"]["weight_hash"] == man["files"]["server/image_decoder.safetensors"]
    # the runner's symbols are the codec's own (PyTorch) device half on the edge-padded image
    from semedge.semcom.tasks.image import default_codec, pad_image

    codec = default_codec()[0]
    for task, m in msgs:
        if task == "image":
            x = pad_image(m["rgb"])[0]
            ref = codec.device_half(torch.from_numpy(x)[None])[0].detach().numpy()
            assert np.abs(m["symbols"] - ref).max() < 1e-4


def test_mixed_load_answers_equal_single_task_servers(three):
    pkgs, loader, msgs = three
    single = {}
    for task, pkg in pkgs.items():  # one server per task, hosting only that package
        with serve_in_thread(create_app([pkg], loader=loader, config=_config())) as url:
            single[task] = [_answer(_ask(url, pkg, m)) for t, m in msgs if t == task]
    app = create_app(list(pkgs.values()), loader=loader, config=_config())
    order = list(range(len(msgs))) * 3  # speech, text and image interleaved, each message 3 times
    got, errors, lock = {}, [], threading.Lock()
    with serve_in_thread(app) as url:
        health = httpx.get(f"{url}/healthz", timeout=10).json()["packages"]
        assert {p["task"] for p in health.values()} == {"speech", "text", "image"}

        def client(c_id: int):
            with make_client(60) as c:
                for j in order[c_id::8]:
                    task, m = msgs[j]
                    try:
                        out = _ask(url, pkgs[task], m, client=c)
                    except Exception as e:  # noqa: BLE001 - counted and shown below
                        with lock:
                            errors.append(repr(e))
                        continue
                    with lock:
                        got.setdefault(j, []).append(out)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
    assert errors == [] and sorted(got) == list(range(len(msgs)))
    seen = {t: 0 for t in pkgs}
    for j, (task, m) in enumerate(msgs):
        want = single[task][seen[task]]
        seen[task] += 1
        for out in got[j]:
            assert out["task"] == task and _answer(out) == want, (task, j)
        if task == "image":
            assert answer_images(got[j][0])[0].shape == m["rgb"].shape  # cropped back to H x W
    batches = [o["batch"] for outs in got.values() for o in outs]
    assert max(batches) > 1  # the load was concurrent enough to batch


def test_image_answer_is_the_codec_in_process(three):
    """The server's PNG is the codec's own server half on the same symbols, as 8-bit RGB."""
    from semedge.semcom.image_data import to_hwc_uint8
    from semedge.semcom.tasks.image import default_codec

    pkgs, loader, msgs = three
    codec = default_codec()[0]
    task, m = next((t, m) for t, m in msgs if t == "image" and m["size"] == (50, 70))
    with serve_in_thread(create_app([pkgs["image"]], loader=loader, config=_config())) as url:
        out = _ask(url, pkgs["image"], m)
    with torch.no_grad():
        rec = codec.server_half(torch.from_numpy(m["symbols"])[None], 13, 18)[0, :, :50, :70].numpy()
    assert out["height"] == 50 and out["width"] == 70 and out["format"] == "png"
    assert np.array_equal(answer_images(out)[0], to_hwc_uint8(rec))


@pytest.fixture(scope="module")
def mixed(three):
    pkgs, loader, msgs = three
    with serve_in_thread(create_app(list(pkgs.values()), loader=loader, config=_config())) as url:
        yield pkgs, msgs, url


def _first(msgs, task):
    return next(m for t, m in msgs if t == task)


def _post(url, pid, body, **params):
    return httpx.post(f"{url}/v1/decode", params={"package": pid, **params}, content=body, timeout=60)


def _wrong(pkgs, msgs):
    """case -> (package, body, query, words the 422 must hold)."""
    sp, tx, im = pkgs["speech"].package_id, pkgs["text"].package_id, pkgs["image"].package_id
    img, aud, txt = _first(msgs, "image"), _first(msgs, "speech"), _first(msgs, "text")
    h, w = img["size"]
    return {
        "image to speech": (sp, to_npy(img["symbols"]), {"height": h, "width": w}, ["height/width", "speech task"]),
        "image to text": (tx, to_npy(img["symbols"]), {"task": "image"}, ["task='image'", "text task", "/healthz"]),
        "speech to image": (im, to_npy(aud["symbols"]), {}, ["height is missing", "image task", "?height=H&width=W"]),
        "speech to image, sized": (im, to_npy(aud["symbols"]), {"height": h, "width": w}, ["tokens", "do not fit",
                                                                                           "encode_image"]),
        "text (k=24) to image": (im, to_npy(txt["symbols"]), {"height": 8, "width": 8}, ["24 symbols per token", "k=16",
                                                                                        "image task"]),
        "text (k=24) to speech": (sp, to_npy(txt["symbols"]), {}, ["24 symbols per token", "k=16", "speech task"]),
        "bad height": (im, to_npy(img["symbols"]), {"height": "tall", "width": w}, ["height='tall'", "whole number"]),
        "image session": (im, to_npy(img["symbols"]), {"height": h, "width": w, "session": "s1"}, ["session",
                                                                                                   "no session"]),
    }


@pytest.mark.parametrize("case", ["image to speech", "image to text", "speech to image", "speech to image, sized",
                                  "text (k=24) to image", "text (k=24) to speech", "bad height", "image session"])
def test_payload_of_another_task_is_a_clear_422(mixed, case):
    pkgs, msgs, url = mixed
    pid, body, params, words = _wrong(pkgs, msgs)[case]
    r = _post(url, pid, body, **params)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert all(wd in detail for wd in words), detail
    img = _first(msgs, "image")
    assert "image" in _ask(url, pkgs["image"], img)  # still serving every task
    assert "text" in _ask(url, pkgs["speech"], _first(msgs, "speech"))


def test_client_names_its_task(mixed):
    pkgs, msgs, url = mixed
    with pytest.raises(ServerError) as e:
        send(url, pkgs["image"].package_id, _first(msgs, "speech")["symbols"], task="speech")
    assert e.value.status == 422 and "serves the image task" in e.value.detail


def test_shared_decoders_are_loaded_once(three, tmp_path):
    """Two image packages of one codec share one CNN decoder; two text packages of one model share it."""
    from semedge.export.image_package import build_image_package

    pkgs, loader, _ = three
    second = Package.load(build_image_package(tmp_path / "image-b"))
    text2 = Package.load(_text_package(tmp_path / "text-b")[1])
    app = create_app([*pkgs.values(), second, text2], loader=loader, config=_config())
    reg = app.state.registry
    a, b = reg.served[pkgs["image"].package_id], reg.served[second.package_id]
    assert a.half.decoder is b.half.decoder and a.half.jsc is not b.half.jsc
    t1, t2 = reg.served[pkgs["text"].package_id], reg.served[text2.package_id]
    assert t1.half.model is t2.half.model
    assert len(reg.models) == 3  # whisper, bart, one image decoder
    reg.close()


def test_device_run_image_cli(three, tmp_path, capsys):
    import json

    from PIL import Image

    from semedge.cli import main

    pkgs, loader, msgs = three
    img = _first(msgs, "image")
    Image.fromarray(img["rgb"]).save(tmp_path / "p.png")
    with serve_in_thread(create_app([pkgs["image"]], loader=loader, config=_config())) as url:
        rc = main(["device", "run", str(pkgs["image"].path), "--image", str(tmp_path / "p.png"), "--server", url,
                   "--channel", "none", "--json"])
        out = json.loads(capsys.readouterr().out)
        assert rc == 0 and out["output"] == str(tmp_path / "p.semedge.png")
        assert np.asarray(Image.open(out["output"])).shape == img["rgb"].shape
        assert main(["device", "run", str(pkgs["image"].path), "--text", "hi", "--server", url]) == 2
        assert main(["device", "run", str(pkgs["speech"].path), "--image", str(tmp_path / "p.png"), "--server", url]) == 2
