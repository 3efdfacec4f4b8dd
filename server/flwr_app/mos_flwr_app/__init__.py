"""Entry points only: the logic lives in the installed package (mos.server.server_app, mos.client.federation.client_app)."""
