"""The task contract: what a task plug-in owns, and nothing else varies by task.

A task is one module under `semcom/tasks/` holding one `Task` object, plus one line
in `registry.py`. The rest of the tree asks the task (`get_task(name)`, or
`loaded.task` / `split.task`) instead of testing a kind string.

A task owns:
- identity: `name` (the registry key; packages and checkpoints record it as
  `model.kind`) and `modality` (the raw input: "audio", "text", "image").
- data: `examples(split, n, **options)`, the raw inputs of a split with their references.
- device front end: `device_encode(split, raw, ...)` runs the device half (PyTorch) on
  raw inputs, one [n_i, k] tensor per message; `make_device_half(encoder, jsc)`
  wraps the encoder as the exported module; `calibration_inputs(loaded, n)` gives the
  numpy inputs the ONNX parity check feeds.
- export spec: `export` (ONNX input names in forward order, dynamic axes, output name,
  one line on what the device half computes); `write_frontend(loaded, root)` writes the
  files the device runtime needs beside the graph and returns the manifest's `frontend`.
- server: `fills_silence` (the server completes each message with the encoder's output
  for silence; False: it masks the padding), `generate_kwargs(loaded)` (the greedy
  decoding settings), `unsplit_ids(loaded, raw, max_new_tokens)` (the unsplit model's
  own output, the reference), `max_message_tokens(loaded, cap)` (the longest message the
  server accepts).
- training targets: `target_ids(loaded, text)`, `prefix_length(loaded)` (forced tokens).
- metrics: `score(refs, hyps)` -> {metric: value}.
- `features`: what the task supports beyond the link itself (see FEATURES); the
  tree checks `task.supports(feature)` before a feature that needs it.

Methods take the `LoadedModel` (semcom.models) or the `SplitModel` (semcom.split);
task modules import torch and transformers inside their methods, so the registry
imports cheaply.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

# Names a task may list in `features`:
FEATURES = {
    "link-eval": "evaluated through the link on a dataset (semedge build, plan, eval, rate)",
    "train": "a JSC codec trained from the CLI on the task's data (semedge train)",
    "distill": "the device encoder distilled (compress.distill)",
    "baseline": "a conventional source codec + channel code baseline (semcom.baseline)",
    "other-encoder": "the device runs another model's encoder (semedge train --encoder)",
    "federated": "split fine-tuning across devices (semedge federate)",
}


@dataclass(frozen=True)
class ExportSpec:
    """How the device half is exported to ONNX."""

    inputs: tuple[str, ...]  # graph input names, in the device half's forward() order
    dynamic_axes: dict[str, dict[int, str]]  # per input and output: axis -> symbolic name
    computes: str  # what the device half computes, one line (logs and docs)
    output: str = "symbols"  # [batch, tokens, k]


@dataclass(frozen=True)
class Task(ABC):
    """One task: see the module docstring. Subclass as a frozen dataclass giving the fields
    defaults; the three abstract methods are what the split and the export need."""

    name: str
    modality: str
    export: ExportSpec
    fills_silence: bool = False
    features: frozenset = field(default_factory=frozenset)

    def supports(self, feature: str) -> bool:
        """Whether the task supports `feature` (a FEATURES key)."""
        return feature in self.features

    def _lacks(self, what: str):
        return NotImplementedError(f"the {self.name} task does not implement {what}")

    # -- data
    def examples(self, split: str, n: int | None = None, **options) -> list:
        """The split's first n examples (raw input + reference), in a stable order."""
        raise self._lacks("examples")

    # -- device front end
    @abstractmethod
    def make_device_half(self, encoder, jsc_encoder):
        """The exported module: graph inputs (export.inputs, in order) -> symbols [B, N, k]."""

    @abstractmethod
    def device_encode(self, split, raw: Sequence, frames: str = "content", window: str = "fit") -> list:
        """The device half (PyTorch) on raw inputs: one [n_i, k] tensor per message."""

    @abstractmethod
    def calibration_inputs(self, loaded, n: int = 2) -> dict:
        """Deterministic numpy inputs {export.inputs name: array} for the ONNX parity check."""

    def check_device_encoder(self, loaded, encoder) -> None:
        """Raise a UserError when the device cannot run `encoder`'s encoder for `loaded`'s server."""

    def calibration_states(self, loaded, n: int):
        """Encoder states [N, d] of n training inputs (standardises the identity codec)."""
        raise self._lacks("calibration_states")

    # -- export
    def write_frontend(self, loaded, root: Path) -> dict:
        """Write the device's front-end files into package folder `root`; return the manifest's `frontend`."""
        raise self._lacks("write_frontend")

    # -- server
    def generate_kwargs(self, loaded) -> dict:
        """Keyword arguments of the decoder's generate(): greedy."""
        return {"do_sample": False, "num_beams": 1}

    def unsplit_ids(self, loaded, raw: Sequence, max_new_tokens: int) -> Any:
        """Token ids of the unsplit model's own greedy output on raw inputs (the reference)."""
        raise self._lacks("unsplit_ids")

    def max_message_tokens(self, loaded, cap: int) -> int:
        """The most tokens one message may carry to the server; `cap`: the server's configured limit."""
        pos = getattr(loaded.model.config, "max_position_embeddings", None)
        return int(min(cap, pos or cap))

    # -- training targets (seq2seq defaults)
    def target_ids(self, loaded, text: str) -> list[int]:
        """Token ids the decoder should produce for reference `text`, with prefix and end tokens."""
        return list(loaded.tokenizer(text).input_ids)

    def prefix_length(self, loaded) -> int:
        """Forced tokens at the start of every target (the decoder start token)."""
        return 1

    # -- metrics
    def score(self, refs: Sequence[str], hyps: Sequence[str], **options) -> dict:
        """{metric: value} of hypotheses against references (semcom.metrics.score: WER, BLEU, similarity)."""
        from semedge.semcom.metrics import score

        return score(refs, hyps, **options)
