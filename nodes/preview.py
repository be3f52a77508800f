"""Live previews of the worker group's sampling through ComfyUI's own preview callback
(``latent_preview.prepare_callback``), so the preview method the user chose (latent2rgb, TAESD) shows the
image forming as it does for the stock KSampler.

The workers hand over each step's x0 in token layout ([1, S_img, 4C], comfy_pipefusion/preview.py);
``x0_hook`` turns a ComfyUI callback ``(step, x0, x, total)`` into the ``on_preview(step, x0_tokens, total)``
the launcher calls. A node that has a ModelPatcher (the MODEL path) passes the callback ComfyUI gave it;
our KSampler has none and builds one with ``ksampler_preview``.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

import comfy.latent_formats
import latent_preview
from comfy.cli_args import LatentPreviewMethod, args

from comfy_pipefusion.models import family
from comfy_pipefusion.models.family import unpack_latent

# (channels, scale) of our families' latent formats -> ComfyUI's class (its latent2rgb factors, TAESD name)
_COMFY_FORMATS = {(16, 0.3611): "Flux", (16, 1.5305): "SD3", (4, 0.18215): "SD15", (4, 0.13025): "SDXL",
                  (128, 1.0): "Flux2"}


def previews_on() -> bool:
    """Whether ComfyUI was started with a preview method (``--preview-method``); without one no x0 is sent."""
    return args.preview_method != LatentPreviewMethod.NoPreviews


def comfy_latent_format(family_name: str, config: dict):
    """ComfyUI's latent format object for a model of ours, or None when ComfyUI has none for it (then no
    preview: e.g. the built-in model's pixel latent)."""
    fmt = family.get(family_name).latent_format(config)
    name = _COMFY_FORMATS.get((fmt.comfy_channels, round(fmt.scale, 5)))
    return getattr(comfy.latent_formats, name)() if name else None


def x0_hook(callback, latent_shape: tuple[int, ...], latent_format=None):
    """``on_preview(step, x0_tokens, total)`` calling ComfyUI's ``callback(step, x0, x, total)`` with x0 as a
    [1, C, h, w] latent of ``latent_shape`` ([B, C, h, w], the engine's layout), given to ComfyUI in its own
    (``latent_format.to_comfy``: Flux.2's folded channels); x is not available from the workers (None: the
    stock preview callback does not read it)."""
    h, w = latent_shape[2], latent_shape[3]
    to_comfy = latent_format.to_comfy if latent_format is not None else (lambda t: t)

    def on_preview(step: int, x0_tokens: torch.Tensor, total) -> None:
        callback(step, to_comfy(unpack_latent(x0_tokens, h, w)), None, total)
    return on_preview


def ksampler_preview(family_name: str, config: dict, latent_shape: tuple[int, ...], steps: int):
    """For our KSampler: ``on_preview`` feeding ComfyUI's preview callback, or None when previews are off.
    ``prepare_callback`` reads only the model's load device and latent format: a stand-in gives it those
    (the group's device is not ComfyUI's business; the previewer runs on the CPU)."""
    if not previews_on():
        return None
    fmt = comfy_latent_format(family_name, config)
    if fmt is None:
        return None
    stand_in = SimpleNamespace(load_device=torch.device("cpu"), model=SimpleNamespace(latent_format=fmt))
    return x0_hook(latent_preview.prepare_callback(stand_in, steps), latent_shape,
                   family.get(family_name).latent_format(config))
