"""Tuning a concept's ED-LoRA: the concept folder (data.py), the model and one step (edlora.py), the attention
regulariser, checkpoints, the run (tune.py) and what it leaves to look at (report.py)."""
