"""Fine-tune only the world base's autoencoder decoder: sharper patterns, the same latent space.

    python scripts/tune_world_decoder.py --weights shared/world/weights --out /tmp/wd   # ~25 min on one core
    cp /tmp/wd/* shared/world/weights/

The autoencoder was trained for 1,200 steps on half-size crops, and its decoder gives back too little of a
patterned object: carol's dots are gone even when she is drawn big (docs/world.md, "What the autoencoder keeps").
A model tuned on a concept only ever makes latents, so whatever the decoder cannot draw is lost before tuning
starts. Only the decoder (and post_quant_conv) moves: the encoder, hence every latent the UNet was trained on and
every latent a concept is tuned on, stays bit for bit the same, and the UNet and text encoder need no retraining.
Whole 64-px pictures: 30 % demo-concept scenes, the rest world scenes half of whose objects are patterned, as a
real base's autoencoder has seen every texture (the UNet and text encoder never see the concepts).
Seeded and single-threaded: the same command gives the same weights. Writes the three models (fp16 safetensors,
text encoder and UNet copied) and world.json with this run under "decoder".
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from train_world import images_tensor


def scene(rng: random.Random, world):
    if rng.random() < 0.3:
        return world.concept_scene(rng.choice(list(world.CONCEPTS)), rng)[0]
    return world.random_scene(rng, patterned=0.5)


def tune_decoder(vae, steps: int, batch: int, lr: float, rng: random.Random, world) -> list[float]:
    trainable = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in vae.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    losses = []
    for step in tqdm(range(steps), desc="decoder", unit="step"):
        x = images_tensor([world.render(scene(rng, world))[0] for _ in range(batch)])
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    vae.requires_grad_(False)
    return losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default="shared/world/weights")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=11)
    args = p.parse_args()

    from safetensors.torch import save_file

    from mos.shared.sd import architectures
    from mos.shared.sd.base import load_weights
    from mos.shared.world import scenes as world

    torch.set_num_threads(1)
    t0 = time.time()
    src, out = Path(args.weights), Path(args.out)
    _, _, vae = load_weights(architectures.world(), src)
    losses = tune_decoder(vae, args.steps, args.batch, args.lr, random.Random(args.seed), world)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("text_encoder", "unet"):
        if src.resolve() != out.resolve():
            shutil.copy(src / f"{name}.safetensors", out / f"{name}.safetensors")
    save_file({k: v.detach().half().contiguous() for k, v in vae.state_dict().items()}, out / "vae.safetensors")
    report = json.loads((src / "world.json").read_text())
    report["decoder"] = {"command": "python scripts/tune_world_decoder.py " + " ".join(
                             f"--{k} {v}" for k, v in vars(args).items() if k not in ("out", "weights")),
                         "torch": torch.__version__, "seconds": round(time.time() - t0),
                         "loss_first50": float(np.mean(losses[:50])), "loss_last50": float(np.mean(losses[-50:]))}
    (out / "world.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report["decoder"], indent=1))


if __name__ == "__main__":
    main()
