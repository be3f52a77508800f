"""LoRA files as trainers write them, for tests: kohya (lora_unet_*), diffusers/peft (transformer.*.lora_A/B) and
LyCORIS LoKr (lokr_w1/w2), for the small Flux and SD3.5 checkpoints of tests/test_parity_comfy.py. The target
layers are given in each format's own names; ComfyUI's LoRA key maps turn them into its weight keys."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

RANK = 4
# (kohya targets: original key without .weight, [out, in]), (diffusers targets: diffusers key, [out, in]),
# LoKr target (original key, [out, in])
TARGETS = {
    "flux": ([("double_blocks.0.img_attn.qkv", (9216, 3072)), ("double_blocks.0.txt_mlp.0", (12288, 3072)),
              ("single_blocks.0.linear1", (21504, 3072))],
             [("transformer_blocks.0.attn.to_q", (3072, 3072)), ("transformer_blocks.0.attn.add_v_proj", (3072, 3072)),
              ("single_transformer_blocks.0.proj_out", (3072, 15360))],
             ("double_blocks.0.img_mlp.0", (12288, 3072))),
    "sd3": ([("joint_blocks.0.x_block.attn.qkv", (576, 192)), ("joint_blocks.1.context_block.mlp.fc1", (768, 192))],
            [("transformer_blocks.0.attn.to_q", (192, 192)), ("transformer_blocks.2.ff.net.0.proj", (768, 192))],
            ("joint_blocks.0.x_block.mlp.fc1", (768, 192))),
}


def _pair(g: torch.Generator, out: int, inp: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    down = torch.randn(RANK, inp, generator=g) * scale
    up = torch.randn(out, RANK, generator=g) * scale
    return down, up


def write_kohya(path: Path, family: str, seed: int = 1, scale: float = 0.05) -> Path:
    g, tensors = torch.Generator().manual_seed(seed), {}
    for key, (out, inp) in TARGETS[family][0]:
        name = "lora_unet_" + key.replace(".", "_")
        down, up = _pair(g, out, inp, scale)
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
        tensors[f"{name}.alpha"] = torch.tensor(float(RANK))
    save_file(tensors, str(path))
    return path


def write_peft(path: Path, family: str, seed: int = 2, scale: float = 0.05) -> Path:
    g, tensors = torch.Generator().manual_seed(seed), {}
    for key, (out, inp) in TARGETS[family][1]:
        down, up = _pair(g, out, inp, scale)
        tensors[f"transformer.{key}.lora_A.weight"], tensors[f"transformer.{key}.lora_B.weight"] = down, up
    save_file(tensors, str(path))
    return path


def write_lokr(path: Path, family: str, seed: int = 3, scale: float = 0.05) -> Path:
    g = torch.Generator().manual_seed(seed)
    key, (out, inp) = TARGETS[family][2]
    name = "lora_unet_" + key.replace(".", "_")
    w1 = torch.randn(4, 4, generator=g)
    w2 = torch.randn(out // 4, inp // 4, generator=g) * scale * 0.1
    save_file({f"{name}.lokr_w1": w1, f"{name}.lokr_w2": w2}, str(path))
    return path
