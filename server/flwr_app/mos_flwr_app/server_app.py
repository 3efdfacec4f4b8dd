"""ServerApp entry point: the logic is mos.server.server_app.main in the installed package."""

from flwr.serverapp import ServerApp

from mos.server.server_app import main

app = ServerApp()
app.main()(main)
