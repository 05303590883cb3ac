"""What the task planner (compress/task_plan.py) plans for the text and image tasks: a `Subject`
per task builds a plan's device graph, runs it on ONNX Runtime and scores what the server
half makes of the received symbols.

    subj = open_subject("image", None)                 # the shipped image codec
    subj = open_subject("text", "tiny:bart:0")         # a text seq2seq (BART, T5, Marian)

Image: the CNN encoder + JSC encoder of an image codec (semedge train-image); no structured
pruner applies to the CNN (compress/prune.py prunes transformer encoders), so its plans are
precisions only. Text: the seq2seq model's encoder + JSC encoder; plans are pruning x
precision, as for Whisper's encoder. Speech keeps its own planner (compress/planner.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semedge.compress.candidates import PRECISIONS
from semedge.compress.plan import TORCH_OPS, Plan, apply_onnx_steps
from semedge.core.errors import UserError

# Precisions tried per task (compress/candidates.py PRECISIONS). int4-mixed keeps the JSC and
# the first layers fp32: on the image CNN that is every quantizable weight, the fp32 graph again.
TASK_PRECISIONS = {"image": ("fp32", "fp16", "int8", "int4-b32"),
                   "text": ("fp32", "fp16", "int8", "int4-b32", "int4-mixed")}
QUICK_PRECISIONS = ("fp32", "fp16", "int8", "int4-b32")
# Text pruning (heads + FFN neurons of the encoder); quick: one level.
TEXT_PRUNINGS = {"dense": None, "h25f25": {"heads": 0.25, "ffn": 0.25}, "h50f50": {"heads": 0.5, "ffn": 0.5}}
QUICK_PRUNINGS = ("dense", "h50f50")
# The input size the cost model and the host timing assume for one message (symbolic dims):
# image: 256 x 256 pixels; text: 128 tokens.
COST_LENGTH = {"image": 256, "text": 128}
PLANNED_TASKS = ("text", "image")


def _plans(prunings: dict, precisions) -> list[Plan]:
    out = []
    for pname, pcfg in prunings.items():
        for q in precisions:
            steps = [{"op": "prune", "config": pcfg}] if pcfg else []
            if PRECISIONS[q]:
                steps.append({"op": "quantize_onnx", "config": PRECISIONS[q]})
            out.append(Plan.make(steps, q if len(prunings) == 1 else f"{pname}.{q}"))
    return out


@dataclass
class Subject:
    """One task's device half to plan: how plans become graphs and how a graph is scored."""

    task: str
    source: str  # the model (text) or codec folder (image)
    weight_hash: str
    k: int
    workdir: Path
    metric: str = ""  # the primary metric (higher is better): the choice and the tie rule use it
    metrics: tuple = ()  # every figure kept per condition
    length: int = 0

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.task}|{self.weight_hash}".encode()).hexdigest()[:16]

    def graph_dir(self) -> Path:
        d = self.workdir / "onnx" / self.key
        d.mkdir(parents=True, exist_ok=True)
        return d

    def build(self, plan: Plan) -> Path:
        """The plan's device graph (cached by plan hash): fp32 export, then its ONNX steps."""
        from semedge.core.files import check_cache, seal

        out = self.graph_dir() / f"{plan.hash()[:20]}.onnx"
        if check_cache(out, "ONNX candidate"):
            return out
        base = self.export_fp32(Plan.make(plan.ops(TORCH_OPS)))
        apply_onnx_steps(base, out, plan)
        seal(out)
        return out


class ImageSubject(Subject):
    """The image codec: CNN + JSC encoder on the device, JSC decoder + CNN decoder on the server."""

    def __init__(self, codec, codec_dir: Path | None, workdir: Path):
        from semedge.semcom.tasks.image import DEFAULT_CODEC

        self.codec = codec.eval()
        self.codec_dir = Path(codec_dir) if codec_dir is not None else DEFAULT_CODEC
        super().__init__("image", str(self.codec_dir), _state_hash(self.codec), int(codec.cfg.k), Path(workdir),
                         "psnr", ("psnr", "ssim"), COST_LENGTH["image"])

    def plans(self, quick: bool) -> list[Plan]:
        return _plans({"dense": None}, TASK_PRECISIONS["image"])

    def export_fp32(self, torch_plan: Plan) -> Path:
        from semedge.core.files import check_cache, seal
        from semedge.semcom.tasks.image import IMAGE

        if torch_plan.steps:
            raise UserError(f"plan step {torch_plan.steps[0].op!r} does not apply to the image CNN",
                            "give the image task quantize_onnx steps only")
        base = self.graph_dir() / "fp32.onnx"
        if not check_cache(base, "ONNX candidate"):  # exported, then checked on ORT as export-image does
            from semedge.export.image_package import parity_inputs
            from semedge.export.onnx import check_parity

            IMAGE.export_onnx(self.codec, base)
            check_parity(base, self.codec.device_half, parity_inputs(self.codec))  # ExportParityError: exit 4
            seal(base)
        return base

    def examples(self, n: int) -> tuple[list, list]:
        """(inputs, references): n test patches [3, 32, 32], each its own reference."""
        from semedge.semcom.image_data import split_patches

        x = split_patches("test", n)[0].astype(np.float32)
        return list(x), list(x)

    def messages(self, onnx: Path, inputs: list) -> list[np.ndarray]:
        from semedge.runtime.profiler import session

        s = session(onnx, 1)
        name = s.get_inputs()[0].name
        return [s.run(None, {name: x[None]})[0][0] for x in inputs]

    def score(self, received: list[np.ndarray], refs: list) -> dict:
        """PSNR / SSIM per patch of the server half's reconstructions."""
        import torch

        from semedge.semcom.image_eval import score_images

        h, w = refs[0].shape[1] // 4, refs[0].shape[2] // 4
        with torch.no_grad():
            y = torch.from_numpy(np.stack(received).astype(np.float32))
            rec = self.codec.server_half(y, h, w).numpy()
        s = score_images(np.stack(refs), rec)
        return {"psnr": s["psnr"], "ssim": s["ssim"]}


class TextSubject(Subject):
    """A text seq2seq: its encoder + JSC encoder on the device, JSC decoder + decoder on the server."""

    def __init__(self, loaded, jsc, workdir: Path):
        from semedge.compress.workspace import codec_hash
        from semedge.semcom.checkpoint import load_for_inference
        from semedge.semcom.split import build_split

        receiver, ckpt = load_for_inference(loaded, jsc)
        self.loaded, self.ckpt = loaded, ckpt
        self.split = build_split(receiver, ckpt.codec if ckpt is not None else None)
        self._torch: dict[str, object] = {}
        super().__init__("text", loaded.source, f"{loaded.weight_hash}:{codec_hash(self.split.codec)[:16]}",
                         int(self.split.k), Path(workdir), "similarity", ("similarity", "bleu", "wer"),
                         COST_LENGTH["text"])

    def plans(self, quick: bool) -> list[Plan]:
        prunings = {k: v for k, v in TEXT_PRUNINGS.items() if not quick or k in QUICK_PRUNINGS}
        return _plans(prunings, QUICK_PRECISIONS if quick else TASK_PRECISIONS["text"])

    def calib(self) -> dict:
        """Pruning ranks heads and neurons on the encoder's output over 8 training sentences."""
        from semedge.semcom.tasks.text import TEXT

        enc = self.loaded.tokenizer(TEXT.examples("train", 8), return_tensors="pt", padding=True)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def torch_split(self, torch_plan: Plan):
        from semedge.compress.plan import apply_torch_steps

        key = torch_plan.hash()
        if key not in self._torch:
            self._torch[key] = apply_torch_steps(self.split, torch_plan, self.calib()) if torch_plan.steps else self.split
        return self._torch[key]

    def export_fp32(self, torch_plan: Plan) -> Path:
        from semedge.compress.realise import RealiseFiles, export_base

        base = self.graph_dir() / f"{torch_plan.hash()[:20]}.fp32.onnx"
        export_base(lambda: self.torch_split(torch_plan), RealiseFiles(base, base, meta=False), optimize=False)
        return base

    def examples(self, n: int) -> tuple[list, list]:
        from semedge.semcom.tasks.text import TEXT

        s = TEXT.examples("test", n)
        return s, s

    def messages(self, onnx: Path, inputs: list) -> list[np.ndarray]:
        """One sentence per run: every token's symbols [tokens, k]."""
        from semedge.runtime.profiler import session

        s = session(onnx, 1)
        names = [i.name for i in s.get_inputs()]
        out = []
        for text in inputs:
            ids = np.asarray(self.loaded.tokenizer(text).input_ids, dtype=np.int64)[None]
            feeds = {n: (np.ones_like(ids) if "mask" in n else ids) for n in names}
            out.append(np.ascontiguousarray(s.run(None, feeds)[0][0], dtype=np.float32))
        return out

    def score(self, received: list[np.ndarray], refs: list) -> dict:
        """Per sentence: similarity (all-MiniLM-L6-v2), and the corpus BLEU / WER with their intervals."""
        import torch

        from semedge.semcom.metrics import score, similarity_per_utt

        tokens = min(96, 8 + 2 * max(len(r.split()) for r in refs))
        with torch.no_grad():
            hyps = self.split.server.transcribe([torch.from_numpy(m) for m in received], max_new_tokens=tokens)
        s = score(refs, hyps, with_similarity=False)
        return {"similarity": similarity_per_utt(refs, hyps), "bleu": s["bleu"], "bleu_ci95": s["bleu_ci95"],
                "wer": s["wer"], "wer_ci95": s["wer_ci95"]}


def _state_hash(module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def open_subject(task: str, model: str | None, jsc: str | None = None, workdir: str | Path = "build/planner") -> Subject:
    """The subject of `task`: image (model: a `semedge train-image` folder, None: the shipped codec)
    or text (model: a text seq2seq source; jsc: its JSC codec). check_task_model first."""
    if task == "image":
        if jsc is not None:
            raise UserError("--jsc does not apply to --task image: its codec is the --model",
                            "give the `semedge train-image --out` folder as --model (none: the shipped codec)")
        from semedge.semcom.image_codec import load_codec
        from semedge.semcom.tasks.image import default_codec

        codec = default_codec()[0] if model is None else load_codec(model)[0]
        return ImageSubject(codec, None if model is None else Path(model), Path(workdir))
    if task == "text":
        from semedge.semcom.models import load_source

        loaded = load_source(model)
        if loaded.kind != "text":
            raise UserError(f"--task text: {model} is a {loaded.kind} model",
                            "give --model a text seq2seq (a BART/T5/Marian checkpoint folder, a hub id, or tiny:bart)")
        return TextSubject(loaded, jsc, Path(workdir))
    raise UserError(f"--task {task}: the task planner plans {', '.join(PLANNED_TASKS)}", "use --task speech for Whisper models")


# ---------------------------------------------------------------- which model can do which task

TASKS = ("speech", "text", "image")
DEFAULT_MODEL = {"speech": "whisper-base", "text": None, "image": None}  # image None: the shipped codec
_TEXT_FIX = "give --model a text seq2seq (a BART/T5/Marian checkpoint folder, a hub id, or tiny:bart for a test)"


def parse_task(value: str | None) -> str:
    """The --task value: one known task (a list is refused: one task per run)."""
    v = (value or "speech").strip()
    parts = [p.strip() for p in v.split(",") if p.strip()]
    if len(parts) > 1:
        raise UserError(f"--task {v}: one task per run",
                        f"run once per task, each into its own --out (e.g. --task {parts[0]}, then --task {parts[1]})")
    if not parts or parts[0] not in TASKS:
        raise UserError(f"--task {v!r} is unknown", f"use --task speech, --task text or --task image")
    return parts[0]


def source_kind(model: str) -> str | None:
    """What a model source is, where that is known without loading it: speech, text, image, or None (a hub id)."""
    from semedge.semcom.models import BUILTIN_NAMES, TINY_ARCHS

    if model in BUILTIN_NAMES:
        return "speech"
    if model.startswith("tiny:"):
        arch = model.split(":")[1] if ":" in model else ""
        return "speech" if arch == "whisper" else ("text" if arch in TINY_ARCHS else None)
    p = Path(model).expanduser()
    if (p / "manifest.json").is_file() and not (p / "config.json").is_file():
        import json

        try:
            fmt = json.loads((p / "manifest.json").read_text()).get("format", "")
        except (OSError, ValueError):
            return None
        return "image" if str(fmt).startswith("semedge-image-codec") else "jsc-codec"
    if (p / "config.json").is_file():
        import json

        try:
            mt = json.loads((p / "config.json").read_text()).get("model_type")
        except (OSError, ValueError):
            return None
        return "speech" if mt == "whisper" else "text"
    return None


def check_task_model(task: str, model: str | None) -> str | None:
    """The model source `task` runs (its default when `model` is None); a UserError naming --task / --model
    and the fix when the model cannot do the task. Checked before anything loads."""
    if model is None:
        if task == "text":
            raise UserError("--task text needs --model (no text model ships with semedge)", _TEXT_FIX)
        return DEFAULT_MODEL[task]
    kind = source_kind(model)
    if kind is None or kind == task:
        return model  # a hub id is checked once loaded
    what = {"speech": "a speech model", "text": "a text model", "image": "an image codec",
            "jsc-codec": "a JSC codec folder, not a model"}[kind]
    fix = {"speech": "use --task speech with it, or give --model a Whisper model (whisper-base, whisper-tiny.en)",
           "text": _TEXT_FIX,
           "image": "drop --model (the shipped image codec) or give a `semedge train-image --out` folder"}[task]
    if task == "speech" and kind in ("text", "image"):
        fix = f"use --task {kind} with it, or drop --model (whisper-base)"
    if kind == "jsc-codec":
        fix = "pass the codec as --jsc and the model it was trained for as --model"
    raise UserError(f"--task {task}: --model {model} is {what}; it cannot do the {task} task", fix)
