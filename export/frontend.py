"""Whisper's log-mel front end as ONNX nodes, put in front of the encoder in device.onnx
(`semedge export --frontend graph`): the app feeds 16 kHz mono PCM instead of log-mel.

    audio float32 [batch, samples] (samples <= 480000)  ->  input_features float32 [batch, 80, frames]

The same arithmetic as runtime.features.log_mel (and transformers' WhisperFeatureExtractor):
trim/zero-pad to 30 s, reflect-pad n_fft/2 each side, STFT (periodic Hann, n_fft 400, hop 160),
power |X|², mel filterbank, log10 of max(mel, 1e-10), the last frame dropped, floor at the
utterance's max - 8, (x + 4) / 4, cut to the "fit" window (core.frames.window_frames) of the
input's length: frames w = min(3000, 2 * min(1500, ceil(samples / 320)) + 40).
Only the w frames kept are computed: the signal is zero-padded (or cut) to M = min(480000, 160 w + 40)
samples, the last sample frame w - 1 reads. Frames past w are all zero padding (log-mel -10, never
above the max of the frames kept), so the max - 8 floor is the same as over the 30 s window.
A fixed-shape graph (NNAPI, CoreML, QNN) takes exactly [1, 480000] and gives the full window.

Everything between the input and output Casts is float64 (in float32 the STFT alone put the log-mel
~2e-3 off a tone + noise, docs/export.md). Every node is named `logmel/...`; the encoder graph after it
is untouched.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from semedge.core.errors import UserError
from semedge.core.frames import FIT_MARGIN, SAMPLES_PER_ENC_FRAME

MIN_OPSET = 17  # STFT
INPUT = "audio"
FEATURES = "input_features"  # the encoder's input: the front end's output
PREFIX = "logmel/"
CHOICES = ("numpy", "graph")


def params(loaded) -> tuple[dict, np.ndarray]:
    """(the manifest's speech `frontend` section, the model's mel filterbank [n_mels, n_fft/2+1] float64).
    float64: the float32 copy in mel_filters.npy moves ~8% of the log-mel values by one float32 step,
    which flipped 5 of 50 whisper-base transcripts (benchmarks/frontend.py)."""
    from semedge.semcom.tasks.speech_task import speech_frontend

    front, _ = speech_frontend(loaded)
    return front, np.asarray(loaded.feature_extractor.mel_filters, dtype=np.float64).T


def check_choice(frontend: str, opset: int) -> None:
    """UserError for an unknown --frontend or an opset without STFT."""
    if frontend not in CHOICES:
        raise UserError(f"--frontend {frontend!r} is not a front end", "use --frontend numpy (log-mel input) or graph (PCM input)")
    if frontend == "graph" and opset < MIN_OPSET:
        raise UserError(f"--frontend graph needs ONNX STFT (opset {MIN_OPSET}); --opset {opset} is too low",
                        f"use --opset {MIN_OPSET} or higher, or --frontend numpy")


class _Graph:
    """Collects nodes and constants; every name gets the logmel/ prefix."""

    def __init__(self, opset: int):
        self.opset, self.nodes, self.inits, self.n = opset, [], [], 0

    def const(self, name: str, value, dtype=np.int64) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), PREFIX + name))
        return PREFIX + name

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        from onnx import helper

        self.n += 1
        out = out or f"{PREFIX}{op_type.lower()}_{self.n}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"{PREFIX}{op_type}_{self.n}", **attrs))
        return out

    def reduce(self, op_type: str, x: str, axes: list[int], keepdims: int) -> str:
        """Reduce* with axes as an attribute (opset < 18) or an input (ReduceMax/Min from 18, ReduceSum from 13)."""
        if op_type == "ReduceSum" or self.opset >= 18:
            return self.op(op_type, x, self.const(f"axes_{self.n}", axes), keepdims=keepdims)
        return self.op(op_type, x, axes=axes, keepdims=keepdims)


def _pad_to_window(g: _Graph, x: str, n_samples: int, n_frames: int, n_fft: int, hop: int) -> tuple[str, str]:
    """[B, n] -> ([B, M], w): cut / zero-pad to the M samples the fit window's w frames read (int64 [1])."""
    n = g.op("Shape", x, start=1, end=2)
    w = _fit_frames(g, n, n_frames)
    m = g.op("Min", g.op("Add", g.op("Mul", w, g.const("hop1", [hop])), g.const("reach", [n_fft // 2 - hop])),
             g.const("n_samples", [n_samples]))
    x = g.op("Slice", x, g.const("zero", [0]), m, g.const("axis1", [1]))
    short = g.op("Max", g.op("Sub", m, n), g.const("zero", [0]))
    pads = g.op("Concat", g.const("zeros3", [0, 0, 0]), short, axis=0)
    return g.op("Pad", x, pads, g.const("fzero", 0.0, np.float64), mode="constant"), w


def _fit_frames(g: _Graph, n: str, n_frames: int) -> str:
    """core.frames.window_frames(n, "fit") as int64 [1]."""
    per = SAMPLES_PER_ENC_FRAME
    content = g.op("Div", g.op("Add", n, g.const("per_m1", [per - 1])), g.const("per", [per]))
    content = g.op("Min", content, g.const("enc_frames", [n_frames // 2]))
    w = g.op("Add", g.op("Mul", content, g.const("two", [2])), g.const("margin", [FIT_MARGIN]))
    return g.op("Min", w, g.const("n_frames", [n_frames]))


def _log_mel(g: _Graph, x: str, filters: np.ndarray, n_fft: int, hop: int, frames: str) -> str:
    """[B, M] float64 -> log-mel [B, n_mels, frames] float32, floored and scaled (frames: int64 [1])."""
    half = n_fft // 2
    x = g.op("Pad", x, g.const("reflect", [0, half, 0, half]), mode="reflect")
    x = g.op("Unsqueeze", x, g.const("axis_last", [-1]))  # [B, L, 1]: a real signal
    hann = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)  # periodic
    spec = g.op("STFT", x, g.const("hop", hop), g.const("hann", hann, np.float64), g.const("n_fft", n_fft), onesided=1)
    power = g.reduce("ReduceSum", g.op("Mul", spec, spec), [-1], keepdims=0)  # [B, frames+1, n_fft/2+1]
    mel = g.op("MatMul", power, g.const("mel_filters", filters.T, np.float64))  # [B, frames+1, n_mels]
    logm = g.op("Mul", g.op("Log", g.op("Max", mel, g.const("floor", 1e-10, np.float64))),
                g.const("inv_ln10", 1.0 / np.log(10.0), np.float64))
    logm = g.op("Slice", g.op("Transpose", logm, perm=[0, 2, 1]), g.const("zero", [0]),
                frames, g.const("axis2", [2]))  # drop the frame(s) past the window
    top = g.reduce("ReduceMax", logm, [1, 2], keepdims=1)
    logm = g.op("Max", logm, g.op("Sub", top, g.const("range", 8.0, np.float64)))
    scaled = g.op("Div", g.op("Add", logm, g.const("four", 4.0, np.float64)), g.const("four", 4.0, np.float64))
    return g.op("Cast", scaled, to=1, out=FEATURES)  # float32


def frontend_graph(front: dict, filters: np.ndarray, opset: int, fixed: bool = False):
    """(nodes, initializers, input ValueInfo) computing FEATURES from INPUT.

    front: the manifest's speech `frontend` (n_fft, hop_length, n_samples, n_frames);
    filters: [n_mels, n_fft/2+1]. fixed: input [1, n_samples], full window, no shape arithmetic."""
    from onnx import TensorProto, helper

    g = _Graph(opset)
    n_samples, n_frames = int(front["n_samples"]), int(front["n_frames"])
    n_fft, hop = int(front["n_fft"]), int(front["hop_length"])
    x = g.op("Cast", INPUT, to=TensorProto.DOUBLE)
    if fixed:
        w = g.const("n_frames", [n_frames])
    else:
        x, w = _pad_to_window(g, x, n_samples, n_frames, n_fft, hop)
    _log_mel(g, x, np.asarray(filters, np.float64), n_fft, hop, w)
    shape = [1, n_samples] if fixed else ["batch", "samples"]
    return g.nodes, _unique(g.inits), helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, shape)


def _unique(inits: list) -> list:
    seen, out = set(), []
    for t in inits:
        if t.name not in seen:
            seen.add(t.name)
            out.append(t)
    return out


def _opset(model) -> int:
    return int(next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0))


def prepend(src: str | Path, dst: str | Path, front: dict, filters: np.ndarray, fixed: bool = False) -> Path:
    """`src` (takes FEATURES) with the front end in front of it (takes INPUT), written to `dst`."""
    import onnx

    from semedge.export.optimize import save_model

    m = onnx.load(str(src))
    opset = _opset(m)
    if opset < MIN_OPSET:
        raise UserError(f"the device graph has opset {opset}; the graph front end needs STFT (opset {MIN_OPSET})",
                        f"export with --opset {MIN_OPSET} or higher")
    names = [i.name for i in m.graph.input]
    if FEATURES not in names:
        raise UserError(f"the device graph takes {names}, not {FEATURES}", "use --frontend graph with a Whisper model only")
    nodes, inits, vi = frontend_graph(front, filters, opset, fixed)
    inputs = [vi if i.name == FEATURES else i for i in m.graph.input]
    del m.graph.input[:]
    m.graph.input.extend(inputs)
    body = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes + body)
    m.graph.initializer.extend(inits)
    save_model(m, Path(dst))
    return Path(dst)


def standalone(front: dict, filters: np.ndarray, opset: int = MIN_OPSET, fixed: bool = False):
    """The front end alone as a ModelProto (audio -> input_features): parity checks and tests."""
    from onnx import TensorProto, helper

    nodes, inits, vi = frontend_graph(front, filters, opset, fixed)
    out = helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "whisper_log_mel", [vi], [out], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def parity_audio(n: int = 2, fixed: bool = False) -> list[np.ndarray]:
    """Deterministic 16 kHz test signals (chirps + noise, a quiet second half), 1.5 s, 3.5 s, ...;
    fixed: zero-padded to 30 s (a fixed-shape graph's input)."""
    from semedge.core.frames import N_SAMPLES, SAMPLE_RATE

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        t = np.arange(int(SAMPLE_RATE * (1.5 + 2.0 * i))) / SAMPLE_RATE
        a = 0.3 * np.sin(2 * np.pi * (220 + 110 * i) * t * (1 + t)) + 0.05 * rng.standard_normal(t.size)
        a[t.size // 2 :] *= 0.01
        out.append(np.pad(a, (0, N_SAMPLES - a.size)) if fixed else a)
    return [a.astype(np.float32) for a in out]


def reference(device_module):
    """A torch module audio [B, n] -> device_module(numpy log-mel on the fit window): what a
    numpy-front-end package computes, the graph's parity reference."""
    import torch

    from semedge.core.frames import window_frames
    from semedge.runtime.features import log_mel

    class NumpyFrontEnd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.device_half = device_module

        def forward(self, audio: torch.Tensor) -> torch.Tensor:
            n = audio.shape[1]
            feats = np.stack([log_mel(a)[:, : window_frames(n)] for a in audio.numpy()])  # (B, 80, w)
            return self.device_half(torch.from_numpy(feats))

    return NumpyFrontEnd().eval()


def log_mel_parity(model, audios: list[np.ndarray], feature_extractor=None) -> dict:
    """Max |graph log-mel - numpy log_mel| (and - the model's WhisperFeatureExtractor) over `audios`."""
    import onnxruntime as ort

    from semedge.core.frames import window_frames
    from semedge.runtime.features import log_mel

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rec = {"numpy": 0.0, "transformers": 0.0} if feature_extractor is not None else {"numpy": 0.0}
    for a in audios:
        got = sess.run(None, {INPUT: a[None]})[0][0]
        w = got.shape[-1]
        rec["numpy"] = max(rec["numpy"], float(np.abs(got - log_mel(a)[:, :w]).max()))
        if feature_extractor is not None:
            ref = feature_extractor([a], sampling_rate=16000, return_tensors="np").input_features[0][:, :w]
            rec["transformers"] = max(rec["transformers"], float(np.abs(got - ref).max()))
        if w != window_frames(a.size):
            raise RuntimeError(f"the graph front end gave {w} frames for {a.size} samples, not {window_frames(a.size)}")
    return {"max_abs": {k: float(f"{v:.3g}") for k, v in rec.items()}, "n_inputs": len(audios)}
