"""`mos` and the subcommands that need no party of their own: base, sample, fuse, export, import-lora."""
