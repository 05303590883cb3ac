"""`--engine local`: the same ServerApp logic and ClientApp, in one process, with no Ray.

A flwr Grid that hands each message to the ClientApp here (one Context per node, as a SuperNode
keeps it); a client that raises becomes an error reply, as Flower reports a failed ClientApp.
Clients run one after another. For hosts where Ray cannot start (it gives its node 30 s; a
loaded 2-core host can miss that) and for tests. What crosses is the same Message content as
with the simulation engine; Flower's serialisation is skipped.
"""

from __future__ import annotations

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from semedge.semcom.federated.config import FederateConfig

FIRST_NODE = 100


class LocalGrid:
    """The Grid methods the ServerApp uses: get_node_ids and send_and_receive."""

    def __init__(self, n: int):
        from semedge.semcom.federated.flower_client import client_app

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # what a SuperLink sets
        self.app = client_app
        self.contexts = {FIRST_NODE + i: Context(run_id=1, node_id=FIRST_NODE + i,
                                                 node_config={"partition-id": i, "num-partitions": n},
                                                 state=RecordDict(), run_config={}) for i in range(n)}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def deliver(self, msg: Message) -> Message:
        """The ClientApp's reply to `msg`, or an error reply if it raised."""
        try:
            return self.app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception as e:  # noqa: BLE001 - a failed ClientApp is a reply with an error, as in Flower
            return Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=msg)

    def send_and_receive(self, messages, timeout: float | None = None) -> list[Message]:
        return [self.deliver(m) for m in messages]


def run_local(cfg: FederateConfig, out) -> dict:
    from semedge.semcom.federated.flower_server import run_server

    return run_server(LocalGrid(cfg.clients), cfg, out)
