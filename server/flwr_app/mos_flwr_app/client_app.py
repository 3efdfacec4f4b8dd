"""ClientApp entry point: each message type is relayed to this node's mos-client (mos.client.federation.client_app)."""

from flwr.clientapp import ClientApp

from mos.client.federation.client_app import register

app = ClientApp()
register(app)
