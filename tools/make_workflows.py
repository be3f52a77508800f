"""Writes workflows/*.json (ComfyUI's UI format): Flux.1 dev on 2 and 4 GPUs, Flux.1 schnell on 2 GPUs,
SD3.5 large with true CFG (positive and negative) on 4 GPUs, PixArt-Σ 1024 on 2 GPUs, and the built-in trained
model on 2 CPU ranks (its own caption and decode nodes: runs anywhere without downloads).

    python tools/make_workflows.py

Stock nodes for everything but the DiT: the family's text encoder loader (DualCLIPLoader for Flux,
TripleCLIPLoader for SD3.5, CLIPLoader type pixart for PixArt) -> CLIPTextEncode (-> FluxGuidance), the
family's empty latent, VAELoader -> VAEDecode -> SaveImage. widgets_values follow each node's widget
inputs in ComfyUI's order.
"""
from __future__ import annotations

import json
from pathlib import Path


class Graph:
    def __init__(self) -> None:
        self.nodes, self.links = [], []

    def node(self, type_: str, pos, widgets, inputs=(), outputs=(), title=None) -> dict:
        n = {"id": len(self.nodes) + 1, "type": type_, "pos": list(pos), "size": [320, 130], "flags": {},
             "order": len(self.nodes), "mode": 0,
             "inputs": [{"name": name, "type": typ, "link": None} for name, typ in inputs],
             "outputs": [{"name": name, "type": typ, "links": [], "slot_index": i} for i, (name, typ) in enumerate(outputs)],
             "properties": {"Node name for S&R": type_}, "widgets_values": list(widgets)}
        if title:
            n["title"] = title
        self.nodes.append(n)
        return n

    def link(self, src: dict, out_slot: int, dst: dict, in_name: str) -> None:
        lid = len(self.links) + 1
        slot = next(i for i, x in enumerate(dst["inputs"]) if x["name"] == in_name)
        typ = src["outputs"][out_slot]["type"]
        self.links.append([lid, src["id"], out_slot, dst["id"], slot, typ])
        src["outputs"][out_slot]["links"].append(lid)
        dst["inputs"][slot]["link"] = lid

    def dump(self) -> dict:
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def _encoders(g: Graph, kind: str) -> dict:
    if kind == "flux":
        return g.node("DualCLIPLoader", (0, 0), ["t5xxl_fp16.safetensors", "clip_l.safetensors", "flux", "default"],
                      outputs=[("CLIP", "CLIP")])
    if kind == "sd3":
        return g.node("TripleCLIPLoader", (0, 0), ["clip_l.safetensors", "clip_g.safetensors",
                                                   "t5xxl_fp16.safetensors"], outputs=[("CLIP", "CLIP")])
    return g.node("CLIPLoader", (0, 0), ["t5xxl_fp16.safetensors", "pixart", "default"], outputs=[("CLIP", "CLIP")])


def workflow(kind: str, unet: str, devices: str, steps: int, cfg: float, guidance: float | None, prompt: str,
             negative: str, sampler_name: str, scheduler: str, vae_name: str, size: int) -> dict:
    g = Graph()
    clip = _encoders(g, kind)
    pos = g.node("CLIPTextEncode", (360, 0), [prompt], inputs=[("clip", "CLIP")],
                 outputs=[("CONDITIONING", "CONDITIONING")], title="Positive prompt")
    neg_title = "Negative (unused at cfg 1)" if cfg == 1.0 else "Negative prompt"
    neg = g.node("CLIPTextEncode", (360, 200), [negative], inputs=[("clip", "CLIP")],
                 outputs=[("CONDITIONING", "CONDITIONING")], title=neg_title)
    g.link(clip, 0, pos, "clip")
    g.link(clip, 0, neg, "clip")
    positive = pos
    if guidance is not None:
        positive = g.node("FluxGuidance", (720, 0), [guidance], inputs=[("conditioning", "CONDITIONING")],
                          outputs=[("CONDITIONING", "CONDITIONING")])
        g.link(pos, 0, positive, "conditioning")
    loader = g.node("PipeFusionDiTLoader", (0, 400), [unet, "default", devices, "pipefusion", 0, 1],
                    outputs=[("pipefusion_model", "PIPEFUSION_MODEL")])
    if kind == "pixart":
        latent = g.node("EmptyLatentImage", (360, 400), [size, size, 1], outputs=[("LATENT", "LATENT")])
    else:
        latent = g.node("EmptySD3LatentImage", (360, 400), [size, size, 1], outputs=[("LATENT", "LATENT")])
    sampler = g.node("PipeFusionKSampler", (1080, 100), [0, "randomize", steps, cfg, sampler_name, scheduler, 1.0, 0.0],
                     inputs=[("pipefusion_model", "PIPEFUSION_MODEL"), ("positive", "CONDITIONING"),
                             ("negative", "CONDITIONING"), ("latent_image", "LATENT")], outputs=[("LATENT", "LATENT")])
    g.link(loader, 0, sampler, "pipefusion_model")
    g.link(positive, 0, sampler, "positive")
    g.link(neg, 0, sampler, "negative")
    g.link(latent, 0, sampler, "latent_image")
    vae = g.node("VAELoader", (1080, 400), [vae_name], outputs=[("VAE", "VAE")])
    decode = g.node("VAEDecode", (1440, 100), [], inputs=[("samples", "LATENT"), ("vae", "VAE")],
                    outputs=[("IMAGE", "IMAGE")])
    g.link(sampler, 0, decode, "samples")
    g.link(vae, 0, decode, "vae")
    save = g.node("SaveImage", (1800, 100), ["PipeFusion"], inputs=[("images", "IMAGE")])
    g.link(decode, 0, save, "images")
    return g.dump()


def flux(unet: str, devices: str, steps: int, guidance: float | None, prompt: str) -> dict:
    return workflow("flux", unet, devices, steps, 1.0, guidance, prompt, "", "euler", "simple", "ae.safetensors",
                    1024)


def builtin(devices: str, steps: int, caption: str) -> dict:
    """The built-in trained model (comfy_pipefusion/builtin/shapes-flux.safetensors copied into
    models/diffusion_models): no text encoder, no VAE, no download; runs on CPU ranks."""
    g = Graph()
    loader = g.node("PipeFusionDiTLoader", (0, 0), ["shapes-flux.safetensors", "float32", devices, "pipefusion", 0, 1],
                    outputs=[("pipefusion_model", "PIPEFUSION_MODEL")])
    caption_node = g.node("PipeFusionBuiltinCaption", (360, 0), [caption, 1],
                          inputs=[("pipefusion_model", "PIPEFUSION_MODEL")],
                          outputs=[("conditioning", "CONDITIONING"), ("latent", "LATENT")])
    sampler = g.node("PipeFusionKSampler", (720, 0), [0, "randomize", steps, 1.0, "euler", "simple", 1.0, 0.0],
                     inputs=[("pipefusion_model", "PIPEFUSION_MODEL"), ("positive", "CONDITIONING"),
                             ("negative", "CONDITIONING"), ("latent_image", "LATENT")], outputs=[("LATENT", "LATENT")])
    g.link(loader, 0, caption_node, "pipefusion_model")
    g.link(loader, 0, sampler, "pipefusion_model")
    g.link(caption_node, 0, sampler, "positive")
    g.link(caption_node, 0, sampler, "negative")  # unused at cfg 1
    g.link(caption_node, 1, sampler, "latent_image")
    decode = g.node("PipeFusionBuiltinDecode", (1080, 0), [], inputs=[("samples", "LATENT")],
                    outputs=[("IMAGE", "IMAGE")])
    g.link(sampler, 0, decode, "samples")
    save = g.node("SaveImage", (1440, 0), ["PipeFusion-builtin"], inputs=[("images", "IMAGE")])
    g.link(decode, 0, save, "images")
    return g.dump()


PROMPT = "a lighthouse on a cliff at dawn, oil painting"
WORKFLOWS = {
    "flux1-dev-2gpu.json": flux("flux1-dev.safetensors", "0,1", 20, 3.5, PROMPT),
    "flux1-dev-4gpu.json": flux("flux1-dev.safetensors", "0,1,2,3", 20, 3.5, PROMPT),
    "flux1-schnell-2gpu.json": flux("flux1-schnell.safetensors", "0,1", 4, None, PROMPT),
    "sd3.5-large-4gpu-cfg.json": workflow("sd3", "sd3.5_large.safetensors", "0,1,2,3", 28, 4.5, None, PROMPT,
                                          "blurry, low quality, watermark", "dpmpp_2m", "sgm_uniform",
                                          "sd3.5_vae.safetensors", 1024),
    "pixart-sigma-1024-2gpu.json": workflow("pixart", "PixArt-Sigma-XL-2-1024-MS.safetensors", "0,1", 20, 4.5, None,
                                            PROMPT, "blurry, low quality", "euler", "normal", "sdxl_vae.safetensors",
                                            1024),
    "builtin-shapes-cpu2.json": builtin("cpu:2", 8, "red circle middle center stripes"),
}

if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "workflows"
    for name, wf in WORKFLOWS.items():
        (out / name).write_text(json.dumps(wf, indent=1) + "\n")
        print("wrote", out / name)
