"""`mos base info | tokenize`."""

from __future__ import annotations

import argparse
import json


def add_base_options(p: argparse.ArgumentParser, compute: bool = True) -> None:
    """--base, and unless the command only reads weights on the CPU (compute=False), --device and --dtype."""
    p.add_argument("--base", default="tiny", help="tiny (default), tiny:SEED, sd15-random, a diffusers folder or a "
                   "single-file .safetensors checkpoint")
    if not compute:
        return
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: bf16/fp16 on CUDA, fp32 on CPU)")


HELP = "inspect base models: info, tokenize"


def register(sub) -> None:
    p = sub.add_parser("base", help=HELP)
    bsub = p.add_subparsers(dest="base_command", required=True)
    info = bsub.add_parser("info", help="fingerprint, cross-attention layers and LoRA input sites")
    add_base_options(info)
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(run=run_info)
    tok = bsub.add_parser("tokenize", help="print a prompt's token ids")
    add_base_options(tok)
    tok.add_argument("prompt")
    tok.set_defaults(run=run_tokenize)


def describe(base) -> dict:
    from mos.shared.sd.sites import cross_attention_layers, input_sites

    layers = cross_attention_layers(base.unet)
    sites = input_sites(base.text_encoder, base.unet)
    return {
        "spec": base.spec, "fingerprint": base.fingerprint, "resolution": base.resolution,
        "cross_attention_layers": len(layers), "cross_attention_layer_names": layers,
        "device": str(base.device), "dtype": str(base.dtype).replace("torch.", ""),
        "parameters": {"text_encoder": sum(p.numel() for p in base.text_encoder.parameters()),
                       "unet": sum(p.numel() for p in base.unet.parameters())},
        "input_sites": [s.as_dict() for s in sites],
    }


def run_info(args) -> int:
    from mos.shared.sd.base import load_base

    info = describe(load_base(args.base, args.device, args.dtype))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"base          {info['spec']}\nfingerprint   {info['fingerprint']}\nresolution    {info['resolution']}px")
    print(f"cross-attn    {info['cross_attention_layers']} layers\nparameters    {info['parameters']}")
    print(f"input sites   {len(info['input_sites'])}")
    for s in info["input_sites"]:
        print(f"  stage {s['stage']}  d={s['dim']:<5} {s['site']}  ({len(s['layers'])} layer(s))")
    return 0


def run_tokenize(args) -> int:
    from mos.shared.sd.base import load_tokenizer_only

    tok = load_tokenizer_only(args.base)
    print(" ".join(str(i) for i in tok(args.prompt, truncation=True).input_ids))
    return 0
