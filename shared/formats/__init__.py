"""Files: the project's adapter format, LoRA key conventions of other tools, export (diffusers, kohya) and import
of community LoRAs."""
