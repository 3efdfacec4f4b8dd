"""ED-LoRA (Mix-of-Show; docs/design.md, "ED-LoRA"): a concept's layer-wise token embeddings plus LoRA, and one training step.

`train_step` is the only implementation of a step: `tune()` and `bench/tune_step.py` both call it. With
layer-wise ids [B, L, 77] it is an ED-LoRA step (16 text-encoder passes, 4-D conditioning); with ids [B, 77] it is
a plain LoRA step on the same model (one pass, 3-D conditioning), which is what the benchmark compares against.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from mos.client.tuning import prior as prior_mod
from mos.client.tuning.attention_reg import AttentionRecorder, attention_loss, recording
from mos.client.tuning.data import Batch, seeded
from mos.client.tuning.settings import KIND_DEFAULTS, RECIPES, recipe_for
from mos.shared.sd import lora as lora_mod
from mos.shared.sd.base import Base
from mos.shared.sd.concepts import Concept
from mos.shared.sd.model import ConceptModel
from mos.shared.sd.sites import input_sites


@dataclass(frozen=True)
class TuneConfig:
    """Everything that decides what a tuning run computes (it is part of the adapter cache key)."""

    steps: int | None = None  # None: DEFAULT_PASSES over the images, capped per device (tune() resolves it)
    # None: the base's recipe (settings.RECIPES: the paper's on real bases, the measured one on the toy bases)
    rank: int | None = None
    spatial_rank: int | None = None      # the spatial layers' rank (sd/sites.py stage 3); None: `rank`
    batch_size: int | None = None
    seed: int = 0
    lr_embedding: float | None = None
    lr_text_encoder: float | None = None
    lr_unet: float | None = None
    placement: str | None = None         # which layers carry LoRA: attention | transformer | wide (sd/sites.py)
    mask_outside: float | None = None    # loss weight outside a concept's mask (0: the paper's masked loss, 1: none)
    weight_decay: float = 0.01
    noise_offset: float = 0.01
    embedding_norm_stop: float = 0.55
    attention_reg: float | None = None   # weight of the mask attention regulariser (0: off)
    prior: float | None = None           # weight of the class pictures' loss (prior.py; 0: off)
    # full: token b's attention should match the mask; partial: only kept inside it (the reference's default,
    # reg_full_identity: false); off. None: the concept's kind decides (settings.KIND_DEFAULTS)
    attention_reg_mode: str | None = None
    crop: str | None = None              # square | human (data.py); None: the concept's kind decides
    captions: str = "augment"            # augment: bare captions drawn from the kind's prompts, tags shuffled; fixed
    grad_accum: int | None = None        # micro-batches per optimiser step; None: 1, or batch_plan's on real bases
    init_std: float = 0.013
    trigger: str = ""  # plain LoRA: no concept tokens, the handle stands for these words (the paper's LoRA baseline)

    def as_dict(self) -> dict:
        d = asdict(self)
        if d["spatial_rank"] is None:  # unset, it changes nothing: runs tuned before the field existed stay cached
            del d["spatial_rank"]
        return d

    def resolved(self, base_spec: str) -> "TuneConfig":
        """Every field the base's recipe decides, filled in (what a run uses, and what its cache key records).
        A recipe without `steps` leaves them to tune(): DEFAULT_PASSES over the images."""
        recipe = RECIPES[recipe_for(base_spec)]
        return replace(self, **{k: v for k, v in recipe.items() if getattr(self, k) is None})

    def for_kind(self, kind: str) -> "TuneConfig":
        """Crop and attention-regulariser mode filled in from the concept's kind where unset."""
        return replace(self, **{k: v for k, v in KIND_DEFAULTS[kind].items() if getattr(self, k) is None})

    @property
    def regularised(self) -> bool:
        return bool(self.attention_reg) and self.attention_reg_mode != "off"


@dataclass
class StepStats:
    loss: float
    mse: float
    attention: float
    embedding_norm: float
    embedding_frozen: bool


@dataclass
class Trainer:
    """A ConceptModel being tuned: its trainable tensors, optimiser, noise schedule and step state."""

    model: ConceptModel
    concept: Concept
    config: TuneConfig
    embedding: torch.nn.Parameter
    lora: dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]]  # layer -> (A, B) as peft holds them
    optimizer: torch.optim.AdamW
    noise: DDPMScheduler
    scaler: torch.amp.GradScaler
    recorder: AttentionRecorder | None = None
    prior: prior_mod.Prior | None = None  # the base's class pictures, when the config weighs them
    embedding_frozen: bool = False
    embedding_frozen_at: int | None = None  # the step after which embeddings stopped changing
    losses: list[float] = field(default_factory=list)

    @property
    def base(self) -> Base:
        return self.model.base

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Stable names for checkpoints: `embedding`, `lora.<layer>.A`, `lora.<layer>.B`."""
        out = {"embedding": self.embedding}
        for layer, (A, B) in self.lora.items():
            out[f"lora.{layer}.A"], out[f"lora.{layer}.B"] = A, B
        return out

    def freeze_embedding(self, step: int | None) -> None:
        self.embedding.requires_grad_(False)
        self.embedding.grad = None
        self.embedding_frozen = True
        self.embedding_frozen_at = step

    def autocast(self):
        dt = self.base.dtype
        if dt == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.base.device.type, dtype=dt)

    @contextlib.contextmanager
    def attention_recording(self):
        """Record concept-token attention (for the mask regulariser) while inside; stock processors after."""
        with recording(self.base.unet) as rec:
            self.recorder = rec
            try:
                yield rec
            finally:
                self.recorder = None


def plain_trigger(class_word: str) -> str:
    """The plain-LoRA baseline's trigger words: a rare token before the class word, as DreamBooth writes it."""
    return f"sks {class_word}".strip()


def layer_ranks(base: Base, config: TuneConfig) -> dict[str, int]:
    """{layer: LoRA rank}: `rank` on the text encoder and the cross-attention k/v, `spatial_rank` (if set) on the
    spatial layers, which the concept's shape is learned in and fusion's third stage has to share between concepts."""
    spatial = config.spatial_rank or config.rank
    return {layer: spatial if site.stage == 3 else config.rank
            for site in input_sites(base.text_encoder, base.unet, config.placement) for layer in site.layers}


def make_trainer(base: Base, name: str, class_word: str, config: TuneConfig,
                 gradient_checkpointing: bool = False, init_word: str | None = None) -> Trainer:
    """Add the concept (token a random σ=init_std or the init word, token b = class word, per layer) and rank-r
    LoRA to `base`.
    With config.trigger, a plain LoRA: the concept has no tokens, its handle stands for the trigger words.
    Fields the config leaves unset come from the base's recipe."""
    config = config.resolved(base.spec)
    model = ConceptModel(base)
    g = seeded(config.seed, "init", 0)
    if config.trigger:
        empty = torch.zeros(model.n_layers, 0, base.text_encoder.config.hidden_size)
        concept = Concept(name, class_word, empty, trigger=config.trigger)
    else:
        concept = Concept(name, class_word, model.prompts.init_embeddings(class_word, g, config.init_std, init_word))
    embedding = model.prompts.add(concept, trainable=not config.trigger)
    lora_mod.inject(model.models, layer_ranks(base, config))
    lora = init_lora(model.models, g)
    embedding.requires_grad_(not config.trigger)  # peft's injection froze every non-LoRA parameter, these rows too
    groups = [
        *([] if config.trigger else [{"params": [embedding], "lr": config.lr_embedding, "name": "embedding"}]),
        {"params": [p for layer, ab in lora.items() if layer.startswith("text_encoder.") for p in ab],
         "lr": config.lr_text_encoder, "name": "text_encoder"},
        {"params": [p for layer, ab in lora.items() if layer.startswith("unet.") for p in ab],
         "lr": config.lr_unet, "name": "unet"},
    ]
    for grp in groups:
        grp["initial_lr"] = grp["lr"]
    # torch's fused AdamW (one kernel for every tensor) is the same update, ~5 % of a step cheaper on a toy base
    fused = base.device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay, fused=fused or None)
    if gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        te = base.text_encoder
        (te.activation_checkpointing_enable if hasattr(te, "activation_checkpointing_enable")
         else te.gradient_checkpointing_enable)()  # transformers 5 renamed it
        te.train()  # transformers checkpoints only in train mode; CLIP has no dropout to wake
    sched_cfg = {k: v for k, v in base.scheduler_config.items() if not k.startswith("_")}
    scaler = torch.amp.GradScaler(base.device.type, enabled=base.dtype == torch.float16)
    trainer = Trainer(model, concept, config, embedding, lora, optimizer, DDPMScheduler.from_config(sched_cfg),
                      scaler)
    if config.trigger:
        trainer.freeze_embedding(None)  # nothing to tune but the LoRA
    return trainer


def init_lora(models: dict[str, torch.nn.Module], g: torch.Generator
              ) -> dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """fp32 LoRA weights, A drawn on the CPU from `g` (peft's init draws from the global, device-specific RNG).

    A ~ U(±1/sqrt(d_in)) is peft's kaiming-uniform(a=√5) bound; B = 0, so tuning starts at the base model.
    """
    out = {}
    with torch.no_grad():
        for layer, m in sorted(lora_mod.lora_layers(models).items()):
            la, lb = m.lora_A[lora_mod.ADAPTER], m.lora_B[lora_mod.ADAPTER]
            la.float(), lb.float()
            bound = 1.0 / math.sqrt(la.weight[0].numel())  # fan-in: a convolution's is C·k·k
            la.weight.copy_((torch.rand(la.weight.shape, generator=g) * 2 - 1) * bound)
            lb.weight.zero_()
            la.weight.requires_grad_(True)
            lb.weight.requires_grad_(True)
            out[layer] = (la.weight, lb.weight)
    return out


def token_ids(trainer: Trainer, captions: list[str], layerwise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, positions): ids [B, L, 77] (layer-wise) or [B, 77] (plain: token a only, layer 0's row);
    positions [B, 2] of the concept's tokens a and b (for the attention regulariser)."""
    prompts = trainer.model.prompts
    handle = trainer.concept.handle
    texts = [c.replace("<TOK>", handle) for c in captions]
    ids = prompts.layerwise_ids(texts)  # [B, L, n]
    if trainer.concept.trigger:  # the same ids in every layer; the regulariser watches the first two trigger tokens
        mask = prompts.concept_mask(texts)
        first = mask.int().argmax(1)
        last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)
        return (ids if layerwise else ids[:, 0]), torch.stack([first, torch.minimum(first + 1, last)], 1)
    emb = prompts.embedding
    c = prompts.table_index(trainer.concept.name)
    rows = torch.tensor([emb.row(c, 0, 0), emb.row(c, 0, 1)])
    first = ids[:, 0]
    hit = first[:, :, None] == rows  # [B, n, 2]
    positions = torch.where(hit.any(1), hit.int().argmax(1), 0)
    if layerwise:
        return ids, positions
    # plain LoRA: drop token b, pad at the end so the length stays the same
    pad = prompts.tokenizer.pad_token_id
    plain = [torch.cat([r[r != rows[1]], torch.full((int((r == rows[1]).sum()),), pad)]) for r in first]
    return torch.stack(plain), positions


def set_learning_rates(trainer: Trainer, step: int) -> None:
    """Linear decay from each group's initial rate to zero at the last step."""
    factor = max(0.0, 1.0 - step / max(1, trainer.config.steps))
    for grp in trainer.optimizer.param_groups:
        grp["lr"] = grp["initial_lr"] * factor


def train_step(trainer: Trainer, batch: Batch | list[Batch], step: int, layerwise: bool = True,
               use_masks: bool = True) -> StepStats:
    """One optimiser step on `batch`, or on a list of micro-batches whose gradients accumulate (each weighs the
    same; micro-batch k of step s draws its noise as draw s·len + k, so one micro-batch is the plain step)."""
    set_learning_rates(trainer, step)
    micro = batch if isinstance(batch, list) else [batch]
    loss = mse = reg = 0.0
    for k, b in enumerate(micro):
        terms = [t / len(micro) for t in compute_loss(trainer, b, step * len(micro) + k, layerwise, use_masks)]
        trainer.scaler.scale(terms[0]).backward()
        loss, mse, reg = loss + terms[0].detach(), mse + terms[1].detach(), reg + terms[2].detach()
    trainer.scaler.step(trainer.optimizer)
    trainer.scaler.update()
    trainer.optimizer.zero_grad(set_to_none=True)
    norm = embedding_norm(trainer)
    if not trainer.embedding_frozen and norm >= trainer.config.embedding_norm_stop:
        trainer.freeze_embedding(step + 1)  # the reference stops embedding updates here: larger norms drown prompts
    value = float(loss)
    trainer.losses.append(value)
    return StepStats(value, float(mse), float(reg), norm, trainer.embedding_frozen)


def embedding_norm(trainer: Trainer) -> float:
    """Mean norm of the concept's token embeddings (0 for a plain LoRA, which has none)."""
    with torch.no_grad():
        return float(trainer.embedding.norm(dim=-1).mean()) if trainer.embedding.numel() else 0.0


def compute_loss(trainer: Trainer, batch: Batch, step: int, layerwise: bool = True, use_masks: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, mse, attention regulariser) of the model on `batch` with the noise and timesteps of draw `step`;
    padding (batch.valid) never counts. With a prior (prior.py), the loss also holds its class pictures' error."""
    cfg, base = trainer.config, trainer.base
    dev, vae = base.device, base.vae
    g = seeded(cfg.seed, "noise", step)
    ids, positions = token_ids(trainer, batch.captions, layerwise)
    masked = use_masks and bool(batch.has_mask.any())
    regularised = masked and trainer.recorder is not None

    with torch.no_grad():
        dist = vae.encode(batch.pixels.to(dev, vae.dtype)).latent_dist
        latents = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g).to(dev, dist.mean.dtype)
        latents = latents.float() * vae.config.scaling_factor
    if trainer.recorder is not None:
        trainer.recorder.start(positions if regularised else None)
    err = denoising_error(trainer, latents, ids, g, layerwise)
    valid = None if batch.valid is None else batch.valid.to(dev)
    if masked or valid is not None:
        has = batch.has_mask.to(dev) & masked
        mse = masked_mse(err, batch.masks.to(dev), has, cfg.mask_outside, valid)
    else:
        mse = err.mean()
    reg = (attention_loss(trainer.recorder.take(), batch.masks, batch.has_mask, cfg.attention_reg_mode or "full")
           if regularised else err.new_zeros(()))
    loss = mse + cfg.attention_reg * reg
    if trainer.prior is not None and cfg.prior:
        loss = loss + cfg.prior * prior_error(trainer, step, layerwise)
    return loss, mse, reg


def prior_error(trainer: Trainer, step: int, layerwise: bool = True) -> torch.Tensor:
    """Mean denoising error on the class pictures of `step` (prior.py), under their class captions."""
    latents, captions = prior_mod.pick(trainer.prior, trainer.config.seed, step)
    ids = trainer.model.prompts.layerwise_ids(captions)
    g = seeded(trainer.config.seed, "prior-noise", step)
    return denoising_error(trainer, latents.to(trainer.base.device), ids if layerwise else ids[:, 0], g,
                           layerwise).mean()


def denoising_error(trainer: Trainer, latents: torch.Tensor, ids: torch.Tensor, g: torch.Generator,
                    layerwise: bool = True) -> torch.Tensor:
    """Squared error [B, C, h, w] of the model's prediction on `latents` noised with draws from `g`, under
    token ids [B, L, 77] (layer-wise) or [B, 77]."""
    cfg, base = trainer.config, trainer.base
    dev = base.device
    b, ch = latents.shape[:2]
    noise = torch.randn(latents.shape, generator=g) + cfg.noise_offset * torch.randn((b, ch, 1, 1), generator=g)
    t = torch.randint(0, trainer.noise.config.num_train_timesteps, (b,), generator=g)
    noise, t = noise.to(dev), t.to(dev)
    noisy = trainer.noise.add_noise(latents, noise, t)
    target = prediction_target(trainer, latents, noise, t)
    with trainer.autocast():
        hidden = encode_rows(base.text_encoder, ids.reshape(-1, ids.shape[-1]).to(dev))
        cond = hidden.view(b, -1, *hidden.shape[1:]) if layerwise else hidden
        pred = base.unet(noisy, t, encoder_hidden_states=cond).sample
    return (pred.float() - target.float()) ** 2


def encode_rows(text_encoder: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The text encoder's last hidden states [rows, n, dim] for ids [rows, n], each distinct row encoded once.

    Rows repeat where layers share ids (a plain-LoRA trigger concept has the same ids in all L layers, so its
    B·L rows hold only B distinct ones) and where a batch holds one caption twice (padding of a short batch,
    small concept folders). Each row is encoded on its own (no attention across rows), so a repeated row's
    states are a copy of the first's: gathering them is exact, and autograd sums the copies' gradients as the
    separate passes would. ED-LoRA rows differ in every layer (each has its own concept embeddings) and go
    through unchanged, in their own order.
    """
    unique, inverse = torch.unique(ids, dim=0, return_inverse=True)
    if len(unique) == len(ids):
        return text_encoder(ids).last_hidden_state
    return text_encoder(unique).last_hidden_state[inverse]


def prediction_target(trainer: Trainer, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    kind = trainer.base.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return trainer.noise.get_velocity(latents, noise, t)
    if kind == "sample":
        return latents
    raise ValueError(f"base has prediction_type {kind!r}: tuning supports epsilon, v_prediction and sample")


def masked_mse(err: torch.Tensor, masks: torch.Tensor, has_mask: torch.Tensor, outside: float = 0.0,
               valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean of `err` weighted by the mask at latent size (weight `outside` where the mask is 0); a crop
    that missed the mask counts whole. Where `valid` is 0 (a crop's padding) nothing counts."""
    w = F.interpolate(masks.float(), size=err.shape[-2:], mode="area")
    w = w + outside * (1 - w)
    empty = w.sum((1, 2, 3)) < 1.0
    w = torch.where((has_mask & ~empty)[:, None, None, None], w, torch.ones_like(w))
    if valid is not None:
        w = w * F.interpolate(valid.float(), size=err.shape[-2:], mode="area")
    per = (err * w).sum((1, 2, 3)) / (w.sum((1, 2, 3)) * err.shape[1])
    return per.mean()
