"""SIGKILL at several points of the real `semedge export`, `train`, `plan` and `build` (tiny random
Whisper): the output is the previous complete one (its manifest's hashes match) or absent, and the
next run removes the killed run's temporaries and finishes (train: resumes from its checkpoint).

A kill point is a file appearing (a temp of the writer at work), so it does not depend on timing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from semedge.core.files import _LITTER, check_cache, sha256_file

SCRIPT = Path(sys.executable).parent / "semedge"
MODEL = "tiny:whisper:0"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One cache for the module (speech audio, encoder features); a private TMPDIR."""
    root = tmp_path_factory.mktemp("crash_env")
    (root / "tmp").mkdir()
    return dict(os.environ, XDG_CACHE_HOME=str(root / "cache"), TMPDIR=str(root / "tmp"), OMP_NUM_THREADS="1",
                HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def run(args, cwd, env, timeout=900) -> subprocess.CompletedProcess:
    r = subprocess.run([str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def kill_when(args, cwd, env, *patterns: str, root: Path | None = None, timeout=900) -> None:
    """Run `semedge ARGS`; SIGKILL it as soon as a path matching one of the glob `patterns` exists under `root`."""
    root = root or Path(cwd)
    p = subprocess.Popen([str(SCRIPT), *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    end = time.monotonic() + timeout
    while p.poll() is None and time.monotonic() < end and not any(next(root.glob(g), None) for g in patterns):
        time.sleep(0.002)
    finished = p.poll() is not None
    p.kill()
    err = p.communicate(timeout=60)[1].decode()[-2000:]
    assert not finished, f"semedge {args[0]} ended (rc {p.returncode}) before {patterns} appeared: {err}"


def litter(root: Path) -> list[str]:
    """Temporaries a killed writer leaves (core.files' names) anywhere under `root`."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if _LITTER.fullmatch(p.name))


def complete(folder: Path, key: str = "files") -> bool:
    """Whether every file the folder's manifest lists (packages and checkpoints: `files`) matches its sha256."""
    man = json.loads((folder / "manifest.json").read_text())
    files = {f: (v["sha256"] if isinstance(v, dict) else v) for f, v in man[key].items()}
    return bool(files) and all(sha256_file(folder / f) == h for f, h in files.items())


def absent_or_complete(folder: Path) -> str | None:
    """None when `folder` is absent, its manifest's sha256 when it is complete; fails otherwise."""
    if not folder.exists():
        return None
    assert (folder / "manifest.json").is_file(), f"{folder} is half-written: no manifest ({sorted(os.listdir(folder))})"
    assert complete(folder), f"{folder}'s files do not match its manifest"
    return sha256_file(folder / "manifest.json")


# ----------------------------------------------------------------------------- export


@pytest.mark.slow  # ~37 s: four real exports
def test_export_killed_while_packaging_or_exporting(tmp_path, env):
    args = ["export", "--model", MODEL, "--device", "host", "--format", "fp32", "--no-optimize", "--out", "pkg"]
    pkg = tmp_path / "pkg"
    kill_when(args, tmp_path, env, "pkg.tmp-*")  # assembling the package folder, no output yet
    absent_or_complete(pkg)
    run(args, tmp_path, env)  # the next run finishes and removes the killed run's folder
    before = absent_or_complete(pkg)
    assert before and litter(tmp_path) == [] and zipfile.ZipFile(tmp_path / "pkg.zip").testzip() is None
    kill_when(args, tmp_path, env, ".scratch.*/*.onnx")  # mid-export: the old package stays
    assert absent_or_complete(pkg) == before
    kill_when(args, tmp_path, env, "pkg.tmp-*/manifest.json")  # the new package is complete, not yet swapped in
    assert absent_or_complete(pkg) == before and zipfile.ZipFile(tmp_path / "pkg.zip").testzip() is None
    run(args, tmp_path, env)  # the next run removes the killed runs' scratch and package temporaries
    assert absent_or_complete(pkg) and litter(tmp_path) == []


# ----------------------------------------------------------------------------- train


def _step(ck: Path) -> int:
    return json.loads((ck / "manifest.json").read_text())["step"]


@pytest.mark.slow  # ~41 s: four real training runs
def test_train_killed_while_saving_a_checkpoint_resumes_from_the_last_complete_one(tmp_path, env):
    args = ["train", "--model", MODEL, "--n-train", "4", "--n-val", "0", "--steps", "12", "--batch-size", "2",
            "--hidden", "32", "--k", "8", "--mse-warmup", "0", "--save-every", "3", "--threads", "1", "--out", "ck"]
    ck, saving = tmp_path / "ck", "**/.codec.*.tmp.safetensors"  # a checkpoint's codec being written
    kill_when(args, tmp_path, env, saving)  # the first save: there is nothing to keep yet
    assert absent_or_complete(ck) is None or _step(ck) == 3
    if not ck.exists():  # (the save may finish within one poll)
        kill_when(args + ["--resume"], tmp_path, env, "ck/manifest.json")  # no checkpoint: starts from step 0
    assert _step(ck) == 3
    kill_when(args + ["--resume"], tmp_path, env, saving)  # resumed at 3, killed saving step 6
    assert absent_or_complete(ck) and _step(ck) == 3  # the previous checkpoint, whole
    r = run(args + ["--resume"], tmp_path, env)
    assert "resuming from ck at step 3" in r.stdout and _step(ck) == 12 and complete(ck)
    assert litter(tmp_path) == []


# ----------------------------------------------------------------------------- plan and build (minutes each)

PROFILE = ("name: phone-a\ndevice_class: phone\nmemory_budget_mb: 200\n"
           "peak_gflops: {fp32: 50.0, fp16: 100.0, int8: 200.0}\nmem_bandwidth_gbs: 10.0\ncores: 2\nthreads: 1\n"
           "execution_providers: [CPU]\nlatency_budget_ms: 2000\n"
           "link: {uplink_mbps: 10, snr_db: [0, 20], channel: awgn}\nsources: [synthetic test profile]\n")
FP32 = {"name": "fp32", "steps": []}
INT8 = {"name": "int8", "steps": [{"op": "quantize_onnx", "config": {"mode": "int8_dynamic"}}]}


def _profiles(root: Path) -> Path:
    (root / "profiles").mkdir()
    (root / "profiles" / "phone-a.yaml").write_text(PROFILE)
    return root / "profiles"


def sealed_onnx_ok(folder: Path) -> bool:
    """Every cached ONNX candidate under `folder` matches its sums."""
    files = list(folder.rglob("*.onnx"))
    return bool(files) and all(check_cache(f, "ONNX candidate") for f in files)


@pytest.mark.slow
def test_plan_killed_mid_candidate_keeps_the_previous_plans_and_resumes(tmp_path, env):
    _profiles(tmp_path)
    (tmp_path / "one.json").write_text(json.dumps([FP32]))
    (tmp_path / "two.json").write_text(json.dumps([FP32, INT8]))

    def args(cands):
        return ["plan", "--model", MODEL, "--quick", "--profiles", "profiles", "--out", "plans.json", "--n-cheap", "2",
                "--n-full", "2", "--candidates", cands, "--jsc", "identity", "--no-realise"]

    scratch = "planner/onnx/*/.scratch.*"  # a candidate being exported or quantized
    kill_when(args("one.json"), tmp_path, env, scratch)
    assert not (tmp_path / "plans.json").exists()
    run(args("one.json"), tmp_path, env)
    before = (tmp_path / "plans.json").read_bytes()
    assert litter(tmp_path) == [] and sealed_onnx_ok(tmp_path / "planner")
    kill_when(args("two.json"), tmp_path, env, scratch)  # quantizing the new candidate
    assert (tmp_path / "plans.json").read_bytes() == before
    run(args("two.json"), tmp_path, env)
    plans = json.loads((tmp_path / "plans.json").read_text())
    assert set(plans["candidates"]) == {"fp32", "int8"} and plans["devices"]["phone-a"]["chosen"]
    assert litter(tmp_path) == [] and sealed_onnx_ok(tmp_path / "planner")


def _plans() -> dict:
    cand = {"plan": FP32, "describe": "fp32", "k": 64, "bytes": 900_000,
            "predicted": {"phone-a": {"latency_ms": 10.0, "memory_mb": 70.0}},
            "accuracy": {s: {"wer": 0.9, "bleu": 1.0, "similarity": 0.1, "n": 2, "level": "cheap"} for s in ("0", "20")}}
    dev = {"profile": "phone-a", "device_class": "phone", "budgets": {"memory_mb": 200, "latency_ms": 2000},
           "snr_db": [0.0, 20.0], "eval_snrs": [0.0, 20.0], "channel": "awgn", "fits": True, "chosen": "fp32",
           "closest": "fp32", "failing_budget": None, "pareto": ["fp32"], "rejected": {}}
    return {"format": "semedge-plans/1", "model": MODEL, "weight_hash": "x", "task": "speech", "created": "now",
            "calibration": {"split": "val", "n_cheap": 2, "n_full": 2}, "candidates": {"fp32": cand},
            "devices": {"phone-a": dev}, "timing": {"seconds": 0}}


@pytest.mark.slow
def test_build_killed_while_exporting_or_packaging_resumes(tmp_path, env):
    _profiles(tmp_path)
    (tmp_path / "plans.json").write_text(json.dumps(_plans()))
    args = ["build", "--model", MODEL, "--quick", "--profiles", "profiles", "--plans", "plans.json", "--out", "out",
            "--n-eval", "1", "--jsc", "identity", "--no-progress"]
    pkg = tmp_path / "out" / "packages" / "phone-a"
    kill_when(args, tmp_path, env, "out/cache/onnx/.scratch.*")  # exporting the device graph
    assert absent_or_complete(pkg) is None
    kill_when(args, tmp_path, env, "out/packages/phone-a.tmp-*/manifest.json")  # the package complete, not swapped in
    absent_or_complete(pkg)
    run(args, tmp_path, env, timeout=1800)
    assert absent_or_complete(pkg) and (tmp_path / "out" / "build.json").is_file()
    assert litter(tmp_path) == [] and sealed_onnx_ok(tmp_path / "out" / "cache")


# ----------------------------------------------------------------------------- a package folder and its zip (fast)

PAIR_WRITER = """
import os, signal, sys
from pathlib import Path
import semedge.core.files as f
out, n, tag = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
real, calls = os.replace, [0]
def replace(a, b):  # SIGKILL this writer at its n-th rename (0: never)
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
    real(a, b)
f.os.replace = replace
with f.atomic_dir_and_file(out / "pkg", out / "pkg.zip") as (tmp, ztmp):
    (tmp / "manifest.json").write_text(tag)
    ztmp.write_text(tag)
print(calls[0])
"""


def _write_pair(out: Path, kill_at: int, tag: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PAIR_WRITER, str(out), str(kill_at), tag], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, OMP_NUM_THREADS="1"))


def _pair(out: Path) -> tuple[str | None, str | None]:
    """(the folder's manifest, the zip's text), None where absent."""
    m, z = out / "pkg" / "manifest.json", out / "pkg.zip"
    return (m.read_text() if m.exists() else None), (z.read_text() if z.exists() else None)


@pytest.mark.parametrize("had_output", [False, True])
def test_package_folder_and_zip_killed_at_every_rename_stay_a_pair(tmp_path, had_output):
    """SIGKILL at each rename of the swap: once the next writer has cleaned the folder, the folder and
    its zip are both the old ones (or both absent) or both the new ones, and no temporary is left."""
    from semedge.core.files import clean_stale

    for n in range(1, 20):  # until the writer finishes before its n-th rename
        out = tmp_path / f"k{n}"
        out.mkdir()
        if had_output:
            assert _write_pair(out, 0, "old").returncode == 0
        r = _write_pair(out, n, "new")
        if r.returncode == 0:
            break
        assert r.returncode == -signal.SIGKILL, r.stderr
        clean_stale(out)
        old = ("old", "old") if had_output else (None, None)
        assert _pair(out) in (old, ("new", "new")), f"killed at rename {n}: {_pair(out)}"
        assert litter(out) == [] and sorted(os.listdir(out)) in ([], ["pkg", "pkg.zip"])
    assert n == (6 if had_output else 4)  # renames: the journal, the old pair aside, the new pair in


def test_export_removes_stale_temporaries_of_dead_writers_and_zips_what_it_swaps_in(tmp_path):
    """A package build removes what killed writers left beside it (their pid is dead), keeps a live
    writer's, and its zip holds exactly the folder's files."""
    from conftest import tiny_whisper_package

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = [f"pkg.tmp-{dead}", f".scratch.{dead}.ab12.tmp", f"pkg.old-{dead}", f"pkg.zip.old-{dead}"]
    for name in stale:
        (tmp_path / name).mkdir()
    (tmp_path / f".pkg.{dead}.x1y2.tmp.zip").write_bytes(b"half")
    live = tmp_path / f".scratch.{os.getppid()}.cd34.tmp"  # a running process's: kept
    live.mkdir()
    _, _, pkg = tiny_whisper_package(tmp_path / "pkg")
    assert sorted(os.listdir(tmp_path)) == sorted(["pkg", "pkg.zip", live.name])
    with zipfile.ZipFile(tmp_path / "pkg.zip") as z:
        zipped = {n[len("pkg/"):]: z.read(n) for n in z.namelist() if not n.endswith("/")}
    assert zipped == {p.relative_to(pkg).as_posix(): p.read_bytes() for p in pkg.rglob("*") if p.is_file()}
    assert complete(pkg)
