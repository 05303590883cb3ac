"""`semedge federate`: federated split fine-tuning on Flower (docs/federated.md).

Flower (the `federated` extra) is imported only inside the command, so `semedge --help`
and the base install never need it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from semedge.core.errors import UserError


def _defaults():
    from semedge.semcom.federated.config import FederateConfig

    return FederateConfig()


def _need_flower() -> None:
    import importlib.util

    if importlib.util.find_spec("flwr") is None:
        raise UserError("semedge federate needs Flower, which is not installed",
                        "pip install -c constraints.txt -e '.[federated]' (flwr[simulation]==1.42.0)")


def _snrs(text: str) -> tuple[str, ...]:
    parts = tuple(s.strip() for s in text.split(",") if s.strip())
    if not parts:
        raise UserError(f"--eval-snr {text!r} names no SNR", "give e.g. --eval-snr inf,10")
    return parts


def print_summary(res: dict) -> None:
    """Per client: WER (95% interval) at each SNR for the start, global and personalised models; bytes and time per round."""
    from semedge.semcom.stats import fmt_ci

    wer, labels = res["wer"], res.get("clients", {})
    tags = [t for t in ("start", "global", "personal") if t in wer]
    snrs = res["config"]["eval_snrs"]
    typer.echo("client        SNR   " + "".join(f"{t:<26}" for t in tags))
    for part in sorted(wer.get("start", {}), key=int):
        for snr in snrs:
            cells = "".join(f"{fmt_ci(wer[t].get(part, {}).get(snr)):<26}" for t in tags)
            typer.echo(f"{part} {labels.get(part, ''):<10} {snr:>4}  {cells}")
    for r in res["accounting"]["phases"].get("train", []):
        per = ", ".join(f"{p}: up {c['total_up'] / 1e6:.2f} MB / down {c['total_down'] / 1e6:.2f} MB"
                        for p, c in sorted(r["clients"].items()))
        typer.echo(f"round {r['round']}: {r['seconds']:.1f} s; {per}")
    for f in res.get("failures", []):
        typer.echo(f"client {f['partition']} (node {f['node']}) failed in {f['phase']} round {f['round']}: {f['reason']}")


def register(app: typer.Typer) -> None:
    d = _defaults()

    @app.command("federate")
    def federate(
        clients: int = typer.Option(d.clients, "--clients", help="number of clients (devices)"),
        rounds: int = typer.Option(d.rounds, "--rounds", help="federated rounds"),
        local_steps: int = typer.Option(d.local_steps, "--local-steps", help="split steps per client per round"),
        fraction: float = typer.Option(d.fraction, "--fraction", help="share of clients sampled per round"),
        non_iid: str = typer.Option(d.non_iid, "--non-iid", help="voices | corpora | speeds | none"),
        engine: str = typer.Option(d.engine, "--engine", help="simulation (Flower + Ray on this host) | local (one process, no Ray) | deployment (a SuperLink and SuperNodes as processes on 127.0.0.1)"),
        model: str = typer.Option(d.model, "--model", help="the speech model (whisper-base; tiny:whisper for tests)"),
        jsc: str = typer.Option(d.jsc, "--jsc", help="start codec: default (shipped) or a checkpoint folder"),
        batch_size: int = typer.Option(d.batch_size, "--batch-size", help="utterances per local step"),
        n_train: int = typer.Option(d.n_train, "--n-train", help="training utterances per client"),
        n_test: int = typer.Option(d.n_test, "--n-test", help="test utterances per client"),
        lora: str = typer.Option(d.lora, "--lora", help="LoRA on the device's encoder, e.g. r=8,targets=encoder.self_attn"),
        lr: float = typer.Option(d.lr, "--lr", help="JSC encoder learning rate"),
        lora_lr: float = typer.Option(d.lora_lr, "--lora-lr", help="encoder LoRA learning rate"),
        server_lr: float = typer.Option(d.server_lr, "--server-lr", help="server JSC decoder learning rate"),
        proximal_mu: float = typer.Option(d.proximal_mu, "--proximal-mu", help="> 0: FedProx with this mu"),
        channel: str = typer.Option(d.channel, "--channel", help="training channel (awgn, rayleigh, rician:K=4 ...)"),
        snr_range: tuple[float, float] = typer.Option((d.snr_low, d.snr_high), "--snr-range", help="training SNR range, dB"),
        eval_snr: str = typer.Option(",".join(d.eval_snrs), "--eval-snr", help="evaluation SNRs, e.g. inf,10"),
        personal_steps: int = typer.Option(d.personal_steps, "--personal-steps", help="local steps of the personalised model"),
        actors: Optional[int] = typer.Option(None, "--actors", help="simulation: client processes (default min(clients, 2))"),
        threads: int = typer.Option(d.threads, "--threads", help="torch threads per process"),
        min_clients: int = typer.Option(d.min_clients, "--min-clients", help="a round's quorum: fewer final replies and the global model is kept"),
        round_timeout: float = typer.Option(d.round_timeout_s, "--round-timeout", help="seconds to wait for each exchange's replies; silent clients drop out"),
        port: int = typer.Option(d.port, "--port", help="deployment: the SuperLink's port on 127.0.0.1 (default: a free one)"),
        seed: int = typer.Option(d.seed, "--seed"),
        out: Path = typer.Option(Path("runs/federated"), "--out", help="folder for federated.json and the checkpoint"),
    ):
        """Federated split fine-tuning: devices train their encoder LoRA + JSC encoder on their own speech,
        the server its JSC decoder; FedAvg over Flower. Writes OUT/federated.json and OUT/checkpoint."""
        from semedge.semcom.federated.config import FederateConfig

        cfg = FederateConfig(model=model, jsc=jsc, clients=clients, rounds=rounds, local_steps=local_steps,
                             fraction=fraction, non_iid=non_iid, engine=engine, batch_size=batch_size, n_train=n_train,
                             n_test=n_test, lr=lr, lora_lr=lora_lr, server_lr=server_lr, lora=lora,
                             proximal_mu=proximal_mu, channel=channel, snr_low=snr_range[0], snr_high=snr_range[1],
                             eval_snrs=_snrs(eval_snr), personal_steps=personal_steps, seed=seed, threads=threads,
                             min_clients=min_clients, round_timeout_s=round_timeout, port=port).validate()
        if actors is not None and actors < 1:
            raise UserError(f"--actors {actors} must be >= 1", "give e.g. --actors 2")
        _need_flower()
        if cfg.engine == "deployment":
            from semedge.semcom.federated.deploy import run_deployment

            res = run_deployment(cfg, out)
        elif cfg.engine == "local":
            from semedge.semcom.federated.local_grid import run_local

            res = run_local(cfg, out)
        else:
            from semedge.semcom.federated.flower_server import run_simulation

            res = run_simulation(cfg, out, actors)
        print_summary(res)
        typer.echo(f"wrote {Path(out) / 'federated.json'} and the checkpoint {res['checkpoint']}")
