"""The Flower ClientApp (Message API, flwr 1.42): the device's answers to the ServerApp
in flower_server.py. Imported only when a federated run starts (flwr is an extra).

Messages (message_type: content -> reply):
- train        global params + config       -> uplink of local step 0 (+ the client's partition);
                                               personal=1: the same, to personalise (server frozen)
- train.step   dL/dy of step s + config     -> uplink of step s + 1, or after the last step the
                                               client's params + num-examples (FedAvg's input)
- evaluate     global params (or: use the personalised ones) -> test symbols at each SNR
- evaluate.score  transcripts               -> per-utterance word errors (references stay local)
A client that fails or times out drops out of the rest of the round; FedAvg averages the
replies that came (strategy.aggregate_train skips error replies).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from semedge.semcom.federated import client as C
from semedge.semcom.federated.config import FederateConfig

STATE, PERSONAL = "semedge.state", "semedge.personal"  # the client's records in its Context


def _arrays(d: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in d.items()})


def _numpy(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in rec.items()}


# ----------------------------------------------------------------------------- the client

client_app = ClientApp()


def _setup(msg: Message, context: Context):
    conf = msg.content["config"]
    cfg = FederateConfig.from_json(conf["fed"])
    part = int(context.node_config.get("partition-id", 0))
    return cfg, conf, part, C.runtime(cfg, conf["jsc"])


@client_app.train()
def begin(msg: Message, context: Context) -> Message:
    cfg, conf, part, rt = _setup(msg, context)
    state, up = C.begin(rt, part, int(conf["round"]), _numpy(msg.content["arrays"]), bool(conf["personal"]))
    context.state[STATE] = _arrays(state)
    info = MetricRecord({"partition": part, "num-examples": len(rt.client(part, "train"))})
    return Message(RecordDict({"uplink": _arrays(up), "info": info}), reply_to=msg)


@client_app.train("step")
def local_step(msg: Message, context: Context) -> Message:
    cfg, conf, part, rt = _setup(msg, context)
    personal, last = bool(conf["personal"]), bool(conf["last"])
    state = _numpy(context.state[STATE])
    state, up = C.step(rt, part, int(conf["round"]), int(conf["step"]), state, _numpy(msg.content["downlink"]),
                       last, personal)
    context.state[STATE] = _arrays(state)
    if up is not None:
        return Message(RecordDict({"uplink": _arrays(up)}), reply_to=msg)
    n = len(rt.client(part, "train"))
    if personal:
        context.state[PERSONAL] = _arrays({k: v for k, v in state.items() if k.startswith("p.")})
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": n})}), reply_to=msg)
    params = {k[2:]: v for k, v in state.items() if k.startswith("p.")}
    return Message(RecordDict({"arrays": _arrays(params), "metrics": MetricRecord({"num-examples": n})}), reply_to=msg)


@client_app.evaluate()
def eval_symbols(msg: Message, context: Context) -> Message:
    cfg, conf, part, rt = _setup(msg, context)
    if bool(conf["personal"]):
        up = C.eval_uplink(rt, part, _numpy(context.state[PERSONAL]), "p.")
    else:
        up = C.eval_uplink(rt, part, _numpy(msg.content["arrays"]))
    info = MetricRecord({"partition": part, "num-examples": len(rt.client(part, "test"))})
    return Message(RecordDict({"uplink": _arrays(up), "info": info}), reply_to=msg)


@client_app.evaluate("score")
def eval_score(msg: Message, context: Context) -> Message:
    cfg, conf, part, rt = _setup(msg, context)
    hyps = {k: list(v) for k, v in conf.items() if k.startswith("hyp.")}
    scores = C.eval_score(rt, part, hyps)
    return Message(RecordDict({"metrics": MetricRecord({**scores, "num-examples": len(rt.client(part, "test"))})}),
                   reply_to=msg)
