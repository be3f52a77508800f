"""Training of the built-in model: rectified flow (Flux's objective) on scenes.py's pictures.

For a clean latent x0 (latent.py, packed into tokens), noise n and t ~ logit-normal(0, 1):
x_t = (1 - t) x0 + t n, and the model learns the velocity n - x0, which is what the engine's Flux sampling
(denoised = x_t - sigma * v, timestep = sigma) expects. The text table (text.py) is learned with it.
Deterministic from ``seed`` (data, initialisation, timesteps) on a given torch build and thread count.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch

from ..models.family import pack_latent
from ..models.flux import image_ids
from . import latent, model as builtin, scenes, text

log = logging.getLogger("comfy_pipefusion.builtin.train")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2500
    """Optimiser steps."""
    batch: int = 8
    """Pictures per step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW), after a linear warm-up of ``warmup`` steps, cosine down to 10 %."""
    warmup: int = 50
    seed: int = 0
    """Seeds the initialisation, the scenes, the noise and the timesteps."""
    log_every: int = 25
    native_every: int = 3
    """Every this many steps a batch of ``native_batch`` native-size (128 px, 1024 tokens) pictures; the other
    steps draw half-size pictures (256 tokens: 1/10 of the attention work), which teach the scenes cheaply."""
    native_batch: int = 4
    native_from: float = 0.0
    """Fraction of the steps before native-size batches start."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "log_every", "native_every", "native_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")


@dataclass
class TrainResult:
    model: torch.nn.Module
    table: torch.Tensor
    losses: list[float] = field(default_factory=list)  # mean loss of each log_every window
    seconds: float = 0.0


def positions(size: int) -> torch.Tensor:
    """RoPE ids of a ``size``-pixel picture's tokens, in units of the native picture's tokens: a picture drawn
    at half size has 16 x 16 tokens at ids 0.5, 2.5, ... (each covers two native tokens), so what the model
    learns about positions holds at the native 32 x 32."""
    n = size // (2 * latent.FOLD)
    scale = scenes.SIZE / size
    ids = image_ids(n, n)
    ids[:, 1:] = ids[:, 1:] * scale + (scale - 1) / 2
    return ids


def flow_loss(model, table: torch.Tensor, vocab: list[str], imgs: torch.Tensor, captions: list[str],
              g: torch.Generator) -> torch.Tensor:
    """Rectified-flow velocity loss of one batch (pictures of any even size; positions as ``positions``)."""
    x0 = pack_latent(latent.encode(imgs))  # [B, (size/4)^2, 48]
    noise = torch.randn(x0.shape, generator=g)
    t = torch.sigmoid(torch.randn(x0.shape[0], generator=g))  # [B]
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    ids = text.token_ids(captions, vocab)
    txt = table[ids]  # [B, 5, W]
    v = model(hidden_states=xt, encoder_hidden_states=txt, pooled_projections=txt.mean(1), timestep=t,
              img_ids=positions(imgs.shape[-1]), txt_ids=torch.zeros(txt.shape[1], 3), return_dict=False)[0]
    return torch.nn.functional.mse_loss(v, noise - x0)


def train(cfg: TrainConfig, start: tuple[torch.nn.Module, torch.Tensor] | None = None,
          on_log=None) -> TrainResult:
    """Train from scratch (or from ``start`` = (model, table)); ``on_log(step, loss)`` every log_every steps."""
    vocab = text.vocabulary()
    if start is None:
        model = builtin.build(seed=cfg.seed)
        g0 = torch.Generator().manual_seed(cfg.seed + 1)
        table = torch.randn(len(vocab), builtin.WIDTH_TEXT, generator=g0)
    else:
        model, table = start
    table = torch.nn.Parameter(table.clone().float())
    model.train()
    opt = torch.optim.AdamW([*model.parameters(), table], lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    g = torch.Generator().manual_seed(cfg.seed + 2)
    result = TrainResult(model, table)
    window, began = [], time.perf_counter()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        native = step >= cfg.native_from * cfg.steps and step % cfg.native_every == cfg.native_every - 1
        sc, imgs = scenes.batch(cfg.native_batch if native else cfg.batch, g)
        if not native:
            imgs = torch.nn.functional.avg_pool2d(imgs, 2)
        loss = flow_loss(model, table, vocab, imgs, [s.caption for s in sc], g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*model.parameters(), table], 1.0)
        opt.step()
        window.append(loss.item())
        if len(window) == cfg.log_every or step == cfg.steps - 1:
            result.losses.append(sum(window) / len(window))
            window = []
            if on_log:
                on_log(step + 1, result.losses[-1])
    result.seconds = time.perf_counter() - began
    model.eval()
    result.table = table.detach()
    return result
