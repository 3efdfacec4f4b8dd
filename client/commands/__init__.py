"""`mos-client`, `mos tune` and `mos eval`."""
