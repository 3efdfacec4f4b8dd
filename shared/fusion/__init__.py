"""Gradient fusion: the statistics each concept's owner records (stages.py, stats.py), the closed-form solve
(solver.py), the one driver of the three stages (driver.py) and the one-machine runner (local.py)."""
