"""Drawing images: the encode/denoise loop, regionally controllable sampling and its layouts, T2I-Adapter
conditions, and preview pictures."""
