"""The data recipe of the built-in model: one large shape on a background, with a five-word caption.

A scene is ``colour shape row column background``, e.g. ``red circle top left stripes``:

    colour      red green blue yellow magenta cyan
    shape       circle square triangle cross
    row         top middle bottom          (centre at 28, 64 or 100 px, jittered by up to 6 px)
    column      left center right
    background  plain stripes              (diagonal stripes at a random phase, not in the caption)

Pictures are 128 x 128 RGB in [0, 1]. The shape is about 56 px across, so at the model's 32 token rows
(4 px each) it always spans 14 rows and crosses the borders of PipeFusion's bands (M = 2, 4, 8); the
diagonal stripes cross every band. What the caption leaves open (jitter, size, stripe phase) must be chosen
once for the whole picture: a sampler that treats bands independently (naive patches) chooses it per band,
and the picture breaks at the band borders. Everything is drawn with torch from a seed; nothing is
downloaded.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SIZE = 128  # pixels per side
COLOURS = {"red": (0.9, 0.15, 0.1), "green": (0.15, 0.8, 0.2), "blue": (0.15, 0.3, 0.95),
           "yellow": (0.95, 0.85, 0.1), "magenta": (0.9, 0.15, 0.85), "cyan": (0.1, 0.85, 0.9)}
SHAPES = ("circle", "square", "triangle", "cross")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")
BACKGROUNDS = ("plain", "stripes")
ATTRIBUTES = {"colour": tuple(COLOURS), "shape": SHAPES, "row": ROWS, "column": COLUMNS, "background": BACKGROUNDS}
CENTRES = (28.0, 64.0, 100.0)
JITTER = 6.0
BG = (0.12, 0.12, 0.14)
STRIPE = (0.32, 0.32, 0.36)


@dataclass(frozen=True)
class Scene:
    """One caption's attributes (each an index into ATTRIBUTES' tuples)."""

    colour: int
    shape: int
    row: int
    column: int
    background: int

    @property
    def caption(self) -> str:
        return " ".join(ATTRIBUTES[k][getattr(self, k)] for k in ATTRIBUTES)

    def labels(self) -> tuple[int, ...]:
        return tuple(getattr(self, k) for k in ATTRIBUTES)


def parse(caption: str) -> Scene:
    """A caption back into its attributes; the error lists the words each position takes."""
    words = caption.lower().split()
    if len(words) != len(ATTRIBUTES):
        raise ValueError(f"a caption has {len(ATTRIBUTES)} words ({' '.join(ATTRIBUTES)}), e.g. "
                         f"'red circle top left plain'; got {len(words)}: {caption!r}")
    idx = {}
    for word, (name, choices) in zip(words, ATTRIBUTES.items()):
        if word not in choices:
            raise ValueError(f"caption word {word!r} is not a {name}: choose one of {', '.join(choices)}")
        idx[name] = choices.index(word)
    return Scene(**idx)


def random_scenes(n: int, generator: torch.Generator) -> list[Scene]:
    picks = [torch.randint(len(v), (n,), generator=generator) for v in ATTRIBUTES.values()]
    return [Scene(*(int(p[i]) for p in picks)) for i in range(n)]


def draw(scene: Scene, generator: torch.Generator) -> torch.Tensor:
    """The picture of ``scene`` with this generator's choice of jitter, size and stripe phase. [3, SIZE, SIZE]"""
    u = torch.rand(5, generator=generator)
    cy = CENTRES[scene.row] + (2 * u[0].item() - 1) * JITTER
    cx = CENTRES[scene.column] + (2 * u[1].item() - 1) * JITTER
    r = 24.0 + 6.0 * u[2].item()  # half the shape's size
    y, x = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    img = torch.tensor(BG)[:, None, None].expand(3, SIZE, SIZE).clone()
    if BACKGROUNDS[scene.background] == "stripes":
        phase = u[3].item() * 16.0
        on = ((x + y + phase) % 16.0) < 6.0
        img = torch.where(on, torch.tensor(STRIPE)[:, None, None], img)
    dy, dx = y - cy, x - cx
    kind = SHAPES[scene.shape]
    if kind == "circle":
        mask = dx ** 2 + dy ** 2 <= r ** 2
    elif kind == "square":
        s = r * 0.85
        mask = (dx.abs() <= s) & (dy.abs() <= s)
    elif kind == "triangle":  # apex up, base at cy + r * 0.8
        top, base = -r, r * 0.8
        half = (dy - top) / (base - top) * r
        mask = (dy >= top) & (dy <= base) & (dx.abs() <= half)
    else:  # cross
        w = r * 0.33
        mask = ((dx.abs() <= w) & (dy.abs() <= r)) | ((dy.abs() <= w) & (dx.abs() <= r))
    img = torch.where(mask, torch.tensor(COLOURS[ATTRIBUTES["colour"][scene.colour]])[:, None, None], img)
    return img


def batch(n: int, generator: torch.Generator) -> tuple[list[Scene], torch.Tensor]:
    """``n`` random scenes and their pictures. [n, 3, SIZE, SIZE]"""
    scenes = random_scenes(n, generator)
    return scenes, torch.stack([draw(s, generator) for s in scenes])


def demo_captions() -> list[str]:
    """The captions README's main job draws (objects across band borders, both backgrounds)."""
    return ["red circle middle center stripes", "yellow triangle top right plain",
            "blue cross bottom left stripes", "green square middle left plain"]
