"""ServerApp entry point: the logic is mos.server.app.main in the installed package."""

from flwr.serverapp import ServerApp

from mos.server.app import main

app = ServerApp()
app.main()(main)
