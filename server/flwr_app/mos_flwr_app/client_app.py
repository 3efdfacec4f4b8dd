"""ClientApp entry point: each message type is relayed to this node's mos-client (mos.client.app)."""

from flwr.clientapp import ClientApp

from mos.client.app import register

app = ClientApp()
register(app)
