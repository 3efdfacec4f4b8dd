"""`mos export FUSED --format diffusers|kohya --out …`: fused concepts for diffusers, A1111 and ComfyUI users."""

from __future__ import annotations

from mos.shared.commands.base import add_base_options

HELP = "export a fused adapter for diffusers, A1111, ComfyUI"


def register(sub) -> None:
    p = sub.add_parser("export", help=HELP,
                       description="diffusers: a pipeline folder (deltas merged, tokens added, concepts.json) plus "
                       "lora/ (LoRA + embeddings for the original base). kohya: one LoRA file for A1111 / ComfyUI "
                       "(exact at strength 1.0, per-layer ranks kept) and FILE_embeddings/ beside it. Outside `mos sample`, "
                       "each concept's layer-wise embeddings become their average over the layers.")
    p.add_argument("adapter", help="fused (or tuned) adapter folder, or its adapter.safetensors")
    p.add_argument("--format", choices=("diffusers", "kohya"), required=True)
    p.add_argument("--out", required=True, help="diffusers: output folder; kohya: output FILE.safetensors")
    add_base_options(p, compute=False)
    p.set_defaults(run=run)


def run(args) -> int:
    from mos.shared.formats import adapter as adapter_io
    from mos.shared.formats.export import write_kohya, write_pipeline
    from mos.shared.sd.base import load_base

    adapter = adapter_io.load(args.adapter)
    base = load_base(args.base, "cpu", "fp32")  # exported weights are float32 whatever the user samples with
    names = ", ".join(c.handle for c in adapter.concepts)
    if args.format == "diffusers":
        out = write_pipeline(base, adapter, args.out)
        print(f"{names} -> {out} (StableDiffusionPipeline.from_pretrained; prompts: see {out / 'concepts.json'})")
        print(f"unmerged, for the original base: {out / 'lora'} (pipe.load_lora_weights, pipe.load_textual_inversion)")
    else:
        lora_file, emb_dir = write_kohya(base, adapter, args.out)
        print(f"{names} -> {lora_file} (kohya keys; exact at strength 1.0)")
        print(f"embeddings: {emb_dir} (A1111: embeddings/; prompt with the concept's name, e.g. 'a photo of "
              f"{adapter.concepts[0].name}' if it has tokens)")
    return 0
