"""semcom/training: the CLI reads TrainConfig without torch, the server takes adapters without
the trainer, and the learning-rate schedule the trainer and distillation share."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from semedge.semcom.training.config import TrainConfig
from semedge.semcom.training.schedule import warmup_cosine

REPO = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_train_config_and_cli_import_without_torch():
    r = _run("""
        import sys
        sys.modules["torch"] = None
        from semedge.semcom.training.config import LoRASpec, TrainConfig
        import semedge.cli_train
        print(TrainConfig().steps, LoRASpec.parse("r=4").r)
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(TrainConfig().steps), "4"]


def test_adapters_do_not_pull_in_the_trainer():
    r = _run("""
        import sys
        import semedge.semcom.training.adapters
        print(sorted(m for m in sys.modules if m.startswith("semedge.semcom.training.")))
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['semedge.semcom.training.adapters', 'semedge.semcom.training.config']"


def test_cli_train_defaults_are_the_config_defaults():
    from typer.main import get_command

    from semedge.cli import app

    params = {p.name: p.default for p in get_command(app).commands["train"].params}
    d = TrainConfig()
    assert (params["steps"], params["mse_warmup"], params["n_train"], params["n_val"], params["save_every"]) == \
        (d.steps, d.mse_warmup_steps, d.n_train, d.n_val, d.save_every)


def test_old_manifests_eval_every_reads_as_save_every():
    assert TrainConfig.from_dict({"eval_every": 7}).save_every == 7


def test_warmup_cosine():
    assert [warmup_cosine(s, 100, 20, 0.1) for s in (0, 9, 19)] == [0.05, 0.5, 1.0]
    assert warmup_cosine(20, 100, 20, 0.1) == 1.0
    assert warmup_cosine(60, 100, 20, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(99, 100, 20, 0.1) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 79 / 80)))
    assert warmup_cosine(500, 100, 20, 0.1) == pytest.approx(0.1)  # past the end: the floor
