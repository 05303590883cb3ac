"""`--engine deployment`: a real Flower deployment on loopback, every part its own process.

    semedge federate (this process: starts, watches, tears down; loads no model)
      ├─ flower-superlink --insecure --port P          Fleet + Control + Runtime HTTP APIs on 127.0.0.1:P
      │                                                 (both CLIs through flower_launch.py: see there)
      │    └─ flower-superexec ─ flwr-serverapp          the ServerApp (deploy_app.py): run_server()
      ├─ flower-supernode --insecure --superlink 127.0.0.1:P --port Qi --node-config partition-id=i ...
      │    └─ flower-superexec ─ flwr-clientapp          one process per message (flower_client.py)
      └─ flwr run APP semedge --stream                  submits the run, streams the ServerApp's log

The app handed to `flwr run` is a folder holding only a pyproject.toml: its components name
modules of the installed semedge package, and its run config carries the FederateConfig and
OUT. Flower's own processes see FLWR_HOME in a temporary folder, telemetry and the update check
off, and no runtime dependency installation, so nothing touches the network. Every process we
start, and every process they start, carries SEMEDGE_DEPLOY_ID in its environment; teardown
ends exactly those (children first found through the process tree, then by that mark).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from semedge.core.errors import UserError
from semedge.semcom.federated.config import FederateConfig

HOST = "127.0.0.1"
START_TIMEOUT_S = 300.0  # a SuperLink or SuperNode not listening by then is reported (a loaded host is slow)
STOP_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this long
MARK = "SEMEDGE_DEPLOY_ID"
CONNECTION = "semedge"  # the SuperLink connection's name in FLWR_HOME/config.toml
APP_NAME = "semedge-federate"


def _bin(name: str) -> str:
    """A console script of this environment (flower-superlink, flwr ...)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise UserError(f"{name} is not installed beside {sys.executable}",
                        "pip install -c constraints.txt -e '.[federated]' (flwr[simulation]==1.42.0)")
    return str(path)


def _flower(which: str) -> list[str]:
    """flower-superlink / flower-supernode, through flower_launch (a ClientApp gets longer to report)."""
    _bin(f"flower-{which}")  # installed, or a clear error
    return [sys.executable, "-m", "semedge.semcom.federated.flower_launch", which]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def check_port(port: int) -> int:
    """`port` if this process can listen on it now; else UserError naming --port."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port", "give 1024-65535, or leave --port out to pick a free one")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError as e:
            raise UserError(f"--port {port}: cannot listen on {HOST}:{port} ({e.strerror})",
                            "give a free port, or leave --port out to pick one") from None
    return port


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def flower_env(home: Path, mark: str) -> dict[str, str]:
    """The environment of every Flower process: offline, its own FLWR_HOME, this venv first on PATH."""
    env = dict(os.environ)
    env.update({"FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", MARK: mark, "PYTHONUNBUFFERED": "1",
                "PATH": str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")})
    return env


def _tail(path: Path, n: int = 8) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])


class Loopback:
    """A SuperLink and `n` SuperNodes on 127.0.0.1, as separate processes; a context manager.

    Logs go to `logs`/{superlink,supernode-i,run}.log. On exit (normal, error, Ctrl-C, SIGTERM)
    every process it started, and their children, is ended."""

    def __init__(self, n: int, logs: Path, port: int = 0):
        self.n, self.logs = n, Path(logs)
        self.port = check_port(port) if port else free_port()
        self.mark = uuid.uuid4().hex
        self.home = Path(tempfile.mkdtemp(prefix="semedge-flwr-"))
        self.env = flower_env(self.home, self.mark)
        self.procs: dict[str, subprocess.Popen] = {}  # name -> process
        self._old_term = None

    # -- processes
    def spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        """Start `args` with its output in logs/<name>.log."""
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "wb") as f:
            p = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=self.env, cwd=self.home, start_new_session=True)
        self.procs[name] = p
        return p

    def _wait_listening(self, name: str, port: int) -> None:
        t0 = time.monotonic()
        while not _listening(port):
            p = self.procs[name]
            if p.poll() is not None:
                raise UserError(f"{name} exited with code {p.returncode} before listening on {HOST}:{port}: "
                                f"{_tail(self.logs / f'{name}.log', 3)}", f"see {self.logs / f'{name}.log'}")
            if time.monotonic() - t0 > START_TIMEOUT_S:
                raise UserError(f"{name} did not listen on {HOST}:{port} within {START_TIMEOUT_S:.0f} s",
                                f"see {self.logs / f'{name}.log'}; the host may be overloaded")
            time.sleep(0.2)

    def start(self) -> "Loopback":
        self.spawn("superlink", [*_flower("superlink"), "--insecure", "--host", HOST, "--port", str(self.port),
                                 "--disable-runtime-dependency-installation"])
        self._wait_listening("superlink", self.port)
        for i in range(self.n):
            self.start_node(i)
        self._write_connection()
        return self

    def start_node(self, i: int) -> subprocess.Popen:
        """SuperNode i: partition-id=i of n, its ClientApp runtime API on a free port."""
        port = free_port()
        p = self.spawn(f"supernode-{i}", [
            *_flower("supernode"), "--insecure", "--superlink", f"{HOST}:{self.port}", "--host", HOST,
            "--port", str(port), "--node-config", f"partition-id={i} num-partitions={self.n}"])
        self._wait_listening(f"supernode-{i}", port)
        return p

    def kill_node(self, i: int) -> None:
        """SIGKILL SuperNode i and its children at once, as a device that loses power (fault drills, tests)."""
        p = self.procs[f"supernode-{i}"]
        for q in [*_children(p.pid), p.pid]:
            _signal(q, signal.SIGKILL)
        p.wait()

    def _write_connection(self) -> None:
        """FLWR_HOME/config.toml: the connection `flwr run` submits to."""
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{HOST}:{self.port}"\ninsecure = true\n')

    # -- teardown
    def ours(self) -> list[int]:
        """Pids of every live process we started or they started (the tree, and anything carrying our mark)."""
        import psutil

        pids = set()
        for p in self.procs.values():
            if p.poll() is None:
                pids.add(p.pid)
            pids.update(_children(p.pid))
        for q in psutil.process_iter(["pid"]):
            try:
                if q.pid != os.getpid() and q.environ().get(MARK) == self.mark:
                    pids.add(q.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return sorted(pids)

    def stop(self) -> None:
        """SIGTERM every process of ours, SIGKILL what is left after STOP_GRACE_S; reap; remove FLWR_HOME."""
        import shutil

        pids = self.ours()
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            self._reap()
            time.sleep(0.1)
        for pid in self.ours():
            _signal(pid, signal.SIGKILL)
        for p in self.procs.values():
            try:
                p.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.home, ignore_errors=True)

    def _reap(self) -> None:
        for p in self.procs.values():
            p.poll()

    def __enter__(self) -> "Loopback":
        if threading.current_thread() is threading.main_thread():  # SIGTERM ends us through __exit__
            self._old_term = signal.signal(signal.SIGTERM, _raise_exit)
        try:
            return self.start()
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            if self._old_term is not None:
                signal.signal(signal.SIGTERM, self._old_term)
                self._old_term = None

    # -- the run
    def run_app(self, app: Path, timeout_s: float | None = None) -> int:
        """`flwr run APP semedge --stream`: submit, wait until the run ends; its exit code."""
        p = self.spawn("run", [_bin("flwr"), "run", str(app), CONNECTION, "--stream"])
        try:
            return p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise UserError(f"the deployment run did not end within {timeout_s:.0f} s",
                            f"see {self.logs / 'run.log'}; raise --round-timeout or use fewer --clients") from None


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ----------------------------------------------------------------------------- the app and the run

def write_app(folder: Path, cfg: FederateConfig, out: Path) -> Path:
    """A Flower app folder (pyproject.toml only) whose components are semedge's apps and whose
    run config carries `cfg` and `out`."""
    import tomli_w

    folder.mkdir(parents=True, exist_ok=True)
    doc = {
        "project": {"name": APP_NAME, "version": "1.0.0", "license": "Apache-2.0", "dependencies": [],
                    "description": "semedge federated split fine-tuning (generated by semedge federate)"},
        "tool": {"flwr": {"app": {
            "publisher": "semedge",
            "components": {"serverapp": "semedge.semcom.federated.deploy_app:server_app",
                           "clientapp": "semedge.semcom.federated.flower_client:client_app"},
            "config": {"fed": cfg.to_json(), "out": str(Path(out).resolve())}}}},
    }
    (folder / "pyproject.toml").write_text(tomli_w.dumps(doc))
    return folder


def run_timeout(cfg: FederateConfig) -> float:
    """An upper bound on a whole run: every message exchange may take round_timeout_s."""
    exchanges = 4 + cfg.rounds * (cfg.local_steps + 1) + (cfg.personal_steps + 3 if cfg.personal_steps else 0)
    return START_TIMEOUT_S + exchanges * cfg.round_timeout_s


def run_deployment(cfg: FederateConfig, out, watch=None) -> dict:
    """The run on a loopback deployment: SuperLink + cfg.clients SuperNodes, then `flwr run`.

    `watch(loopback)`, if given, runs in a thread once the processes are up (fault drills).
    The results are those the ServerApp wrote to OUT/federated.json."""
    out = Path(out).resolve()
    logs = out / "deployment"
    result = out / "federated.json"
    started = time.time()
    with Loopback(cfg.clients, logs, cfg.port) as lb:
        from semedge.semcom.federated.flower_server import log

        log(f"federate: SuperLink on {HOST}:{lb.port}, {cfg.clients} SuperNodes; logs in {logs}")
        if watch is not None:
            threading.Thread(target=watch, args=(lb,), daemon=True).start()
        app = write_app(lb.home / "app", cfg, out)
        code = lb.run_app(app, run_timeout(cfg))
    if code != 0 or not result.exists() or result.stat().st_mtime < started:
        raise UserError(f"the deployment run ended without results (flwr run exit {code}): {_tail(logs / 'run.log', 4)}",
                        f"see {logs}/run.log and {logs}/supernode-*.log")
    return json.loads(result.read_text())
