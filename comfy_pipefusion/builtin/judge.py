"""The judge: a small convolutional classifier of a picture's scene attributes (scenes.py), trained on the
same recipe as the model, so fidelity is measured on what the picture shows rather than on latent numbers.

Its agreement with a caption is the fraction of the five attributes (colour, shape, row, column,
background) it reads off the picture that the caption names. It ships beside the model's weights as
``shapes-judge.safetensors`` and is trained by ``tools/train_builtin.py`` (``--judge-only`` for it alone).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from . import scenes

SUFFIX = "-judge.safetensors"
HEADS = {k: len(v) for k, v in scenes.ATTRIBUTES.items()}


class Judge(nn.Module):
    """[B, 3, 128, 128] pictures in [0, 1] -> one logit vector per attribute (looked at 64 x 64)."""

    def __init__(self) -> None:
        super().__init__()
        c = 32
        self.body = nn.Sequential(
            nn.Conv2d(3, c, 3, stride=2, padding=1), nn.ReLU(),  # 32
            nn.Conv2d(c, c, 3, stride=2, padding=1), nn.ReLU(),  # 16
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.ReLU(),  # 8
            nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1), nn.ReLU(),  # 4
            nn.Flatten(), nn.Linear(2 * c * 16, 128), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(128, n) for k, n in HEADS.items()})

    def forward(self, img: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(nn.functional.avg_pool2d(img * 2 - 1, 2))
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def read(self, img: torch.Tensor) -> torch.Tensor:
        """Attribute indices read off the pictures. [B, 5]"""
        out = self.eval()(img.float())
        return torch.stack([out[k].argmax(-1) for k in HEADS], -1)

    def agreement(self, img: torch.Tensor, captions: list[str]) -> float:
        """Mean fraction of the captions' attributes the pictures show."""
        want = torch.tensor([scenes.parse(c).labels() for c in captions])
        return float((self.read(img) == want).float().mean())


def train_judge(steps: int = 400, batch: int = 32, seed: int = 0, lr: float = 2e-3, on_log=None) -> tuple[Judge, float]:
    """Train on freshly drawn scenes (a little noise added, so it reads imperfect samples too)."""
    torch.manual_seed(seed)
    judge, g = Judge(), torch.Generator().manual_seed(seed + 10)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr)
    began = time.perf_counter()
    for step in range(steps):
        sc, imgs = scenes.batch(batch, g)
        imgs = (imgs + 0.08 * torch.randn(imgs.shape, generator=g)).clamp(0, 1)
        labels = torch.tensor([s.labels() for s in sc])
        out = judge(imgs)
        loss = sum(nn.functional.cross_entropy(out[k], labels[:, i]) for i, k in enumerate(HEADS))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_log and (step + 1) % 50 == 0:
            on_log(step + 1, loss.item())
    return judge.eval(), time.perf_counter() - began


def path_beside(checkpoint: str | Path) -> Path:
    p = Path(checkpoint)
    return p.with_name(p.name.removesuffix(".safetensors") + SUFFIX)


def save(judge: Judge, path: str | Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(path))


def load(path: str | Path) -> Judge:
    from safetensors.torch import load_file

    judge = Judge()
    judge.load_state_dict(load_file(str(path)))
    return judge.eval()


def load_beside(checkpoint: str | Path) -> Judge | None:
    """The judge trained with ``checkpoint``, or None where none was written."""
    p = path_beside(checkpoint)
    return load(p) if p.is_file() else None
