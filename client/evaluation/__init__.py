"""Measuring fused models: identity retention, the paper's CLIP scores, and the toy world's judged evaluation."""
