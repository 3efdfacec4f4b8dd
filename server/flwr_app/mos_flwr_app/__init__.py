"""Entry points only: the logic lives in the installed package (mos.server.app, mos.client.app)."""
