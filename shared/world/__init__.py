"""The toy world: captioned scenes to pretrain a small base on (scenes.py), that base's weights (weights/), and the
judge that reads its pictures (judge.py). `mos eval world` (mos.client.evaluation.world) measures the method in it."""
