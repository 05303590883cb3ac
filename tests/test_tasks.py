"""Tasks as plug-ins: the registry, the built-in tasks' specs, a toy task through split and export."""

import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from semedge.core.errors import UserError
from semedge.semcom.tasks.base import FEATURES, ExportSpec, Task
from semedge.semcom.tasks.registry import TASKS, get_task, register


def test_registry_holds_the_built_in_tasks():
    assert {"speech", "text"} <= set(TASKS)
    assert all(isinstance(t, Task) and TASKS[n] is t and t.name == n for n, t in TASKS.items())
    for t in TASKS.values():
        assert t.features <= set(FEATURES), t.name
        assert set(t.export.inputs) | {t.export.output} == set(t.export.dynamic_axes), t.name


def test_unknown_task_names_the_known_ones():
    with pytest.raises(UserError) as e:
        get_task("sign-language")
    assert "speech" in str(e.value) and "text" in str(e.value)


def test_speech_and_text_specs():
    speech, text = get_task("speech"), get_task("text")
    assert speech.export.inputs == ("input_features",) and speech.fills_silence
    assert text.export.inputs == ("input_ids", "attention_mask") and not text.fills_silence
    assert speech.supports("link-eval") and not text.supports("link-eval")


# A third task in a few lines: token ids only (no mask), on a tiny BART. Nothing outside
# this test knows it; the registry, the split, the link and the ONNX export take it from here.
class _TokensHalf(torch.nn.Module):
    def __init__(self, encoder, jsc):
        super().__init__()
        self.encoder, self.jsc = encoder, jsc

    def forward(self, tokens):  # [B, T] -> [B, T, k]
        return self.jsc(self.encoder(input_ids=tokens).last_hidden_state)


@dataclass(frozen=True)
class _ToyTask(Task):
    name: str = "toy-tokens"
    modality: str = "text"
    export: ExportSpec = ExportSpec(("tokens",), {"tokens": {0: "batch", 1: "tokens"}, "symbols": {0: "batch", 1: "tokens"}},
                                    "the encoder on token ids + JSC encoder")

    def make_device_half(self, encoder, jsc_encoder):
        return _TokensHalf(encoder, jsc_encoder)

    def device_encode(self, split, raw, frames="content", window="fit"):
        return [split.device(split.loaded.tokenizer(t, return_tensors="pt")["input_ids"])[0] for t in raw]

    def calibration_inputs(self, loaded, n=2):
        return {"tokens": loaded.tokenizer(["a toy task"], return_tensors="np")["input_ids"].astype(np.int64)}


@pytest.fixture
def toy():
    task = register(_ToyTask())
    yield task
    TASKS.pop(task.name)


def test_a_toy_task_flows_through_registry_split_link_and_export(toy, tmp_path):
    from semedge.export.onnx import export_device_half
    from semedge.semcom.jsc import JSCCodec, JSCConfig
    from semedge.semcom.models import tiny_model
    from semedge.semcom.split import build_split
    from semedge.semcom.system import device_encode, run_link

    loaded = dataclasses.replace(tiny_model("bart"), kind=toy.name)
    assert get_task("toy-tokens") is toy and loaded.task is toy
    split = build_split(loaded, JSCCodec(JSCConfig(d_model=loaded.d_model, k=8)))
    assert isinstance(split.device, _TokensHalf) and split.server.silence is None
    msgs = device_encode(split, ["hello there", "a longer sentence than that"])
    assert [m.shape[-1] for m in msgs] == [8, 8] and msgs[0].shape[0] < msgs[1].shape[0]
    res = run_link(split, ["hello there"], channel="none", max_new_tokens=4)
    assert len(res.hyps) == 1 and res.tokens_sent == [msgs[0].shape[0]]
    rep = export_device_half(split, tmp_path / "toy.onnx", optimize=False)
    assert [(i["name"], i["shape"][:2]) for i in rep.inputs] == [("tokens", ["batch", "tokens"])]
    assert rep.outputs[0]["name"] == "symbols" and rep.outputs[0]["shape"] == ["batch", "tokens", 8] and rep.parity.ok
