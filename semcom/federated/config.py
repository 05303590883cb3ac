"""What a federated run is: FederateConfig (plain data, no torch), sent to the clients in every message."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from semedge.core.errors import UserError

NON_IID = ("none", "voices", "corpora", "speeds")
SERVER_UPDATES = ("mean", "each")  # the server's JSC decoder steps per local step (FederateConfig.server_update)
ENGINES = ("simulation", "local", "deployment")  # local: one process, no Ray (local_grid.py)
SPEED_FACTORS = (0.9, 1.0, 1.1)  # --non-iid speeds: client i speaks at SPEED_FACTORS[i % 3] (sox tempo)


@dataclass
class FederateConfig:
    """One `semedge federate` run; the CLI's defaults are these."""

    model: str = "whisper-base"  # or tiny:whisper[:seed] (random init, tests)
    jsc: str = "default"  # the start codec: default (shipped), a checkpoint folder; tiny models: a fresh codec
    clients: int = 4
    rounds: int = 3
    local_steps: int = 5
    fraction: float = 1.0  # share of clients sampled per round (Flower's fraction_train)
    non_iid: str = "voices"
    engine: str = "simulation"
    batch_size: int = 2
    n_train: int = 16  # utterances per client
    n_test: int = 20  # test utterances per client
    lr: float = 1e-3  # device: JSC encoder
    lora_lr: float = 3e-4  # device: encoder LoRA
    server_lr: float = 1e-3  # server: JSC decoder
    lora: str = "r=8,alpha=16,targets=encoder.self_attn,proj=q_proj+v_proj"
    proximal_mu: float = 0.0  # > 0: FedProx (Flower's strategy; the proximal term in the client's update)
    channel: str = "awgn"
    snr_low: float = 0.0
    snr_high: float = 20.0
    eval_snrs: tuple[str, ...] = ("inf", "10")
    personal_steps: int = 3  # local steps of the personalised model (global + these, server side frozen)
    seed: int = 0
    threads: int = 1  # torch threads per process
    round_timeout_s: float = 600.0  # a step's replies are waited for this long; late or dead clients drop out
    min_clients: int = 1  # a round's quorum: fewer final replies and the global model is kept (docs/federated.md)
    port: int = 0  # deployment: the SuperLink's port on 127.0.0.1 (0: a free one)
    pool: int = 0  # > 0: the centralised arm: one client holding the data of `pool` non-IID clients (data.py)
    evaluate: bool = True  # False: no WER inside the run (a benchmark scores the checkpoints itself)
    server_update: str = "mean"  # the JSC decoder per local step: one step on the clients' mean loss, or "each": one per client

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "FederateConfig":
        d = json.loads(text)
        d["eval_snrs"] = tuple(d.get("eval_snrs", ()))
        allowed = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in allowed})

    def lora_spec(self):
        from semedge.semcom.training.config import LoRASpec

        return LoRASpec.parse(self.lora)

    def validate(self) -> "FederateConfig":
        _at_least(self.clients, 1, "--clients", "--clients 4")
        _at_least(self.rounds, 1, "--rounds", "--rounds 3")
        _at_least(self.local_steps, 1, "--local-steps", "--local-steps 5")
        _at_least(self.batch_size, 1, "--batch-size", "--batch-size 2")
        _at_least(self.n_train, self.batch_size, "--n-train", f"--n-train {max(16, self.batch_size)}")
        _at_least(self.n_test, 1, "--n-test", "--n-test 20")
        _at_least(self.personal_steps, 0, "--personal-steps", "--personal-steps 3")
        _at_least(self.min_clients, 1, "--min-clients", "--min-clients 1")
        _at_least(self.pool, 0, "pool", "pool=4")
        if self.pool and self.clients != 1:
            raise UserError(f"pool={self.pool} is the centralised arm: one client holds the pooled data, not {self.clients}",
                            "set clients=1 with pool > 0")
        if self.min_clients > self.clients:
            raise UserError(f"--min-clients {self.min_clients} is more than --clients {self.clients}",
                            f"give at most {self.clients}, e.g. --min-clients 1")
        if not self.round_timeout_s > 0:
            raise UserError(f"--round-timeout {self.round_timeout_s} must be > 0", "give seconds, e.g. --round-timeout 600")
        if self.port and self.engine != "deployment":
            raise UserError(f"--port {self.port} is for --engine deployment only", "drop --port, or add --engine deployment")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise UserError(f"--port {self.port} is not a TCP port", "give 1024-65535, or leave --port out to pick a free one")
        if not 0.0 < self.fraction <= 1.0:
            raise UserError(f"--fraction {self.fraction} must lie in (0, 1]", "give the share of clients per round, e.g. --fraction 0.5")
        if self.server_update not in SERVER_UPDATES:
            raise UserError(f"server_update {self.server_update!r} is unknown", f"use one of {', '.join(SERVER_UPDATES)}")
        if self.non_iid not in NON_IID:
            raise UserError(f"--non-iid {self.non_iid!r} is unknown", f"use one of {', '.join(NON_IID)}")
        if self.engine not in ENGINES:
            raise UserError(f"--engine {self.engine!r} is unknown", f"use one of {', '.join(ENGINES)}")
        if self.snr_low > self.snr_high:
            raise UserError(f"--snr-range {self.snr_low} {self.snr_high}: low is above high", "give low then high, e.g. --snr-range 0 20")
        if self.proximal_mu < 0:
            raise UserError(f"--proximal-mu {self.proximal_mu} must be >= 0", "give 0 (FedAvg) or e.g. 0.01 (FedProx)")
        if min(self.lr, self.lora_lr, self.server_lr) <= 0:
            raise UserError("--lr, --lora-lr and --server-lr must be > 0", "give e.g. --lr 1e-3")
        spec = self.lora_spec()
        if any(not t.startswith("encoder") for t in spec.targets):
            raise UserError(f"--lora targets {list(spec.targets)}: the device trains only its encoder",
                            "give encoder targets, e.g. --lora r=8,targets=encoder.self_attn")
        from semedge.core.channel_spec import parse_channel, parse_snr

        parse_channel(self.channel)
        for s in self.eval_snrs:
            parse_snr(s)
        return self


def _at_least(value: int, low: int, option: str, example: str) -> None:
    if not isinstance(value, int) or value < low:
        raise UserError(f"{option} {value} must be an integer >= {low}", f"give e.g. {example}")
