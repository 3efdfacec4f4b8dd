"""Pretrain the toy world's base (`--base world`) from scratch on the scene generator, on CPU cores or a GPU.

    python scripts/train_world.py --out /tmp/wb                    # 2 CPU cores, ~60 min: a usable base, weak
    python scripts/train_world.py --resume /tmp/wb --seed 1 --minutes 32 --lr 4e-4 --out /tmp/wb2

The shipped weights went on from those two CPU runs on one H100 (11 minutes of training in all), then on 2 CPU
cores again with patterned objects and partial captions (95 minutes):

    python scripts/train_world.py --resume /tmp/wb2 --device cuda --workers 14 --threads 4 --scenes 150000 \
        --batch 256 --lr 8e-4 --ema-decay 0.999 --seed 2 --minutes 8 --total-minutes 8.2 --out /tmp/wb3
    python scripts/train_world.py --resume /tmp/wb3 --device cuda --workers 14 --threads 4 --scenes 60000 \
        --batch 256 --lr 3e-4 --ema-decay 0.998 --seed 3 --minutes 2.6 --total-minutes 3.0 --out /tmp/wb4
    python scripts/train_world.py --resume /tmp/wb4 --patterned 0.3 --scenes 16000 --lr 3e-4 --seed 4 \
        --minutes 30 --out /tmp/wbp
    python scripts/train_world.py --resume /tmp/wbp --patterned 0.3 --partial 0.5 --scenes 24000 --lr 3e-4 \
        --seed 5 --minutes 64 --total-minutes 68 --out shared/world/weights

Phase 1 trains the autoencoder (64-px scenes -> 16x16x4 latents), phase 2 the text encoder and UNet together
on pre-encoded scenes (epsilon prediction, SD1.x noise schedule, 10% empty captions for guidance, an EMA of the
UNet). Everything is seeded: the same command on the same torch build and device gives the same scenes and, on a
CPU, the same weights. The output folder holds fp16 safetensors of the three models and world.json (what was run
and what it reached, with the runs it resumed from under "before").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def images_tensor(imgs) -> torch.Tensor:
    a = np.stack([np.asarray(im, dtype=np.float32) for im in imgs]) / 127.5 - 1.0
    return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()


def _vae_scene(rng: random.Random, world):
    # a quarter of the autoencoder's pictures hold a patterned object, as a real base's autoencoder has seen every
    # texture; the UNet and text encoder never see them, so the concepts stay unknown to the base's words
    if rng.random() < 0.25:
        return world.concept_scene(rng.choice(list(world.CONCEPTS)), rng)[0]
    return world.random_scene(rng)


def train_vae(vae, steps: int, batch: int, rng: random.Random, world, lr: float = 2e-3) -> list[float]:
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    vae.train()
    for step in tqdm(range(steps), desc="autoencoder", unit="step"):
        # half-size crops: no attention, so what a convolution learns on a crop holds on the whole picture,
        # at a quarter of the cost of a step
        c = world.SIZE // 2
        x = images_tensor([world.render(_vae_scene(rng, world))[0] for _ in range(batch)])
        i, j = rng.randrange(0, c + 1, 4), rng.randrange(0, c + 1, 4)
        x = x[:, :, i:i + c, j:j + c]
        post = vae.encode(x).latent_dist
        # the posterior's mean, not a sample: a freshly built encoder's variance is 1, and decoding that much noise
        # kept reconstructions blurry for thousands of steps (make_deterministic then pins the unused variance)
        rec = vae.decode(post.mode()).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-6 * post.kl().mean()
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + np.cos(np.pi * step / steps)) + 1e-5
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    vae.eval()
    return losses


@torch.no_grad()
def make_deterministic(vae) -> None:
    """Pin the encoder's log-variance to its floor (std e^-15): trained on the mean, its variance head never learned
    anything, and tuning code that samples the posterior (as SD's tiny-variance autoencoder allows) would add
    unit noise to every latent."""
    c = vae.config.latent_channels
    vae.quant_conv.weight[c:].zero_()
    vae.quant_conv.bias[c:].fill_(-30.0)


CHUNK = 256  # scenes drawn from one seeded generator: the data does not depend on the number of workers


def render_chunk(job: tuple[int, int, int, dict]) -> tuple[np.ndarray, list[str]]:
    from mos.shared.world import scenes as world
    seed, chunk, n, mix = job
    rng = random.Random(seed * 1_000_003 + chunk)
    scenes = [world.random_scene(rng, **mix) for _ in range(n)]
    return np.stack([np.asarray(world.render(s)[0]) for s in scenes]), [s.caption for s in scenes]


def render_scenes(n: int, seed: int, workers: int, mix: dict | None = None) -> tuple[np.ndarray, list[str]]:
    """n captioned scenes as uint8 [n, H, W, 3], rendered by `workers` processes (PIL drawing holds the GIL);
    `mix`: world.random_scene's chances (patterned, partial)."""
    jobs = [(seed, c, min(CHUNK, n - c * CHUNK), mix or {}) for c in range((n + CHUNK - 1) // CHUNK)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        parts = list(tqdm(pool.imap(render_chunk, jobs), total=len(jobs), desc="render scenes", unit="chunk"))
    return np.concatenate([p[0] for p in parts]), [c for p in parts for c in p[1]]


@torch.no_grad()
def encode_dataset(vae, tokenizer, n: int, seed: int, workers: int, device: torch.device, mix: dict
                   ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    pixels, captions = render_scenes(n, seed, workers, mix)
    latents = [vae.encode(images_tensor(pixels[i:i + 256]).to(device)).latent_dist.mean
               for i in tqdm(range(0, n, 256), desc="encode scenes", unit="batch")]
    ids = tokenizer(captions + [""], padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids
    return torch.cat(latents), ids.to(device), captions


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="shared/world/weights")
    p.add_argument("--minutes", type=float, default=42.0, help="time for phase 2 (the UNet and text encoder)")
    p.add_argument("--vae-steps", type=int, default=1200)
    p.add_argument("--scenes", type=int, default=16000, help="pre-encoded scenes for phase 2")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="processes that render scenes")
    p.add_argument("--patterned", type=float, default=0.0,
                   help="chance that a world object is striped, checked or dotted (said in its caption)")
    p.add_argument("--partial", type=float, default=0.0,
                   help="chance that a two-object scene's caption names only one of them")
    p.add_argument("--unplaced", type=float, default=0.0,
                   help="chance that such a partial caption also leaves out the named object's place")
    p.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast on cuda)")
    p.add_argument("--total-minutes", type=float, default=0.0,
                   help="end phase 2 this long after the start, however long phase 1 took (0: no cap)")
    p.add_argument("--max-steps", type=int, default=0, help="stop phase 2 after this many steps (0: time only)")
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--resume", default=None, help="a previous --out: keep its autoencoder, go on training its "
                   "text encoder and UNet (on freshly drawn scenes when --seed differs)")
    args = p.parse_args()

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from mos.shared.sd import architectures
    from mos.shared.sd.base import load_tokenizer, load_weights, tiny_folder
    from mos.shared.world import scenes as world

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    cfg = architectures.world()
    tokenizer = load_tokenizer(tiny_folder() / "tokenizer")
    if args.resume:
        te, unet, vae = load_weights(cfg, Path(args.resume))
        before = json.loads((Path(args.resume) / "world.json").read_text())
        vae_losses = []
    else:
        before = {}
        vae = AutoencoderKL(**cfg["vae"])
        vae_losses = train_vae(vae, args.vae_steps, 32, random.Random(args.seed), world)
        te = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
        unet = UNet2DConditionModel(**cfg["unet"])
    dev = torch.device(args.device)
    vae, te, unet = vae.to(dev), te.to(dev), unet.to(dev)
    mix = {"patterned": args.patterned, "partial": args.partial, "unplaced": args.unplaced}
    lat, ids, captions = encode_dataset(vae, tokenizer, args.scenes, args.seed + 1, args.workers, dev, mix)
    scale = before.get("vae_scaling_factor") or float(1.0 / lat.std())
    vae.register_to_config(scaling_factor=scale)
    make_deterministic(vae)  # also for weights made before it existed; a no-op on its own output
    lat = lat * scale
    t_vae = time.time() - t0
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    noise = DDPMScheduler.from_config({"_class_name": "DDPMScheduler", **architectures.SCHEDULER})
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(args.seed + 2)
    empty = ids[-1:]
    deadline = time.time() + args.minutes * 60
    if args.total_minutes:
        deadline = min(deadline, t0 + args.total_minutes * 60)
    span = deadline - time.time()
    losses, step = [], 0
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext())
    floats = [k for k, v in unet.state_dict().items() if v.is_floating_point()]
    bar = tqdm(desc="unet + text encoder", unit="step", total=args.max_steps or None)
    unet.train(), te.train()
    while time.time() < deadline and (not args.max_steps or step < args.max_steps):
        idx = torch.randint(0, len(lat), (args.batch,), generator=g).to(dev)
        x0, tok = lat[idx], ids[idx].clone()
        tok[(torch.rand(args.batch, generator=g) < 0.1).to(dev)] = empty  # unconditional rows, for guidance
        eps = torch.randn(x0.shape, generator=g).to(dev)
        t = torch.randint(0, noise.config.num_train_timesteps, (args.batch,), generator=g).to(dev)
        with autocast:
            cond = te(tok).last_hidden_state
            pred = unet(noise.add_noise(x0, eps, t), t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred.float(), eps)
        frac = 1.0 - (deadline - time.time()) / span
        if args.max_steps:
            frac = max(frac, step / args.max_steps)
        for grp in opt.param_groups:
            grp["lr"] = args.lr * min(1.0, (step + 1) / 200) * max(0.05, 1.0 - frac)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(args.ema_decay, (1 + step) / (10 + step))
            sd = unet.state_dict()
            torch._foreach_lerp_([ema[k] for k in floats], [sd[k].detach() for k in floats], 1 - d)
        losses.append(loss.detach())
        step += 1
        bar.update()
        if step % 50 == 0:
            losses[-50:] = [float(x) for x in losses[-50:]]  # one device sync per 50 steps
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    losses = [float(x) for x in losses]
    bar.close()
    out = Path(args.out)
    (out / "raw").mkdir(parents=True, exist_ok=True)  # the last weights before the EMA: to compare by eye
    save_file({k: v.detach().half().cpu().contiguous() for k, v in unet.state_dict().items()},
              out / "raw" / "unet.safetensors")
    unet.load_state_dict(ema)

    for name, m in (("unet", unet), ("text_encoder", te), ("vae", vae)):
        save_file({k: v.detach().half().cpu().contiguous() for k, v in m.state_dict().items()},
                  out / f"{name}.safetensors")
    report = {"command": "python scripts/train_world.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v is not None),
              "before": {k: v for k, v in before.items() if k != "loss_curve"},
              "torch": torch.__version__, "vae_scaling_factor": scale, "vae_seconds": round(t_vae),
              "vae_loss_last100": float(np.mean(vae_losses[-100:])) if vae_losses else None,
              "steps": step, "batch": args.batch,
              "seconds": round(time.time() - t0), "loss_last200": float(np.mean(losses[-200:])),
              "loss_curve": [float(np.mean(losses[i:i + 100])) for i in range(0, len(losses), 100)]}
    (out / "world.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "loss_curve"}, indent=1))


if __name__ == "__main__":
    main()
