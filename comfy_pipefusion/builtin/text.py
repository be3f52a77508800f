"""The built-in model's text encoder: one learned vector per caption word, trained with the model.

A caption's five words (scenes.py) become five text tokens [B, 5, WIDTH] (the Flux "T5" input) and their
mean is the pooled vector [B, WIDTH] (the Flux "CLIP" input). The table ships inside the model's checkpoint
as ``text_embedding.weight`` with the word list in the header metadata ``pipefusion.vocab``, so ComfyUI and
the demo encode captions without any download.
"""
from __future__ import annotations

import torch

from . import scenes

KEY = "text_embedding.weight"
VOCAB_KEY = "pipefusion.vocab"


def vocabulary() -> list[str]:
    return [w for words in scenes.ATTRIBUTES.values() for w in words]


def token_ids(captions: list[str], vocab: list[str]) -> torch.Tensor:
    """[B, 5] word indices; a caption outside the recipe is refused by ``scenes.parse`` (naming the word)."""
    index = {w: i for i, w in enumerate(vocab)}
    return torch.tensor([[index[w] for w in scenes.parse(c).caption.split()] for c in captions])


def encode(table: torch.Tensor, captions: list[str], vocab: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(text tokens [B, 5, WIDTH], pooled [B, WIDTH]) for ``captions`` with the embedding ``table``."""
    txt = table.float()[token_ids(captions, vocab)]
    return txt, txt.mean(1)
