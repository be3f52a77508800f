"""Which weight of our model a LoRA file's key targets, for the names ComfyUI's LoRA loaders accept.

Two kinds of target:
    ("original", key, rows)  a tensor of the family's original single-file layout (ComfyUI's own: Flux's fused
                             ``double_blocks.N.img_attn.qkv``, SD3's ``joint_blocks``), named as
                             ``diffusion_model.<module>``, ``<module>`` or kohya's ``lora_unet_<module with _>``;
                             ``rows``: a row range of it (Flux's ``single_blocks.N.linear1_qkv``), else None.
                             The adapter applies to the whole original tensor, assembled from our pieces (the
                             models/keys_*.py maps), so a fused target behaves exactly as in ComfyUI.
    ("ours", key, None)      a tensor of our (diffusers) model, named ``transformer.<module>`` (diffusers/peft),
                             ``base_model.model.<module>``, ``lora_transformer_<module with _>`` (OneTrainer),
                             ``lycoris_<module with _>`` (SimpleTuner).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..models.keymap import KeyMap, sources


@dataclass(frozen=True)
class Target:
    where: str  # "original" | "ours"
    key: str  # the weight's key (ending in .weight)
    rows: tuple[int, int] | None = None


def _modules(keys) -> list[str]:
    return [k[:-len(".weight")] for k in keys if k.endswith(".weight")]


def aliases(kmap: KeyMap, family: str, width: int) -> dict[str, Target]:
    """Every name a file may use for a target of this model -> the target."""
    out: dict[str, Target] = {}
    for m in _modules(sources(kmap)):
        t = Target("original", m + ".weight")
        for name in (f"diffusion_model.{m}", m, "lora_unet_" + m.replace(".", "_")):
            out[name] = t
        if family == "flux" and m.endswith(".linear1"):  # ComfyUI: the q, k, v rows of a single block's linear1
            t = Target("original", m + ".weight", (0, 3 * width))
            out[f"diffusion_model.{m}_qkv"] = out[f"{m}_qkv"] = t
    for m in _modules(kmap):
        t = Target("ours", m + ".weight")
        u = m.replace(".", "_")
        for name in (f"transformer.{m}", f"base_model.model.{m}", f"unet.base_model.model.{m}",
                     f"lora_transformer_{u}", f"lycoris_{u}"):
            out[name] = t
        out.setdefault(m, t)
    return out


def owners(kmap: KeyMap) -> dict[str, list[tuple[str, list[tuple[int, int | None, int]]]]]:
    """Original key -> [(our key, [(first row, end row or None, the rows' offset in our tensor)])]."""
    out: dict[str, list] = {}
    for ours, pieces in kmap.items():
        row, mine = 0, {}
        for key, start, stop in pieces:
            mine.setdefault(key, []).append((start, stop, row))
            row += 0 if stop is None else stop - start
        for key, spans in mine.items():
            out.setdefault(key, []).append((ours, spans))
    return out
