"""`semedge federate --engine deployment`: a real SuperLink and SuperNodes as processes on 127.0.0.1.

Fast: the process manager starts and ends every process (also on an error and on SIGTERM), the
generated app passes Flower's own validation, bad input exits 2 through the `semedge` script.
Slow (minutes: Flower starts one ClientApp process per message): 2 clients x 1 round, and a
SuperNode killed mid-round.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytest.importorskip("flwr")

from semedge.core.errors import UserError  # noqa: E402
from semedge.semcom.federated import deploy as D  # noqa: E402
from semedge.semcom.federated.config import FederateConfig  # noqa: E402

SEMEDGE = str(Path(sys.executable).parent / "semedge")


def _cfg(**kw) -> FederateConfig:
    base = dict(model="tiny:whisper:0", clients=2, rounds=1, local_steps=1, n_train=2, n_test=1, batch_size=2,
                non_iid="speeds", personal_steps=0, eval_snrs=("inf",), lr=1e-2, lora_lr=1e-2, server_lr=1e-2,
                engine="deployment")
    return FederateConfig(**{**base, **kw}).validate()


def _alive(pids) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


# ----------------------------------------------------------------------------- fast

def test_loopback_starts_real_processes_and_an_error_inside_ends_them_all(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with D.Loopback(1, tmp_path / "logs") as lb:
            pids = lb.ours()
            cmds = [" ".join(psutil.Process(p).cmdline()) for p in pids]
            assert len(pids) >= 2 and D._listening(lb.port)  # superlink (+ its superexec) and one supernode
            assert any("flower_launch superlink --insecure" in c for c in cmds), cmds
            assert any("flower_launch supernode --insecure" in c for c in cmds), cmds
            home = lb.home
            raise RuntimeError("boom")
    assert _alive(pids) == [] and lb.ours() == []
    assert not home.exists() and not D._listening(lb.port)
    assert (tmp_path / "logs" / "superlink.log").exists() and (tmp_path / "logs" / "supernode-0.log").exists()


def test_sigterm_to_semedge_federate_ends_every_process_it_started(tmp_path):
    out = tmp_path / "out"
    p = subprocess.Popen([SEMEDGE, "federate", "--engine", "deployment", "--model", "tiny:whisper:0", "--clients", "1",
                          "--rounds", "1", "--n-train", "2", "--n-test", "1", "--personal-steps", "0", "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.monotonic()  # wait until the SuperNode is up, i.e. the whole tree exists
        while "Starting Flower SuperNode" not in _read(out / "deployment" / "supernode-0.log"):
            assert p.poll() is None, p.stdout.read()
            assert time.monotonic() - t0 < 300, "the SuperNode did not start"
            time.sleep(0.5)
        tree = [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
        assert len(tree) >= 3
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 128 + signal.SIGTERM
        time.sleep(1.0)
        assert _alive(tree) == []
    finally:
        if p.poll() is None:
            p.kill()


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def test_the_generated_app_passes_flowers_validation_and_carries_the_run(tmp_path):
    import tomli
    from flwr.common.config import validate_config

    cfg = _cfg(local_steps=3, seed=7)
    app = D.write_app(tmp_path / "app", cfg, tmp_path / "out")
    doc = tomli.loads((app / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(doc, check_module=True, project_dir=app)
    assert ok, errors
    run = doc["tool"]["flwr"]["app"]["config"]
    assert FederateConfig.from_json(run["fed"]) == cfg and Path(run["out"]).is_absolute()
    assert sorted(p.name for p in app.iterdir()) == ["pyproject.toml"]  # no code in the FAB: semedge is installed


def test_flower_processes_run_offline_in_their_own_home(tmp_path):
    env = D.flower_env(tmp_path, "x")
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1" and env["FLWR_HOME"] == str(tmp_path)
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)


def test_bad_ports_and_quorums_name_the_option():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(UserError, match="--port"):
            D.check_port(s.getsockname()[1])
    for kw, opt in [(dict(port=70000), "--port"), (dict(engine="local", port=9000), "--port"),
                    (dict(min_clients=3), "--min-clients"), (dict(min_clients=0), "--min-clients"),
                    (dict(round_timeout_s=0.0), "--round-timeout")]:
        with pytest.raises(UserError, match=opt):
            _cfg(**kw)


def _semedge(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([SEMEDGE, "federate", *args], capture_output=True, text=True, timeout=timeout)


def test_cli_deployment_bad_input_exits_2_with_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cases = [(["--port", str(port)], "--port"), (["--clients", "0"], "--clients"),
                 (["--min-clients", "5", "--clients", "2"], "--min-clients")]
        for extra, opt in cases:
            out = tmp_path / opt.strip("-")
            r = _semedge("--engine", "deployment", "--model", "tiny:whisper:0", "--out", str(out), *extra)
            lines = r.stderr.strip().splitlines()
            assert r.returncode == 2 and len(lines) == 1 and opt in lines[0] and "fix:" in lines[0], (extra, r.stderr[-800:])
            assert not out.exists()  # nothing started, nothing written
    r = _semedge("--engine", "local", "--port", "9000")
    assert r.returncode == 2 and "--engine deployment" in r.stderr


# ----------------------------------------------------------------------------- slow: real runs

@pytest.mark.slow
def test_deployment_two_clients_one_round(tmp_path):
    seen = {}
    t0 = time.perf_counter()
    res = D.run_deployment(_cfg(), tmp_path, watch=lambda lb: seen.setdefault("lb", lb))
    wall = time.perf_counter() - t0
    r1 = res["rounds"][0]
    assert r1["sampled"] == 2 and r1["aggregated"] == 2 and r1["failed"] == [] and res["failures"] == []
    assert set(res["wer"]["global"]) == {"0", "1"}
    assert (tmp_path / "checkpoint" / "manifest.json").exists()
    assert json.loads((tmp_path / "federated.json").read_text())["rounds"] == res["rounds"]
    for c in res["accounting"]["phases"]["train"][0]["clients"].values():
        assert c["up"]["activations"] == c["down"]["grads"] > 0 and c["up"]["params"] > 0
    log = (tmp_path / "deployment" / "supernode-0.log").read_text()
    assert "Receiving: train.step message" in log  # the ClientApp ran in SuperNode 0's process tree
    assert seen["lb"].ours() == []  # every process ended
    print(f"deployment 2 clients x 1 round: {wall:.0f} s, round {r1['seconds']:.1f} s")


@pytest.mark.slow
def test_a_supernode_killed_mid_round_drops_out_and_the_round_completes(tmp_path):
    """SuperNode 1 is SIGKILLed (with its ClientApp) when its first train.step arrives: the
    SuperLink answers for it once two heartbeats are missed, the round averages client 0 alone."""
    killed = {}

    def kill_at_first_step(lb):
        log = lb.logs / "supernode-1.log"
        while "Receiving: train.step message" not in _read(log):
            time.sleep(0.2)
        lb.kill_node(1)
        killed["t"], killed["lb"] = time.time(), lb

    res = D.run_deployment(_cfg(local_steps=2), tmp_path, watch=kill_at_first_step)
    assert "t" in killed
    r1 = res["rounds"][0]
    assert r1["sampled"] == 2 and r1["aggregated"] == 1
    assert [f["partition"] for f in r1["failed"]] == [1] and r1["failed"][0]["phase"] == "train"
    print("killed-client failure:", r1["failed"][0]["reason"], f"round {r1['seconds']:.1f} s")
    assert set(res["wer"]["global"]) == {"0"}  # the dead client is not evaluated
    assert (tmp_path / "checkpoint" / "manifest.json").exists()
    assert killed["lb"].ours() == []
