"""The Flower ServerApp (Message API, flwr 1.42): split steps with every sampled client, FedAvg (or
FedProx) over the clients' device parameters, evaluation before / after / personalised, accounting.

Per round: the strategy samples clients (`fraction`) and sends them the global parameters
(`configure_train`); then `local_steps` times the server reads every client's uplink, answers
dL/dy and takes one step on its JSC decoder (the mean of the clients' losses); after the last
step the clients send their parameters and `aggregate_train` averages them, weighted by their
number of examples. Imported only when a federated run starts.
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx

from semedge.semcom.federated.accounting import Ledger, array_bytes, text_bytes
from semedge.semcom.federated.config import FederateConfig

SIM_ATTEMPTS = 2


def log(text: str) -> None:
    """A progress line, flushed (a run lasts minutes, its output may go to a file)."""
    print(text, flush=True)


def _arrays(d: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in d.items()})


def _numpy(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in rec.items()}


def strategy_for(cfg: FederateConfig):
    """FedAvg (FedProx if --proximal-mu > 0); a round samples from the clients connected, at least --min-clients."""
    kw = dict(fraction_train=cfg.fraction, fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=1,
              min_available_nodes=cfg.min_clients)
    return FedProx(proximal_mu=cfg.proximal_mu, **kw) if cfg.proximal_mu > 0 else FedAvg(**kw)


class Driver:
    """One run's server: the SplitServer, the grid, the ledger, the messages."""

    def __init__(self, grid: Grid, cfg: FederateConfig, server):
        self.grid, self.cfg, self.server = grid, cfg, server
        self.ledger = Ledger()
        self.failures: list[dict] = []  # every client that failed or stayed silent: phase, round, node, reason

    def config(self, **kw) -> ConfigRecord:
        return ConfigRecord({"fed": self.cfg.to_json(), "jsc": self.server.jsc_config, "personal": 0, **kw})

    def count_down(self, phase: str, rnd: int, msg: Message) -> None:
        node, c = msg.metadata.dst_node_id, msg.content
        if "arrays" in c:
            self.ledger.add(phase, rnd, node, "down", "params", array_bytes(_numpy(c["arrays"])))
        if "downlink" in c:
            self.ledger.add(phase, rnd, node, "down", "grads", array_bytes(_numpy(c["downlink"])))
        conf = c["config"]
        hyps = sum(text_bytes(v) for k, v in conf.items() if k.startswith("hyp."))
        if hyps:
            self.ledger.add(phase, rnd, node, "down", "transcripts", hyps)
        self.ledger.add(phase, rnd, node, "down", "control",
                        sum(text_bytes(v) for k, v in conf.items() if not k.startswith("hyp.")))

    def send(self, phase: str, rnd: int, msgs: list[Message]) -> dict[int, Message]:
        """Send and wait (round_timeout_s); {node: reply} of the clients that answered without error."""
        for m in msgs:
            self.count_down(phase, rnd, m)
        replies = self.grid.send_and_receive(msgs, timeout=self.cfg.round_timeout_s)
        ok = {}
        for r in replies:
            node = _sender(r, msgs)
            if r.has_error():
                self.fail(phase, rnd, node, r.error.reason)
                continue
            ok[node] = r
            c = r.content
            if "uplink" in c:
                self.ledger.uplink(phase, rnd, node, _numpy(c["uplink"]))
            if "arrays" in c:
                self.ledger.add(phase, rnd, node, "up", "params", array_bytes(_numpy(c["arrays"])))
            if "metrics" in c:
                self.ledger.add(phase, rnd, node, "up", "metrics", 8 * sum(np.size(v) for v in c["metrics"].values()))
            if "info" in c:
                self.ledger.clients[node] = {"partition": int(c["info"]["partition"])}
        failed = {f["node"] for f in self.failures if f["phase"] == phase and f["round"] == rnd}
        for node in sorted({m.metadata.dst_node_id for m in msgs} - set(ok) - failed):
            self.fail(phase, rnd, node, f"no reply within {self.cfg.round_timeout_s:.0f} s (--round-timeout)")
        return ok

    def fail(self, phase: str, rnd: int, node: int, reason: str) -> None:
        """Record and report a client that failed: it drops out of the rest of this exchange's round."""
        part = self.ledger.clients.get(node, {}).get("partition")
        self.failures.append({"phase": phase, "round": rnd, "node": node, "partition": part, "reason": reason})
        log(f"federate: client {part if part is not None else '?'} (node {node}) failed in {phase} round {rnd}: "
            f"{reason}; it drops out of this round")

    def split_steps(self, phase: str, rnd: int, first: list[Message], personal: bool) -> dict[int, Message]:
        """The local steps of one round with the clients addressed by `first`; their final replies."""
        replies = self.send(phase, rnd, first)
        losses = []
        for s in range(self.cfg.local_steps if not personal else self.cfg.personal_steps):
            last = s == (self.cfg.local_steps if not personal else self.cfg.personal_steps) - 1
            ups = {n: _numpy(r.content["uplink"]) for n, r in replies.items()}
            downs, loss = self.server.step(ups, train=not personal)
            losses.append(float(np.mean(list(loss.values()))) if loss else float("nan"))
            msgs = [Message(RecordDict({"downlink": _arrays(d),
                                        "config": self.config(round=rnd, step=s, last=int(last), personal=int(personal))}),
                            dst_node_id=n, message_type="train.step") for n, d in downs.items()]
            replies = self.send(phase, rnd, msgs)
        self.losses = losses
        return replies


def _sender(reply: Message, sent: list[Message]) -> int:
    """The client a reply stands for. A SuperLink's own error reply (a node that stopped sending
    heartbeats) comes from the SuperLink's node id: find the message it answers."""
    dsts = {m.metadata.dst_node_id: m for m in sent}
    if reply.metadata.src_node_id in dsts:
        return reply.metadata.src_node_id
    by_id = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
    return by_id.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


def train_round(d: Driver, strategy, rnd: int) -> dict:
    """One federated round: sample, split steps, FedAvg. Its figures."""
    t0 = time.perf_counter()
    _wait_for_clients(d.grid, d.cfg.min_clients, d.cfg.round_timeout_s)  # the strategy would wait forever
    msgs = list(strategy.configure_train(rnd, _arrays(d.server.global_arrays), d.config(round=rnd), d.grid))
    log(f"federate: round {rnd} begins with {len(msgs)} clients")
    finals = d.split_steps("train", rnd, msgs, personal=False)
    quorum = len(finals) >= d.cfg.min_clients
    arrays = strategy.aggregate_train(rnd, list(finals.values()))[0] if quorum else None
    if arrays is not None:
        d.server.update_global(_numpy(arrays))
    d.ledger.seconds[("train", rnd)] = time.perf_counter() - t0
    parts = sorted(d.ledger.clients.get(n, {}).get("partition", n) for n in finals)
    failed = [f for f in d.failures if f["phase"] == "train" and f["round"] == rnd]
    log(f"federate: round {rnd}: {len(msgs)} sampled, {len(finals) if quorum else 0} averaged (partitions {parts}), "
        f"{len(failed)} failed, loss {np.nanmean(d.losses):.3f}, {d.ledger.seconds[('train', rnd)]:.1f} s"
        + ("" if quorum else f"; fewer than --min-clients {d.cfg.min_clients} replied: the global model is kept"))
    return {"round": rnd, "sampled": len(msgs), "aggregated": len(finals) if quorum else 0, "loss_per_step": d.losses,
            "failed": failed, "seconds": d.ledger.seconds[("train", rnd)]}


def evaluate(d: Driver, tag: str, personal: bool = False) -> dict:
    """WER with its 95% interval per client and SNR: {partition: {snr: wer_ci}}."""
    from semedge.semcom.stats import wer_ci

    nodes = sorted(d.grid.get_node_ids())
    content = {} if personal else {"arrays": _arrays(d.server.global_arrays)}
    msgs = [Message(RecordDict({**content, "config": d.config(personal=int(personal))}), dst_node_id=n,
                    message_type=MessageType.EVALUATE) for n in nodes]
    ups = d.send(f"eval-{tag}", 0, msgs)
    score_msgs = []
    for n, r in ups.items():
        up = _numpy(r.content["uplink"])
        hyps = {f"hyp.{j}": d.server.decode(up[f"symbols.{j}"], up[f"lengths.{j}"]) for j in range(len(d.cfg.eval_snrs))}
        score_msgs.append(Message(RecordDict({"config": d.config(**hyps)}), dst_node_id=n,
                                  message_type=f"{MessageType.EVALUATE}.score"))
    out = {}
    for n, r in d.send(f"eval-{tag}", 0, score_msgs).items():
        m = r.content["metrics"]
        part = str(d.ledger.clients.get(n, {}).get("partition", n))
        out[part] = {snr: wer_ci(list(zip(m[f"errors.{j}"], m[f"words.{j}"]))) for j, snr in enumerate(d.cfg.eval_snrs)}
    log(f"federate: evaluated {tag}: " + "; ".join(f"client {p}: " + ", ".join(f"{s} dB {v['value']:.3f}" for s, v in w.items())
                                                   for p, w in sorted(out.items())))
    return out


def personalise(d: Driver) -> None:
    """Every client: the final global model + personal_steps local steps on its own data (server frozen)."""
    rnd = d.cfg.rounds + 1
    msgs = [Message(RecordDict({"arrays": _arrays(d.server.global_arrays), "config": d.config(round=rnd, personal=1)}),
                    dst_node_id=n, message_type=MessageType.TRAIN) for n in sorted(d.grid.get_node_ids())]
    t0 = time.perf_counter()
    d.split_steps("personal", rnd, msgs, personal=True)
    d.ledger.seconds[("personal", rnd)] = time.perf_counter() - t0


def run_server(grid: Grid, cfg: FederateConfig, out) -> dict:
    """The whole run on `grid`: evaluate the start, train, evaluate global and personalised, save. The results."""
    from pathlib import Path

    from semedge.core.files import write_atomic
    from semedge.semcom.federated.server import SplitServer

    import json

    t0 = time.perf_counter()
    d = Driver(grid, cfg, SplitServer(cfg))
    strategy = strategy_for(cfg)
    _wait_for_clients(grid, cfg.clients, cfg.round_timeout_s)
    res = {"config": json.loads(cfg.to_json()), "wer": {}, "rounds": []}
    if cfg.evaluate:
        res["wer"]["start"] = evaluate(d, "start")
    for rnd in range(1, cfg.rounds + 1):
        res["rounds"].append(train_round(d, strategy, rnd))
    if cfg.evaluate:
        res["wer"]["global"] = evaluate(d, "global")
    if cfg.personal_steps:
        personalise(d)
        if cfg.evaluate:
            res["wer"]["personal"] = evaluate(d, "personal", personal=True)
    res["clients"] = {str(v["partition"]): _client_label(cfg, v["partition"]) for v in d.ledger.clients.values()}
    res["failures"] = d.failures
    res["accounting"] = d.ledger.to_dict()
    res["seconds"] = time.perf_counter() - t0
    out = Path(out)
    ckpt = d.server.save(out / "checkpoint", {"metrics": {"federated_wer": res["wer"]}})
    res["checkpoint"] = str(ckpt)
    write_atomic(out / "federated.json", json.dumps(res, indent=1) + "\n")
    return res


def _client_label(cfg: FederateConfig, part: int) -> str:
    from semedge.semcom.federated.data import client_label

    return client_label(cfg.non_iid, part, cfg.pool)


def _wait_for_clients(grid: Grid, n: int, timeout_s: float) -> None:
    from semedge.core.errors import UserError

    t0 = time.perf_counter()
    while len(list(grid.get_node_ids())) < n:
        if time.perf_counter() - t0 > timeout_s:
            raise UserError(f"only {len(list(grid.get_node_ids()))} of the {n} clients needed are connected after {timeout_s:.0f} s",
                            "check the SuperNodes' logs (docs/federated.md), or lower --clients / --min-clients")
        time.sleep(0.5)


def server_app(cfg: FederateConfig, out, results: dict) -> ServerApp:
    """A ServerApp running `cfg` (the simulation engine's; results land in `results`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context) -> None:
        results.update(run_server(grid, cfg, out))

    return app


def backend_config(cfg: FederateConfig, actors: int) -> dict:
    """Ray: `actors` client processes of one CPU each, no dashboard, a small object store."""
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": actors, "num_gpus": 0, "include_dashboard": False,
                          "object_store_memory": 200 * 1024 * 1024, "logging_level": "ERROR", "log_to_driver": True}}


def run_simulation(cfg: FederateConfig, out, actors: int | None = None) -> dict:
    """The run on Flower's simulation engine (Ray): cfg.clients virtual SuperNodes in this host's processes."""
    import os

    from flwr.simulation import run_simulation as flwr_run_simulation

    from semedge.semcom.federated.flower_client import client_app

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    results: dict = {}
    actors = actors or min(cfg.clients, 2)
    for attempt in range(SIM_ATTEMPTS):  # Ray gives its node 30 s to start; a loaded host can miss that
        try:
            flwr_run_simulation(server_app(cfg, out, results), client_app, num_supernodes=cfg.clients,
                                backend_config=backend_config(cfg, actors))
        except RuntimeError as e:
            log(f"federate: the simulation engine stopped ({e}); attempt {attempt + 1} of {SIM_ATTEMPTS}")
        if results:
            break
    if not results:
        from semedge.core.errors import UserError

        raise UserError("the federated run ended without results (see Flower's log above)",
                        "rerun with fewer --clients or a smaller model; check memory")
    return results
