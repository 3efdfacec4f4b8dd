"""ClientApp handlers: one per message type, each relaying to this node's `mos-client` worker.

Imports stay light (flwr only): Flower starts a new ClientApp process for every message, and the worker already
holds torch, the base and the concept's adapter (see relay.py and node.py).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from mos.client.federation import relay

TRAIN = ("tune", "result")
QUERY = ("kv", "spatial", "notice")
WORKER_KEY = "mos-worker"  # --node-config key: the worker's socket


def handle(msg: Message, context: Context) -> Message:
    path = context.node_config.get(WORKER_KEY)
    if not path:
        raise RuntimeError(f"this SuperNode has no {WORKER_KEY} in --node-config: start it with mos-client")
    reply = relay.call(str(path), msg.metadata.message_type, msg.content,
                       {"run_id": context.run_id, "node_id": context.node_id})
    return Message(reply, reply_to=msg)


def register(app: ClientApp) -> ClientApp:
    for name in TRAIN:
        app.train(name)(handle)
    for name in QUERY:
        app.query(name)(handle)
    return app
