"""Load test of `semedge serve` over loopback, and the client-server WER check.

    python benchmarks/server_load.py [--quick] [--wer-check N] [--messages M] [--in-thread]
    python benchmarks/server_load.py --engine local,ray --clients 1,4,8,16 --messages 100 --fault --wer-check 0
    python benchmarks/server_load.py --soak [--soak-model tiny:whisper:0] [--backend torch]

1. Builds a whisper-base package (identity JSC; the decoder sees the content plus
   --tail-frames silence frames, 300 by default) under a temp dir. The server decodes
   with --backend (CTranslate2 int8 for Whisper by default), --workers batches at once.
2. Encodes test-split utterances once with the ONNX device runner (numpy + ORT),
   sends them through the numpy link (AWGN, 10 dB) and keeps the .npy bodies.
3. Starts `semedge serve` (a real subprocess; --in-thread: uvicorn in this process)
   and sends M messages with 1, 4 and 8 concurrent clients: messages/s, p50/p95
   latency, errors. Goal: >= 3x the throughput at 8 clients vs 1 (dynamic batching).
   --engine local,ray runs each level against both hosts in one run (Ray Serve: --replicas
   decoder replicas); every message has its own id (X-Semedge-Message-Id) and is retried with it.
   --fault (ray): 8 clients x 200 messages with 2 replicas, one replica killed (SIGKILL) after a
   third of them: lost (no 200 after retries), duplicated (answers replayed from the cache),
   p95 of the messages sent in the 10 s after the kill.
4. WER check: the same utterances through semcom.system.run_link in process vs
   device runner -> link -> HTTP -> server, at 10 dB AWGN: with the device's own
   noise (numpy RNG), with the very noise run_link drew (so only the runtime
   differs), and noiseless.

Writes benchmarks/results/server_load.json.

--soak (only this): one package (--soak-model, a random JSC with k=16) behind two `semedge serve`
processes at once, one plain and one with --auth (a token per client) and TLS (a self-signed
certificate the clients pin); --soak-clients x --soak-messages messages to each, in rounds that
alternate which server goes first. Per server: lost (no 200 after retries), 5xx answers, p50/p95,
server CPU per message, RSS after the warm-up and at the end (growth %); and what auth + TLS add
per message. Writes benchmarks/results/server_soak.json; exit 1 if a message was lost or answered 5xx.

--mixed (only this; issue 16): one `semedge serve` hosting a speech package (--model, identity
JSC, --tail-frames), a text package (--mixed-text-model, a random JSC with k=24) and an image
package (the shipped image codec), and --mixed-clients clients (8) each sending speech, text and
image messages interleaved (--mixed-messages per task, --mixed-rounds times each, AWGN 10 dB
applied once on the device side). The reference: each package alone behind its own `semedge
serve`, every message sent once. Reports errors, per-task p50/p95 latency and whether every
mixed-load answer equals the single-task one; writes benchmarks/results/server_mixed.json;
exit 1 on an error or a differing answer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "server_load.json"
SNR_DB = 10.0
CHANNEL = "awgn"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Subprocess:
    """`semedge serve` in a child process, stopped on exit."""

    def __init__(self, pkgs_dir: Path, max_batch: int, max_wait_ms: float, threads: int | None = None,
                 backend: str = "auto", workers: int = 1, engine: str = "local", replicas: int = 1,
                 extra: list[str] = (), client_kw: dict | None = None, startup_s: float = 300.0):
        """extra: more `semedge serve` options (--auth, --ssl-*); client_kw: httpx options for /healthz;
        startup_s: how long to wait for /healthz (a niced server on a loaded host starts slowly)."""
        self.startup_s = startup_s
        self.port = free_port()
        self.url = f"{'https' if '--ssl-certfile' in extra else 'http'}://127.0.0.1:{self.port}"
        self.client_kw = client_kw or {}
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        cmd = [sys.executable, "-m", "semedge.cli", "serve", "--packages", str(pkgs_dir), "--port", str(self.port),
               "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--log-level", "warning",
               "--backend", backend, "--workers", str(workers)]
        if threads:
            cmd += ["--threads", str(threads)]
        if engine == "ray":
            cmd += ["--engine", "ray", "--replicas", str(replicas), "--ray-num-cpus", "0.5"]
        cmd += list(extra)
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self):
        import httpx

        t0 = time.monotonic()
        while time.monotonic() - t0 < self.startup_s:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError("semedge serve exited:\n" + self.log.read().decode(errors="replace")[-3000:])
            try:
                if httpx.get(self.url + "/healthz", timeout=2, **self.client_kw).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__()  # stop the server that did not come up
        raise RuntimeError(f"semedge serve did not answer /healthz within {self.startup_s:.0f} s")

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def load_level(url: str, pid: str, bodies: list[bytes], clients: int, n_messages: int, tag: str = "",
               on_progress=None, clients_kw: list[dict] | None = None) -> dict:
    """`clients` threads, each with its own connection, send n_messages in all (one at a time each),
    each with its own message id, retried (same id) on 502/503/504 or no answer, up to 8 tries.
    clients_kw: httpx.Client options per client (its token header, the CA to verify)."""
    import httpx

    lat, starts, errors, replays, lock = [], [], [], [0], threading.Lock()
    n5xx = [0]
    counter = iter(range(n_messages))
    done = [0]

    def post(c, i):
        for attempt in range(8):
            try:
                r = c.post(f"{url}/v1/decode", params={"package": pid}, content=bodies[i % len(bodies)],
                           headers={"content-type": "application/x-npy", "x-semedge-message-id": f"{tag}{i}"})
                if r.status_code >= 500:
                    with lock:
                        n5xx[0] += 1
                if r.status_code not in (502, 503, 504):
                    return r
            except httpx.HTTPError as e:
                r = e
            time.sleep(min(2.0, 0.2 * 2 ** attempt))
        return r

    def worker(kw: dict):
        with httpx.Client(timeout=300, **kw) as c:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t = time.perf_counter()
                r = post(c, i)
                ok = getattr(r, "status_code", None) == 200
                dt = time.perf_counter() - t
                with lock:
                    if ok:
                        lat.append(dt), starts.append(t)
                        replays[0] += bool(r.json().get("replayed"))
                    else:
                        errors.append(str(getattr(r, "status_code", r)))
                    done[0] += 1
                    n_done = done[0]
                if on_progress:
                    on_progress(n_done)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=((clients_kw or [{}] * clients)[i],)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array(lat) * 1000 if lat else np.array([math.nan])
    return {"clients": clients, "messages": n_messages, "ok": len(lat), "errors": len(errors), "lost": len(errors),
            "http_5xx": n5xx[0],
            "replayed": replays[0], "error_samples": errors[:3], "wall_s": round(wall, 3),
            "messages_per_s": round(len(lat) / wall, 3),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "_lat": lat, "_starts": starts}


def kill_one_replica() -> int | None:
    """SIGKILL one Ray Serve Decoder replica process (Ray restarts it); its PID."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        if "ServeReplica:semedge:Decoder" in " ".join(p.info["cmdline"] or []):
            p.kill()
            return p.pid
    return None


def fault_run(pkgs_dir: Path, pid: str, bodies: list[bytes], args, n_clients: int = 8, n_msgs: int = 200) -> dict:
    """Ray Serve with 2 replicas; one killed after a third of the messages."""
    killed = {}

    def progress(n):
        if n >= n_msgs // 3 and not killed:
            killed["t"], killed["pid"] = time.perf_counter(), kill_one_replica()

    with Subprocess(pkgs_dir, args.max_batch, args.max_wait_ms, args.server_threads, args.backend, args.workers,
                    engine="ray", replicas=2) as url:
        load_level(url, pid, bodies, 2, 4, tag="warm-")
        lv = load_level(url, pid, bodies, n_clients, n_msgs, tag="fault-", on_progress=progress)
    during = [d for d, s in zip(lv["_lat"], lv["_starts"]) if killed and 0 <= s - killed["t"] + d and s < killed["t"] + 10]
    lv["killed_pid"] = killed.get("pid")
    lv["p95_ms_recovery"] = round(1000 * float(np.percentile(during, 95)), 1) if during else None
    lv["duplicated"] = lv["replayed"]  # without the replay cache these would have been decoded twice
    return lv


def run_levels(url: str, pid: str, bodies: list[bytes], levels: list[int], n_msgs: int, engine: str) -> list[dict]:
    """Each concurrency level against one server, with the batch sizes it decoded."""
    out = []
    for c in levels:
        before = batch_hist(url)
        lv = load_level(url, pid, bodies, c, n_msgs, tag=f"{engine}-{c}-")
        after = batch_hist(url)
        lv = {k: v for k, v in lv.items() if not k.startswith("_")}
        lv["batches"] = {s: after.get(s, 0) - before.get(s, 0) for s in after if after.get(s, 0) - before.get(s, 0)}
        out.append(lv)
        print(f"{engine} {c} clients: {lv['messages_per_s']:.2f} msg/s, p50 {lv['p50_ms']:.0f} ms, "
              f"p95 {lv['p95_ms']:.0f} ms, errors {lv['errors']}, replayed {lv['replayed']}, batches {lv['batches']}", flush=True)
    return out


def batch_hist(url: str) -> dict:
    import httpx

    out = {}
    for ln in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if ln.startswith("semedge_batch_size_total{"):
            size = int(ln.split('size="')[1].split('"')[0])
            out[size] = int(float(ln.split()[-1]))
    return out


def wer_check(split, utt, symbols, url, pid) -> dict:
    """In-process run_link vs device runner -> link -> HTTP -> server: WER at 10 dB (own noise,
    the same noise) and noiseless."""
    import torch

    from semedge.runtime.client import send
    from semedge.runtime.link import apply_channel, channel_uses
    from semedge.semcom.metrics import normalizer_name, wer
    from semedge.semcom.system import run_link

    refs = [u.text for u in utt]
    n = len(utt)
    out = {"utterances": n}
    hyp_cache = {}
    for label, snr in (("awgn_10db", SNR_DB), ("awgn_10db_same_noise", SNR_DB), ("noiseless", math.inf)):
        t = time.perf_counter()
        if snr not in hyp_cache:
            hyp_cache[snr] = run_link(split, [u.audio for u in utt], CHANNEL, snr, seed=0).hyps
        hyp_in = hyp_cache[snr]
        t_in = time.perf_counter() - t
        t = time.perf_counter()
        if label.endswith("same_noise"):
            # the noise run_link drew (torch generator, seed 0, one message at a time), applied by the numpy link
            gen = torch.Generator().manual_seed(0)
            hyp_net = []
            for s in symbols:
                z = torch.randn(1, channel_uses(s.size), 2, generator=gen).double().numpy()
                rx = apply_channel(s[None], None, z[..., 0] + 1j * z[..., 1], snr)[0]
                hyp_net.append(send(url, pid, rx)["text"][0])
        else:
            rng = np.random.default_rng(0)
            hyp_net = [send(url, pid, s, channel=CHANNEL, snr_db=snr, rng=rng)["text"][0] for s in symbols]
        t_net = time.perf_counter() - t
        w_in, w_net = 100 * wer(refs, hyp_in), 100 * wer(refs, hyp_net)
        same = sum(a == b for a, b in zip(hyp_in, hyp_net))
        out[label] = {"wer_in_process": round(w_in, 2), "wer_over_loopback": round(w_net, 2), "normalizer": normalizer_name(),
                      "diff_points": round(w_net - w_in, 2), "identical_texts": same,
                      "within_0_5_points": abs(w_net - w_in) <= 0.5,
                      "seconds_in_process": round(t_in, 1), "seconds_over_loopback": round(t_net, 1)}
        print(f"WER {label}: in-process {w_in:.2f} vs loopback {w_net:.2f} ({same}/{n} identical texts)", flush=True)
    return out


# ----------------------------------------------------------------------------- soak (issue 20)

SOAK_RESULTS = ROOT / "benchmarks" / "results" / "server_soak.json"
SOAK_NEW_TOKENS = 8  # the soak measures the server, not long generations


def self_signed(folder: Path) -> tuple[Path, Path]:
    """(cert.pem, key.pem) for 127.0.0.1."""
    from semedge.runtime.auth import write_self_signed

    return write_self_signed(folder, "semedge soak")


def soak_package(folder: Path, model: str) -> tuple[str, list[bytes]]:
    """A package of `model` with a random JSC (k=16) under folder/packages; 8 message bodies (tones)."""
    import torch

    from semedge.export.package import build_package
    from semedge.runtime.client import to_npy
    from semedge.runtime.runner import DeviceRunner
    from semedge.runtime.package import Package
    from semedge.semcom.jsc import JSCCodec, JSCConfig
    from semedge.semcom.models import load_source
    from semedge.semcom.split import build_split

    loaded = load_source(model)
    torch.manual_seed(1)
    split = build_split(loaded, JSCCodec(JSCConfig(d_model=loaded.d_model, k=16, hidden=64)))
    pkg = Package.load(build_package(split, folder / "packages" / "soak", optimize=False))
    runner, t = DeviceRunner(pkg), np.arange(16000) / 16000
    bodies = [to_npy(runner.encode_audio((0.3 * np.sin(2 * np.pi * f * t[: 4000 * (1 + i % 4)])).astype(np.float32)))
              for i, f in enumerate(range(200, 1000, 100))]
    return pkg.package_id, bodies


def soak_security(folder: Path, clients: int) -> tuple[list[str], list[dict], dict]:
    """(serve options, httpx options per client, for /healthz): TLS with a self-signed certificate,
    an auth file with one device (token) per client; limits raised so no client is throttled."""
    import yaml

    from semedge.runtime.auth import add_device

    cert, key = self_signed(folder)
    auth = folder / "auth.yaml"
    tokens = [add_device(auth, f"soak-{i}", ["*"]) for i in range(clients)]
    data = yaml.safe_load(auth.read_text())
    data["limits"] = {"rate_per_s": 10000, "burst": 10000, "max_concurrent": 4}
    auth.write_text(yaml.safe_dump(data))
    kws = [{"verify": str(cert), "headers": {"authorization": f"Bearer {t}"}} for t in tokens]
    return ["--auth", str(auth), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)], kws, kws[0]


class Probe:
    """A server process's CPU seconds and RSS, sampled between rounds (psutil)."""

    def __init__(self, pid: int):
        import psutil

        self.p = psutil.Process(pid)
        self.cpu_s, self.rss = 0.0, []

    def cpu(self) -> float:
        t = self.p.cpu_times()
        return t.user + t.system

    def round(self, run):
        c0 = self.cpu()
        out = run()
        self.cpu_s += self.cpu() - c0
        self.rss.append(self.p.memory_info().rss)
        return out


def soak_figures(levels: list[dict], probe: Probe, rss_warm: int) -> dict:
    lat = np.concatenate([np.array(x["_lat"]) for x in levels]) * 1000
    n = sum(x["messages"] for x in levels)
    return {"messages": n, "ok": sum(x["ok"] for x in levels), "lost": sum(x["lost"] for x in levels),
            "http_5xx": sum(x["http_5xx"] for x in levels), "median_ms": round(float(np.median(lat)), 2),
            "p95_ms": round(float(np.percentile(lat, 95)), 2),
            "messages_per_s": round(sum(x["ok"] for x in levels) / sum(x["wall_s"] for x in levels), 1),
            "server_cpu_ms_per_message": round(1000 * probe.cpu_s / n, 3),
            "rss_mb_after_warmup": round(rss_warm / 2**20, 1), "rss_mb_end": round(probe.rss[-1] / 2**20, 1),
            "rss_mb_peak": round(max(probe.rss) / 2**20, 1),
            "rss_growth_pct": round(100 * (probe.rss[-1] - rss_warm) / rss_warm, 2)}


def soak_run(servers: dict, pid: str, bodies: list[bytes], args) -> dict:
    """Both servers side by side: a warm-up, then `soak_rounds` rounds, the order alternating,
    each sending messages/rounds from every client to each server."""
    per_round = args.soak_clients * args.soak_messages // args.soak_rounds
    probes = {k: Probe(sv.proc.pid) for k, (sv, _, _) in servers.items()}
    for k, (_, url, kws) in servers.items():
        load_level(url, pid, bodies, args.soak_clients, 10 * args.soak_clients, tag=f"warm-{k}-", clients_kw=kws)
    warm = {k: pr.p.memory_info().rss for k, pr in probes.items()}
    levels = {k: [] for k in servers}
    for r in range(args.soak_rounds):
        for k in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
            _, url, kws = servers[k]
            lv = probes[k].round(lambda: load_level(url, pid, bodies, args.soak_clients, per_round,
                                                    tag=f"soak-{k}-{r}-", clients_kw=kws))
            levels[k].append(lv)
            print(f"round {r + 1}/{args.soak_rounds} {k}: {lv['ok']}/{lv['messages']} ok, p50 {lv['p50_ms']:.1f} ms, "
                  f"RSS {probes[k].rss[-1] / 2**20:.0f} MB", flush=True)
    return {k: soak_figures(levels[k], probes[k], warm[k]) for k in servers}


def soak_main(args) -> int:
    """--soak: the same tiny package behind `semedge serve` twice at once, plain and with auth + TLS."""
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="semedge-soak-") as tmp:
        folder = Path(tmp)
        pid, bodies = soak_package(folder, args.soak_model)
        extra, kws, health_kw = soak_security(folder, args.soak_clients)
        common = (folder / "packages", args.max_batch, args.max_wait_ms, args.server_threads, args.backend, args.workers)
        flags = ["--max-new-tokens", str(SOAK_NEW_TOKENS), "--log-level", "warning"]
        plain, secure = Subprocess(*common, extra=flags), Subprocess(*common, extra=flags + extra, client_kw=health_kw)
        with plain as plain_url, secure as secure_url:
            servers = {"plain": (plain, plain_url, None), "auth_tls": (secure, secure_url, kws)}
            figures = soak_run(servers, pid, bodies, args)
    return soak_report(figures, args, time.time() - t_start)


def soak_report(figures: dict, args, seconds: float) -> int:
    from semedge.core.files import write_atomic

    p, s = figures["plain"], figures["auth_tls"]
    cost = {"median_ms_added": round(s["median_ms"] - p["median_ms"], 2),
            "median_ratio": round(s["median_ms"] / p["median_ms"], 3),
            "server_cpu_ms_added": round(s["server_cpu_ms_per_message"] - p["server_cpu_ms_per_message"], 3),
            "server_cpu_ratio": round(s["server_cpu_ms_per_message"] / p["server_cpu_ms_per_message"], 3)}
    result = {"benchmark": "server_soak", "model": args.soak_model, "backend": args.backend, "jsc": "random, k=16",
              "clients": args.soak_clients, "messages_per_client": args.soak_messages, "rounds": args.soak_rounds,
              "max_new_tokens": SOAK_NEW_TOKENS, "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
              "workers": args.workers, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                   "load_avg_at_end": os.getloadavg()},
              "servers": figures, "auth_tls_cost_per_message": cost, "seconds": round(seconds, 1)}
    print(f"{'server':>9} {'ok':>5} {'lost':>4} {'5xx':>4} {'p50 ms':>7} {'p95 ms':>7} {'msg/s':>6} {'cpu ms/msg':>10} "
          f"{'RSS MB warm/end':>16} {'growth':>7}")
    for k, f in figures.items():
        print(f"{k:>9} {f['ok']:>5} {f['lost']:>4} {f['http_5xx']:>4} {f['median_ms']:>7.2f} {f['p95_ms']:>7.2f} "
              f"{f['messages_per_s']:>6.1f} {f['server_cpu_ms_per_message']:>10.3f} "
              f"{f['rss_mb_after_warmup']:>7.1f}/{f['rss_mb_end']:<8.1f} {f['rss_growth_pct']:>6.2f}%")
    print(f"auth + TLS per message: median {cost['median_ms_added']:+.2f} ms ({cost['median_ratio']:.3f}x), "
          f"server CPU {cost['server_cpu_ms_added']:+.3f} ms ({cost['server_cpu_ratio']:.3f}x)")
    write_atomic(SOAK_RESULTS, json.dumps(result, indent=2, default=str))
    print(f"wrote {SOAK_RESULTS.relative_to(ROOT)}")
    bad = any(f["lost"] or f["http_5xx"] for f in figures.values())
    return 1 if bad else 0


# ----------------------------------------------------------------------------- mixed load (--mixed)


def mixed_packages(root: Path, args) -> dict:
    """{task: (package, [(body, query params)])}: one package per task under root/<task>, and its
    messages (the device runners' symbols through AWGN at SNR_DB, as .npy bodies)."""
    import torch

    from semedge.export.image_package import build_image_package
    from semedge.export.package import build_package
    from semedge.runtime.client import apply_link, to_npy
    from semedge.runtime.package import Package
    from semedge.runtime.runner import DeviceRunner
    from semedge.semcom.image_data import split_patches, to_hwc_uint8
    from semedge.semcom.jsc import JSCCodec, JSCConfig, with_tail
    from semedge.semcom.models import load_source
    from semedge.semcom.split import build_split, identity_codec
    from semedge.semcom.tasks.registry import get_task
    from semedge.semcom.tasks.speech import load_split

    n, rng = args.mixed_messages, np.random.default_rng(0)
    loaded = load_source(args.model)
    tail = None if args.tail_frames == "full" else int(args.tail_frames)
    speech = Package.load(build_package(build_split(loaded, with_tail(identity_codec(loaded), tail)), root / "speech"))
    text_model = load_source(args.mixed_text_model)
    torch.manual_seed(1)
    text_split = build_split(text_model, JSCCodec(JSCConfig(d_model=text_model.d_model, k=24, hidden=64)))
    text = Package.load(build_package(text_split, root / "text", optimize=False))
    image = Package.load(build_image_package(root / "image"))
    runners = {t: DeviceRunner(p) for t, p in (("speech", speech), ("text", text), ("image", image))}
    out = {"speech": (speech, [runners["speech"].encode_audio(u.audio) for u in load_split("test", n, progress=False)]),
           "text": (text, [runners["text"].encode_text(x) for x in get_task("text").examples("test", n)])}
    rgbs = [to_hwc_uint8(x) for x in split_patches("test", n)[0]]  # 32 x 32 test patches
    out["image"] = (image, [runners["image"].encode_image(x) for x in rgbs])
    sizes = {"image": [x.shape[:2] for x in rgbs]}
    return {t: (pkg, [(to_npy(apply_link(sym, CHANNEL, SNR_DB, rng)),
                       {"task": t, **({"height": sizes[t][i][0], "width": sizes[t][i][1]} if t in sizes else {})})
                      for i, sym in enumerate(syms)])
            for t, (pkg, syms) in out.items()}


def mixed_post(c, url: str, pid: str, body: bytes, params: dict):
    """One decode; (answer or None, seconds, error text or None)."""
    import httpx

    t = time.perf_counter()
    try:
        r = c.post(f"{url}/v1/decode", params={"package": pid, **params}, content=body,
                   headers={"content-type": "application/x-npy"})
    except httpx.HTTPError as e:
        return None, time.perf_counter() - t, f"{type(e).__name__}: {e}"
    dt = time.perf_counter() - t
    if r.status_code != 200:
        return None, dt, f"{r.status_code}: {r.text[:200]}"
    js = r.json()
    return js.get("image", js.get("text")), dt, None


def mixed_single(url: str, pkg, msgs: list) -> list:
    """Each message once, one at a time: the single-task answers."""
    import httpx

    with httpx.Client(timeout=600) as c:
        return [mixed_post(c, url, pkg.package_id, body, params)[0] for body, params in msgs]


def mixed_jobs(tasks: dict, rounds: int) -> list[tuple[str, int]]:
    """(task, message index) interleaved task by task: speech 0, text 0, image 0, speech 1, ..., `rounds` times."""
    n = max(len(m) for _, m in tasks.values())
    one = [(t, i) for i in range(n) for t in tasks if i < len(tasks[t][1])]
    return one * rounds


def mixed_load(url: str, tasks: dict, jobs: list, clients: int) -> dict:
    """`clients` threads, client c sending jobs c, c + clients, ... in order: per job (answer, seconds, error)."""
    import httpx

    results = {}

    def worker(c_id: int):
        with httpx.Client(timeout=600) as c:
            for j in range(c_id, len(jobs), clients):
                task, i = jobs[j]
                pkg, msgs = tasks[task]
                results[j] = mixed_post(c, url, pkg.package_id, *msgs[i])

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"results": results, "wall_s": time.perf_counter() - t0}


def mixed_figures(tasks: dict, jobs: list, run: dict, single: dict) -> dict:
    """Per task: messages, errors, p50/p95 latency (ms), answers equal to the single-task run."""
    out = {}
    for task in tasks:
        mine = [(i, run["results"][j]) for j, (t, i) in enumerate(jobs) if t == task]
        ok = [r[1] for _, r in mine if r[2] is None]
        lat = np.array(ok) * 1000 if ok else np.array([math.nan])
        errs = [r[2] for _, r in mine if r[2] is not None]
        same = sum(r[0] == single[task][i] for i, r in mine if r[2] is None)
        out[task] = {"messages": len(mine), "errors": len(errs), "error_samples": errs[:3],
                     "p50_ms": round(float(np.percentile(lat, 50)), 1), "p95_ms": round(float(np.percentile(lat, 95)), 1),
                     "identical_to_single_task": same, "differing": len(mine) - len(errs) - same}
    return out


def mixed_main(args) -> int:
    """--mixed: single-task references, then the mixed load against one `semedge serve`."""
    t_start = time.time()
    tmp = tempfile.TemporaryDirectory(prefix="semedge-mixed-")
    root = Path(tmp.name) / "packages"
    try:
        tasks = mixed_packages(root, args)
        serve_kw = dict(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, threads=args.server_threads,
                        backend=args.backend, workers=args.workers, startup_s=args.mixed_startup_s)
        single = {}
        for task, (pkg, msgs) in tasks.items():
            with Subprocess(root / task, **serve_kw) as url:
                single[task] = mixed_single(url, pkg, msgs)
            print(f"single-task {task}: {len(msgs)} answers", flush=True)
        jobs = mixed_jobs(tasks, args.mixed_rounds)
        with Subprocess(root, **serve_kw) as url:
            for pkg, msgs in tasks.values():  # warm-up: one message per task
                mixed_single(url, pkg, msgs[:1])
            load_before = os.getloadavg()
            run = mixed_load(url, tasks, jobs, args.mixed_clients)
            batches = batch_hist(url)
    finally:
        tmp.cleanup()
    per_task = mixed_figures(tasks, jobs, run, single)
    result = {"benchmark": "server_mixed", "server": "semedge serve (subprocess), all three packages",
              "packages": {t: {"id": p.package_id, "model": p.model_source, "k": p.k} for t, (p, _) in tasks.items()},
              "speech_model": args.model, "text_model": args.mixed_text_model + " (random-init: no pretrained text "
              "seq2seq ships offline; its answers are not sentences, the check is that they do not change)",
              "image_codec": "semcom/assets/image-jsc (shipped)", "channel": CHANNEL, "snr_db": SNR_DB,
              "clients": args.mixed_clients, "rounds": args.mixed_rounds, "messages": len(jobs),
              "backend": args.backend, "workers": args.workers, "max_batch": args.max_batch,
              "max_wait_ms": args.max_wait_ms, "wall_s": round(run["wall_s"], 2),
              "messages_per_s": round(len(jobs) / run["wall_s"], 3), "per_task": per_task, "batches": batches,
              "errors": sum(x["errors"] for x in per_task.values()),
              "differing_answers": sum(x["differing"] for x in per_task.values()),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg_before": load_before,
                          "load_avg_after": os.getloadavg(), "note": "shared host, a training run beside it; run niced"},
              "seconds": round(time.time() - t_start, 1)}
    return mixed_report(result, args.out if args.out != RESULTS else RESULTS.with_name("server_mixed.json"))


def mixed_report(result: dict, out: Path) -> int:
    from semedge.core.files import write_atomic

    print(f"\n{result['clients']} clients, {result['messages']} messages, {result['messages_per_s']} msg/s, "
          f"batches {result['batches']}")
    print(f"{'task':>7} {'msgs':>5} {'errors':>6} {'p50 ms':>8} {'p95 ms':>8}  identical to single-task")
    for task, x in result["per_task"].items():
        print(f"{task:>7} {x['messages']:>5} {x['errors']:>6} {x['p50_ms']:>8.0f} {x['p95_ms']:>8.0f}  "
              f"{x['identical_to_single_task']}/{x['messages']}")
    write_atomic(out, json.dumps(result, indent=2, default=str))
    print(f"wrote {out}")
    return 1 if result["errors"] or result["differing_answers"] else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer messages (16 per level)")
    ap.add_argument("--messages", type=int, default=None, help="messages per concurrency level (default 50, quick 16)")
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--wer-check", type=int, default=None, help="utterances for the WER check (default 20; 0 skips)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=float, default=20.0)
    ap.add_argument("--in-thread", action="store_true", help="run the server in this process instead of `semedge serve`")
    ap.add_argument("--server-threads", type=int, default=1, help="CPU threads per decoded batch in `semedge serve`")
    ap.add_argument("--backend", default="auto", choices=("auto", "ct2", "torch"), help="the server's decoder backend")
    ap.add_argument("--workers", type=int, default=2, help="batches the server decodes at once")
    ap.add_argument("--tail-frames", default="300", help="silence frames after the content the decoder sees ('full': the 30 s window)")
    ap.add_argument("--model", default="whisper-base")
    ap.add_argument("--engine", default="local", help="local, ray, or local,ray (both in one run)")
    ap.add_argument("--replicas", type=int, default=1, help="Ray Serve decoder replicas (--engine ray)")
    ap.add_argument("--fault", action="store_true", help="also the fault run (Ray, 8 x 200, one replica killed)")
    ap.add_argument("--fault-messages", type=int, default=200, help="messages in the fault run")
    ap.add_argument("--fault-only", action="store_true", help="only the fault run (no concurrency levels, no WER check)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="the JSON to write (default benchmarks/results/server_load.json)")
    ap.add_argument("--soak", action="store_true", help="only the soak: plain vs auth + TLS side by side (issue 20)")
    ap.add_argument("--soak-model", default="tiny:whisper:0", help="model of the soak's package (random JSC, k=16)")
    ap.add_argument("--soak-clients", type=int, default=8)
    ap.add_argument("--soak-messages", type=int, default=500, help="messages per client and server")
    ap.add_argument("--soak-rounds", type=int, default=5, help="rounds, alternating which server goes first")
    ap.add_argument("--mixed", action="store_true", help="only the mixed load: speech, text and image on one server (issue 16)")
    ap.add_argument("--mixed-clients", type=int, default=8, help="concurrent clients of the mixed load")
    ap.add_argument("--mixed-messages", type=int, default=8, help="distinct messages per task in the mixed load")
    ap.add_argument("--mixed-rounds", type=int, default=3, help="times each message is sent in the mixed load")
    ap.add_argument("--mixed-text-model", default="tiny:bart:0", help="model of the mixed load's text package")
    ap.add_argument("--mixed-startup-s", type=float, default=1200.0, help="how long each server may take to start")
    args = ap.parse_args(argv)
    if args.mixed:
        if min(args.mixed_clients, args.mixed_messages, args.mixed_rounds) < 1:
            ap.error("--mixed-clients, --mixed-messages and --mixed-rounds must be >= 1")  # exit 2
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return mixed_main(args)
    if args.soak:
        if min(args.soak_clients, args.soak_messages, args.soak_rounds) < 1:
            ap.error("--soak-clients, --soak-messages and --soak-rounds must be >= 1")  # exit 2
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return soak_main(args)
    n_msgs = args.messages or (16 if args.quick else 50)
    n_wer = 20 if args.wer_check is None else args.wer_check
    levels = [int(c) for c in args.clients.split(",")]
    if args.fault_only:
        args.fault, n_wer, args.engine = True, 0, ""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from semedge.runtime.client import apply_link, send, to_npy
    from semedge.runtime.package import Package
    from semedge.runtime.runner import DeviceRunner
    from semedge.semcom.models import load_model
    from semedge.export.package import build_package
    from semedge.semcom.jsc import with_tail
    from semedge.semcom.split import build_split, identity_codec
    from semedge.semcom.tasks.speech import load_split

    t_start = time.time()
    loaded = load_model(args.model)
    tail = None if args.tail_frames == "full" else int(args.tail_frames)
    split = build_split(loaded, with_tail(identity_codec(loaded), tail))
    if args.backend != "torch":  # in process, the same decoder the server runs
        from semedge.semcom.ct2_backend import CT2Whisper

        split.server.ct2 = CT2Whisper(loaded, "int8", threads=args.server_threads)
    n_utts = max(n_wer, 8)
    utts = load_split("test", n_utts, progress=False)
    tmp = tempfile.TemporaryDirectory(prefix="semedge-load-")
    pkgs_dir = Path(tmp.name) / "packages"
    t = time.perf_counter()
    pkg = Package.load(build_package(split, pkgs_dir / "whisper-base"))
    t_export = time.perf_counter() - t
    print(f"package {pkg.package_id} built in {t_export:.1f} s", flush=True)
    runner = DeviceRunner(pkg)
    t = time.perf_counter()
    symbols = [runner.encode_audio(u.audio) for u in utts]
    t_dev = (time.perf_counter() - t) / len(utts)
    rng = np.random.default_rng(0)
    bodies = [to_npy(apply_link(s, CHANNEL, SNR_DB, rng)) for s in symbols]
    print(f"device runner: {1000 * t_dev:.0f} ms/utterance; {np.mean([s.shape[0] for s in symbols]):.0f} frames avg",
          flush=True)

    result = {
        "benchmark": "server_load", "model": args.model, "package": pkg.package_id, "jsc": "identity",
        "backend": args.backend, "workers": args.workers, "tail_frames": tail,
        "channel": CHANNEL, "snr_db": SNR_DB, "server": "in-thread" if args.in_thread else "semedge serve (subprocess)",
        "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "quick": args.quick,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "server_threads": args.server_threads,
                    "load_avg_at_start": os.getloadavg()},
        "device_runner_ms_per_utt": round(1000 * t_dev, 1), "levels": [],
    }

    if args.in_thread:
        from semedge.runtime.server import ServerConfig, create_app, serve_in_thread

        app = create_app([pkg], loader=lambda s: loaded, config=ServerConfig(
            max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, backend=args.backend, workers=args.workers,
            threads=args.server_threads))
        server = serve_in_thread(app)
    engines = [e for e in args.engine.split(",") if e]
    result["engines"] = {}
    try:
        for engine in engines:
            if engine != "local" or not args.in_thread:
                server = Subprocess(pkgs_dir, args.max_batch, args.max_wait_ms, args.server_threads, args.backend,
                                    args.workers, engine=engine, replicas=args.replicas)
            with server as url:
                send(url, pkg.package_id, symbols[0], timeout=600)  # warm up (a Ray replica loads the package)
                result["engines"][engine] = run_levels(url, pkg.package_id, bodies, levels, n_msgs, engine)
                if engine == "local":
                    result["levels"] = result["engines"]["local"]
                if n_wer and engine == engines[0]:
                    result["wer_check"] = wer_check(split, utts[:n_wer], symbols[:n_wer], url, pkg.package_id)
        if args.fault:
            lv = fault_run(pkgs_dir, pkg.package_id, bodies, args, n_msgs=args.fault_messages)
            result["fault"] = {k: v for k, v in lv.items() if not k.startswith("_")}
            print(f"fault run: killed replica pid {lv['killed_pid']}; {lv['ok']}/{lv['messages']} ok, lost {lv['lost']}, "
                  f"duplicated {lv['duplicated']}, p95 {lv['p95_ms']} ms, p95 in the 10 s after the kill "
                  f"{lv['p95_ms_recovery']} ms", flush=True)
        if n_wer and args.backend != "torch" and not args.in_thread:
            # the same check against a torch-decoder server: CTranslate2 int8 flips near-ties on the
            # device half's last bits (ONNX vs PyTorch differ by ~1e-4), PyTorch fp32 does not
            print("WER check with the torch decoder backend", flush=True)
            ct2, split.server.ct2 = split.server.ct2, None
            with Subprocess(pkgs_dir, args.max_batch, args.max_wait_ms, args.server_threads, "torch", 1) as url2:
                result["wer_check_torch_backend"] = wer_check(split, utts[:n_wer], symbols[:n_wer], url2, pkg.package_id)
            split.server.ct2 = ct2
    finally:
        tmp.cleanup()

    if "local" in result["engines"] and "ray" in result["engines"]:
        one = {e: next((x for x in lv if x["clients"] == 1), None) for e, lv in result["engines"].items()}
        if one["local"] and one["ray"]:
            result["ray_overhead_ms_per_message_1_client"] = round(one["ray"]["p50_ms"] - one["local"]["p50_ms"], 1)
    lv = {x["clients"]: x for x in result["levels"]}
    if 1 in lv and max(lv) > 1:
        top = max(lv)
        result["speedup"] = {f"{top}_vs_1": round(lv[top]["messages_per_s"] / lv[1]["messages_per_s"], 2), "goal": 3.0}
    result["machine"]["load_avg_at_end"] = os.getloadavg()
    result["seconds"] = round(time.time() - t_start, 1)

    print()
    print(f"{'engine':>6} {'clients':>7} {'msg/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'errors':>6}  batches")
    for engine, lvs in result["engines"].items():
        for x in lvs:
            print(f"{engine:>6} {x['clients']:>7} {x['messages_per_s']:>8.2f} {x['p50_ms']:>8.0f} {x['p95_ms']:>8.0f} "
                  f"{x['errors']:>6}  {x['batches']}")
    if "ray_overhead_ms_per_message_1_client" in result:
        print(f"Ray overhead per message at 1 client (p50 ray - p50 local): {result['ray_overhead_ms_per_message_1_client']} ms")
    if "speedup" in result:
        print(f"throughput {max(lv)} clients / 1 client: {list(result['speedup'].values())[0]:.2f}x (goal >= 3x)")
    for sec in ("wer_check", "wer_check_torch_backend"):
        if sec not in result:
            continue
        for k in ("awgn_10db", "awgn_10db_same_noise", "noiseless"):
            w = result[sec][k]
            print(f"{sec} {k}: in-process {w['wer_in_process']:.2f}, over loopback {w['wer_over_loopback']:.2f} "
                  f"(diff {w['diff_points']:+.2f} points, {w['identical_texts']}/{n_wer} identical)")

    from semedge.core.files import write_atomic

    write_atomic(args.out, json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out}")
    errors = sum(x["errors"] for lvs in result["engines"].values() for x in lvs) + result.get("fault", {}).get("lost", 0)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
