"""Train the world base's layout adapter: a T2I-Adapter whose condition is a "sketch" of filled discs, one where
each object should be, saying where and how big but not which shape (the shape comes from the words).

    python scripts/train_world_layout.py --minutes 25 --out shared/world/layout     # 2 CPU cores

Mix-of-Show's regionally controllable sampling takes its layout from a spatial condition (sketch or pose through
a T2I-Adapter); region prompts alone say what each box holds, not that something is drawn there. The world base,
told "a red square" in one half and "a green diamond" in the other, draws one object near the middle. This adapter
is trained the T2I-Adapter way: the base (text encoder, UNet, autoencoder) frozen, the adapter's features added
to the UNet's down blocks, the plain noise-prediction loss, timesteps drawn towards the noisy end where layout is
decided. Scenes come from the world's generator (one or two objects, patterned or plain, some captions naming only
one of two objects); the concepts' shapes never appear, as for the base.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mos.shared.sampling.t2i import layout_image


def batch(rng: random.Random, n: int, world) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    pics, conds, caps = [], [], []
    for _ in range(n):
        s = world.random_scene(rng, patterned=0.3, partial=0.5)
        pics.append(np.asarray(world.render(s)[0], dtype=np.float32) / 127.5 - 1.0)
        conds.append(np.asarray(layout_image([t.box() for t in s.things], (world.SIZE, world.SIZE)), dtype=np.float32) / 255.0)
        caps.append(s.caption if rng.random() > 0.1 else "")  # some unconditional rows, as guidance samples them
    x = torch.from_numpy(np.stack(pics)).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(np.stack(conds))[:, None], caps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="shared/world/layout")
    p.add_argument("--minutes", type=float, default=25.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    from diffusers import DDPMScheduler, T2IAdapter

    from mos.shared.sd import architectures
    from mos.shared.sd.base import load_base
    from mos.shared.world import scenes as world

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    base = load_base("world", device="cpu", dtype="float32")
    unet, te, vae, tok = base.unet, base.text_encoder, base.vae, base.tokenizer
    for m in (unet, te, vae):
        m.requires_grad_(False).eval()
    adapter = T2IAdapter(in_channels=1, channels=list(unet.config.block_out_channels), num_res_blocks=1,
                         downscale_factor=base.vae_scale, adapter_type="full_adapter")
    noise = DDPMScheduler.from_config({"_class_name": "DDPMScheduler", **architectures.SCHEDULER})
    opt = torch.optim.AdamW(adapter.parameters(), lr=args.lr, weight_decay=0.0)
    scale = vae.config.scaling_factor
    t0, losses, step = time.time(), [], 0
    deadline = t0 + args.minutes * 60
    bar = tqdm(desc="layout adapter", unit="step")
    while time.time() < deadline:
        x, cond, caps = batch(rng, args.batch, world)
        with torch.no_grad():
            x0 = vae.encode(x).latent_dist.mean * scale
            ids = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            text = te(ids).last_hidden_state
        # cubic timestep sampling (T2I-Adapter): most draws at the noisy end, where the layout is decided
        u = torch.rand(args.batch)
        t = ((1 - u ** 3) * (noise.config.num_train_timesteps - 1)).long()
        eps = torch.randn_like(x0)
        feats = adapter(cond)
        pred = unet(noise.add_noise(x0, eps, t), t, encoder_hidden_states=text,
                    down_intrablock_additional_residuals=list(feats)).sample
        loss = F.mse_loss(pred, eps)
        frac = (time.time() - t0) / (deadline - t0)
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 50) * max(0.05, 1.0 - frac)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss))
        step += 1
        bar.update()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    bar.close()
    out = Path(args.out)
    adapter.save_pretrained(out, safe_serialization=True)
    report = {"command": "python scripts/train_world_layout.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
              "torch": torch.__version__, "steps": step, "batch": args.batch, "seconds": round(time.time() - t0),
              "loss_last100": float(np.mean(losses[-100:])),
              "loss_curve": [float(np.mean(losses[i:i + 50])) for i in range(0, len(losses), 50)]}
    (out / "layout.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "loss_curve"}, indent=1))


if __name__ == "__main__":
    main()
