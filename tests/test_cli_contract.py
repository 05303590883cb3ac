"""The CLI's exit-code contract, through the installed `semedge` console script in a subprocess.

0 done; 2 bad input or usage, one line on stderr, no traceback; 3 no plan fits; 4 the ONNX
export disagrees with PyTorch; third-party warnings hidden unless `--verbose` (docs/cli.md).
Every command here fails or finishes before a model is loaded.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import semedge

SCRIPT = Path(sys.executable).parent / "semedge"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", COLUMNS="100")
ENV.pop("TRANSFORMERS_VERBOSITY", None)
BNB_LINE = "Failed to load CPU gemm_4bit_forward"


def run(*args, cwd=None, timeout=120) -> subprocess.CompletedProcess:
    assert SCRIPT.is_file(), f"{SCRIPT}: the console script is not installed (pip install -e .)"
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=timeout)


def clean(r: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert BNB_LINE not in r.stderr + r.stdout


def one_line_error(r: subprocess.CompletedProcess, code: int, *words: str) -> str:
    clean(r)
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]
    return lines[0]


def test_help():
    r = run("--help")
    clean(r)
    assert r.returncode == 0 and r.stderr == ""
    for word in ("Usage", "--version", "--verbose", "build", "profiles"):
        assert word in r.stdout


def test_version():
    r = run("--version")
    assert (r.returncode, r.stdout, r.stderr) == (0, f"semedge {semedge.__version__}\n", "")


def test_no_command_shows_help_and_exits_2():
    r = run()
    clean(r)
    assert r.returncode == 2 and "Usage" in r.stdout + r.stderr


@pytest.mark.parametrize("args, words", [
    (["nosuch"], ["no such command", "nosuch", "--help"]),                 # unknown command
    (["transmit", "--snr"], ["--snr", "requires an argument"]),            # missing value
    (["profiles", "list", "--bogus"], ["--bogus", "semedge profiles list --help"]),  # bad option
    (["profile", "m.onnx", "--device", "host", "--runs", "many"], ["--runs", "integer"]),  # bad value
    (["profiles", "show"], ["missing argument"]),                          # missing argument
])
def test_usage_errors_are_one_line_exit_2(args, words, tmp_path):
    one_line_error(run(*args, cwd=tmp_path), 2, *words)
    assert list(tmp_path.iterdir()) == []


def test_profiles_validate_exit_codes(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nmemory_budget_mb: -3\n")
    r = run("profiles", "validate", str(bad))
    clean(r)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "memory_budget_mb" in r.stderr and all(str(bad) in ln for ln in r.stderr.splitlines() if ln.strip())
    good = Path(semedge.__file__).resolve().parents[1] / "device_profiles" / "host.yaml"
    r = run("profiles", "validate", str(good))
    clean(r)
    assert r.returncode == 0, (r.stdout, r.stderr)


def test_user_error_is_one_line_exit_2(tmp_path):
    one_line_error(run("profiles", "show", "no-such-device", cwd=tmp_path), 2, "no-such-device", "fix")


@pytest.mark.parametrize("args, words", [
    (["--init", "svd"], ["--init", "random", "pca"]),
])
def test_train_bad_init_exit_2_nothing_written(args, words, tmp_path):
    r = run("train", "--model", "tiny:whisper:0", "--out", str(tmp_path / "ck"), *args, cwd=tmp_path)
    one_line_error(r, 2, *words)
    assert list(tmp_path.iterdir()) == []


# main() with stand-in commands, in a subprocess: what the real ones do after loading models
# (bitsandbytes' logger on import, a parity failure, no plan fits), without loading any.
STAND_INS = textwrap.dedent("""
    import logging, sys, warnings
    import typer
    from semedge import cli
    from semedge.core.errors import UserError

    @cli.app.command("noisy")
    def noisy():
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.")
        warnings.warn("a third-party deprecation", FutureWarning)
        logging.getLogger("semedge.server").warning("ours: kept")
        print("done")

    @cli.app.command("parity")
    def parity():
        from semedge.export.onnx import ExportParityError, ParityReport
        tol = {"max_abs_rel": 1e-3, "cosine": 0.9999}
        raise ExportParityError(ParityReport("fp32", 1.0, 1.0, 1.0, 0.5, 2, tol, False))

    class NoFit(UserError):
        exit_code = 3

    @cli.app.command("nofit")
    def nofit():
        raise NoFit("no plan fits watch (memory)", "raise --memory-mb or add candidates")

    @cli.app.command("exit3")
    def exit3():
        raise typer.Exit(3)

    sys.exit(cli.main(sys.argv[1:]))
""")


def stand_in(tmp_path, *args) -> subprocess.CompletedProcess:
    script = tmp_path / "stand_ins.py"
    script.write_text(STAND_INS)
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=ENV, timeout=120)


def test_third_party_warnings_only_with_verbose(tmp_path):
    r = stand_in(tmp_path, "noisy")
    clean(r)
    assert r.returncode == 0 and r.stdout == "done\n"
    assert "third-party deprecation" not in r.stderr
    assert "ours: kept" in r.stderr
    r = stand_in(tmp_path, "--verbose", "noisy")
    assert r.returncode == 0
    assert BNB_LINE in r.stderr and "third-party deprecation" in r.stderr


def test_expected_failures_map_to_exit_codes(tmp_path):
    one_line_error(stand_in(tmp_path, "parity"), 4, "ONNX output differs", "fix")
    one_line_error(stand_in(tmp_path, "nofit"), 3, "no plan fits")
    r = stand_in(tmp_path, "exit3")
    assert r.returncode == 3 and "Traceback" not in r.stderr


# ---------------------------------------------------------------- one name per concept, --json

def test_old_option_spellings_still_work_hidden(tmp_path):
    """--profile (now --device) and --k-keep (now --k): hidden, accepted with a deprecation line."""
    import re

    r = run("device", "bench", "nosuch.onnx", "--profile", "host", cwd=tmp_path)
    clean(r)
    assert r.returncode == 2 and "--profile is deprecated; use --device" in r.stderr and "nosuch.onnx" in r.stderr
    one_line_error(run("device", "bench", "nosuch.onnx", "--profile", "host", "--device", "host", cwd=tmp_path),
                   2, "--profile", "--device")
    one_line_error(run("device", "run", "nopkg", "--text", "hi", "--k", "3", "--k-keep", "3", cwd=tmp_path),
                   2, "--k-keep", "--k")
    for cmd in (("device", "bench"), ("device", "run")):
        shown = run(*cmd, "--help").stdout
        assert "--device" in shown and not re.search(r"--profile(?!-)|--k-keep", shown), shown


def test_profiles_validate_json(tmp_path):
    import json

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nmemory_budget_mb: -3\n")
    good = Path(semedge.__file__).resolve().parents[1] / "device_profiles" / "host.yaml"
    r = run("profiles", "validate", "--json", str(bad), str(good))
    clean(r)
    out = json.loads(r.stdout)
    assert r.returncode == 2 and out["ok"] is False and out["files"][str(good)] == []
    assert any("memory_budget_mb" in e for e in out["files"][str(bad)])
    r = run("profiles", "validate", "--json", str(good))
    assert r.returncode == 0 and json.loads(r.stdout) == {"ok": True, "files": {str(good): []}}


@pytest.mark.parametrize("args, words", [
    (["plan", "--json", "--devices", "nosuch"], ["nosuch"]),
    (["build", "--json", "--devices", ","], ["--devices"]),
    (["export", "--json", "--device", "nosuch", "--out", "pkg"], ["nosuch"]),
])
def test_json_commands_fail_as_before(args, words, tmp_path):
    """--json changes where the result goes, not the exit codes: bad input is one line, 2, stdout empty."""
    r = run(*args, cwd=tmp_path)
    one_line_error(r, 2, *words)
    assert r.stdout == ""


def test_export_json(tmp_path):
    """export --json: the package as one JSON document on stdout, the progress on stderr."""
    import json

    r = run("export", "--model", "tiny:whisper:0", "--device", "host", "--format", "fp32", "--out", str(tmp_path / "pkg"),
            "--no-optimize", "--json", cwd=tmp_path, timeout=600)  # loads and exports a model: ~20 s alone
    clean(r)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["package"] == str(tmp_path / "pkg") and out["precision"] == "fp32" and out["parity"]["ok"]
    assert out["format"] == "fp32"
    assert out["bytes"] > 0 and out["signed"] is False and out["package_id"] in r.stderr


@pytest.mark.parametrize("args, words", [
    (["plan", "--address", "auto", "--out", "p.json"], ["--address", "--ray"]),
    (["plan", "--ray", "--ray-workers", "0", "--out", "p.json"], ["--ray-workers"]),
    (["build", "--ray-workers", "2", "--out", "b"], ["--ray"]),
])
def test_ray_options_bad_input_exit_2_nothing_written(args, words, tmp_path):
    one_line_error(run(*args, cwd=tmp_path), 2, *words)
    assert list(tmp_path.iterdir()) == []


def test_serve_context_guard_needs_a_prompt(tmp_path):
    """--context-guard without --memory or --kb would guard nothing: exit 2, one line, before anything loads."""
    r = run("serve", "--packages", str(tmp_path), "--context-guard")
    one_line_error(r, 2, "--context-guard", "--memory")
