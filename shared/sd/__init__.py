"""Stable Diffusion pieces: bases (embedded, random, local weights) and their fingerprint, the CLIP tokenizer, where
LoRA sits (input sites), ED-LoRA concept tokens with layer-wise prompt encoding, and ConceptModel (a base with
concepts and LoRA applied)."""
