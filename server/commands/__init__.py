"""`mos-server`."""
