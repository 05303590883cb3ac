"""Federated vs centralised vs no fine-tuning of a whisper-base codec, split at the link (docs/federated.md).

Three arms from the same start codec (--jsc), scored on the same test speech:
- start:       no fine-tuning;
- federated:   N clients, non-IID by voice family, R rounds x S local split steps x batch B, FedAvg
               (`semedge federate`'s ServerApp and ClientApp, --engine local or simulation);
- centralised: one client holding the union of the N clients' training data, the same split step,
               R rounds x (N x F x S) steps x batch B: the same number of split steps and examples.
Two optional arms: --each, federated with the server's JSC decoder stepping once per client's uplink
(as many server steps as the centralised arm); --short, centralised with R x S steps (as many
sequential steps as the federated run, 1/N of the examples).
WER clean / 10 dB per client and pooled over the clients (the common test set), 95% bootstrap
intervals, paired differences to the start and to the centralised arm; the unsplit model's clean
WER as a reference; bytes and time per round. --reuse takes finished arms from runs/<out's name>/.

    python benchmarks/federated.py --quick --out runs/fed-quick.json   # a few minutes: 4 x 2 x 2, 8 test utterances
    python benchmarks/federated.py --each --short                      # writes benchmarks/results/federated.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"
QUICK = dict(clients=4, rounds=2, local_steps=2, batch_size=2, n_train=8, n_test=8)
FULL = dict(clients=4, rounds=5, local_steps=10, batch_size=4, n_train=100, n_test=50)
START = "runs/msg512-lofo-piper"  # trained without Piper voices: the Piper client brings a voice it never heard
# how START was trained (runs/ is not in git; ~30 min on 2 cores)
START_COMMAND = ("semedge train --model whisper-base --k 512 --init pca --power message --lr 5e-4 --channel awgn,rayleigh "
                 "--snr-range -5 20 --rate-min 128 --batch-size 8 --mse-warmup 100 --n-train 1200 --n-val 40 --threads 1 "
                 "--save-every 100 --kl-weight 1 --ce-weight 0.1 --feature-loss 0.1 --augment 0.5 --fp16 --steps 800 "
                 "--max-minutes 70 --voices mix-piper --out " + START)
LR = 1e-4  # every side: JSC encoder, encoder LoRA, JSC decoder
EQUAL = ("start codec, loss (CE on the transcript, split step), optimiser (AdamW, clip 1, moments reset each round), "
         "learning rates, channel and SNR draws' distribution, batch size, number of split steps and of training "
         "examples seen, the training utterances (the union), rounds")
NOT_EQUAL = ("federated: each client steps on its own voice family and FedAvg averages the N device models after "
             "each round; the server's JSC decoder takes S steps per round on the mean of N clients' losses "
             "(N x B utterances). centralised: one device model takes N x S steps per round on batches drawn from "
             "the union, and the JSC decoder takes one step per split step (B utterances), N times as many steps")


def configs(a) -> tuple:
    """(federated, centralised) FederateConfig of the run."""
    from semedge.semcom.federated.config import FederateConfig

    sizes = {**(QUICK if a.quick else FULL), **{k: v for k, v in vars(a).items() if k in FULL and v is not None}}
    fed = FederateConfig(model=a.model, jsc=a.jsc, non_iid="voices", engine=a.engine, threads=1, lr=a.lr,
                         lora_lr=a.lr, server_lr=a.lr, personal_steps=0, evaluate=False, **sizes).validate()
    sampled = max(int(fed.clients * fed.fraction), 1)  # FedAvg's sample size (fraction_train, min 1)
    central = dataclasses.replace(fed, clients=1, pool=fed.clients, engine="local",
                                  local_steps=sampled * fed.local_steps).validate()
    return fed, central


def train(cfg, out: Path, reuse: bool = False) -> tuple[dict, float]:
    """(the run's results, seconds); reuse: read OUT/federated.json of an earlier run with this config instead."""
    from semedge.semcom.federated.flower_server import run_simulation
    from semedge.semcom.federated.local_grid import run_local

    done = out / "federated.json"
    if reuse and done.exists():
        res = json.loads(done.read_text())
        now = json.loads(cfg.to_json())
        if any(now.get(k) != v for k, v in res["config"].items()) or any(
                now[k] != v for k, v in json.loads(type(cfg)().to_json()).items() if k not in res["config"]):
            raise SystemExit(f"{done} was run with another config: drop --reuse")
        return res, res["seconds"]
    t0 = time.perf_counter()
    res = run_local(cfg, out) if cfg.engine == "local" else run_simulation(cfg, out, 1)
    return res, time.perf_counter() - t0


def score(fed, arms: dict[str, str], done: dict | None = None) -> tuple[dict, dict, dict]:
    """(per-utterance pairs {arm: {client: {snr: [(errors, words)]}}}, seconds per arm, the unsplit model's
    clean pairs) on the clients' test sets; arms in `done` (an earlier result's "pairs") are not scored again."""
    from semedge.semcom.federated.client import base_model
    from semedge.semcom.federated.data import client_data
    from semedge.semcom.federated.evaluate import arm_halves, score_arm
    from semedge.semcom.split import identity_codec

    loaded = base_model(fed.model)
    tests = {i: client_data(loaded, fed, i, "test") for i in range(fed.clients)}
    unsplit = score_arm(loaded, loaded.model.model.encoder, identity_codec(loaded), tests, fed.channel, ("inf",), fed.seed)
    pairs, secs = {}, {}
    for arm, jsc in arms.items():
        if done and arm in done:
            pairs[arm] = {int(k): {snr: [tuple(x) for x in v] for snr, v in per.items()} for k, per in done[arm].items()}
            continue
        t0 = time.perf_counter()
        encoder, codec = arm_halves(loaded, jsc)
        pairs[arm] = score_arm(loaded, encoder, codec, tests, fed.channel, fed.eval_snrs, fed.seed)
        secs[arm] = time.perf_counter() - t0
        print(f"scored {arm} in {secs[arm]:.0f} s", flush=True)
    return pairs, secs, unsplit


def round_figures(res: dict) -> list[dict]:
    """Per training round: seconds, and bytes up / down per client (MB)."""
    return [{"round": r["round"], "seconds": r["seconds"],
             "clients": {p: {"up_mb": c["total_up"] / 1e6, "down_mb": c["total_down"] / 1e6, "up": c["up"], "down": c["down"]}
                         for p, c in sorted(r["clients"].items())}}
            for r in res["accounting"]["phases"].get("train", [])]


def unsplit_summary(unsplit: dict) -> dict:
    """The unsplit model's clean WER per client and pooled (identity codec: the encoder's content frames, no channel)."""
    from semedge.semcom.stats import wer_ci

    per = {str(p): wer_ci(v["inf"]) for p, v in unsplit.items()}
    return {**per, "all": wer_ci([x for p in sorted(unsplit) for x in unsplit[p]["inf"]])}


def print_table(summary: dict, labels: dict, snrs) -> None:
    from semedge.semcom.stats import fmt_ci

    arms = list(summary)
    print(f"{'client':<12}{'SNR':>5}  " + "".join(f"{a:<26}" for a in arms) + "".join(f"{a} - start{'':<13}" for a in arms[1:]))
    for part in summary[arms[0]]:
        for snr in snrs:
            cells = [summary[a][part][snr] for a in arms]
            row = "".join(f"{fmt_ci(c['wer']):<26}" for c in cells)
            row += "".join(f"{fmt_ci(c['vs_start']):<26}" for c in cells[1:])
            print(f"{part + ' ' + labels.get(part, ''):<12}{snr:>5}  {row}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small run to time the benchmark (4 x 2 x 2, batch 2)")
    p.add_argument("--model", default="whisper-base")
    p.add_argument("--jsc", default=START, help="the start codec (a checkpoint folder, or default)")
    p.add_argument("--lr", type=float, default=LR, help="learning rate on every side")
    for opt in ("clients", "rounds", "local_steps", "batch_size", "n_train", "n_test"):
        p.add_argument("--" + opt.replace("_", "-"), dest=opt, type=int, default=None)
    p.add_argument("--engine", default="local", choices=("simulation", "local"), help="local: one process, no Ray")
    p.add_argument("--out", type=Path, default=None, help="the JSON (default benchmarks/results/federated.json)")
    p.add_argument("--each", action="store_true", help="also a federated arm whose server steps once per client's uplink")
    p.add_argument("--short", action="store_true",
                   help="also a centralised arm with the federated run's sequential steps (R x S, 1/N of the examples)")
    p.add_argument("--reuse", action="store_true", help="take finished arms from runs/<out's name>/ instead of training")
    a = p.parse_args(argv)
    if a.jsc == START and not Path(START).is_dir():
        p.error(f"the start codec {START} is not here (runs/ is not in git); build it with:\n  {START_COMMAND}\n"
                "or pass another checkpoint (or default) with --jsc")

    from semedge.core.files import write_atomic
    from semedge.semcom.federated.data import client_label
    from semedge.semcom.federated.evaluate import summarise

    fed, central = configs(a)
    out = a.out or RESULTS / "federated.json"
    work = Path("runs") / out.stem
    runs = {"federated": (fed, "federated"), "centralised": (central, "centralised")}
    if a.each:
        runs["federated_each"] = (dataclasses.replace(fed, server_update="each"), "federated-each")
    if a.short:
        runs["centralised_short"] = (dataclasses.replace(central, local_steps=fed.local_steps), "centralised-short")
    trained = {arm: train(cfg, work / sub, a.reuse) for arm, (cfg, sub) in runs.items()}
    arms = {"start": fed.jsc, **{arm: res["checkpoint"] for arm, (res, _) in trained.items()}}
    done = json.loads(out.read_text()).get("pairs") if a.reuse and out.exists() else None
    pairs, eval_s, unsplit = score(fed, arms, done)
    labels = {str(i): client_label(fed.non_iid, i) for i in range(fed.clients)} | {"all": "pooled"}
    summary = summarise(pairs, references=("start", "centralised", "centralised_short"))
    fed_res = trained["federated"][0]
    res = {"config": {arm: json.loads(cfg.to_json()) for arm, (cfg, _) in runs.items()},
           "equal": EQUAL, "not_equal": NOT_EQUAL, "clients": labels, "decoder": "ctranslate2 int8",
           "wer": summary, "pairs": {a: {str(k): v for k, v in per.items()} for a, per in pairs.items()},
           "unsplit_clean": unsplit_summary(unsplit),
           "rounds": {arm: round_figures(r) for arm, (r, _) in trained.items()},
           "loss_per_step": {arm: [x["loss_per_step"] for x in r["rounds"]] for arm, (r, _) in trained.items()},
           "seconds": {**{arm: sec for arm, (_, sec) in trained.items()}, "eval": eval_s}}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(res, indent=1) + "\n")
    print_table(summary, labels, fed.eval_snrs)
    print("unsplit, clean: " + ", ".join(f"{p}: {v['value']:.3f}" for p, v in res["unsplit_clean"].items()))
    for r in res["rounds"]["federated"]:
        print(f"round {r['round']}: {r['seconds']:.0f} s; " + ", ".join(
            f"client {p}: up {c['up_mb']:.2f} MB / down {c['down_mb']:.2f} MB" for p, c in r["clients"].items()))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
