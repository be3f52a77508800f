"""Writes workflows/*.json (ComfyUI's UI format): Flux.1 dev on 2 and 4 GPUs, Flux.1 schnell on 2 GPUs.

    python tools/make_workflows.py

Stock nodes for everything but the DiT: DualCLIPLoader -> CLIPTextEncode (-> FluxGuidance), VAELoader ->
VAEDecode -> SaveImage. widgets_values follow each node's widget inputs in ComfyUI's order.
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


def flux(unet: str, devices: str, steps: int, guidance: float | None, prompt: str) -> dict:
    g = Graph()
    clip = g.node("DualCLIPLoader", (0, 0), ["t5xxl_fp16.safetensors", "clip_l.safetensors", "flux", "default"],
                  outputs=[("CLIP", "CLIP")])
    pos = g.node("CLIPTextEncode", (360, 0), [prompt], inputs=[("clip", "CLIP")],
                 outputs=[("CONDITIONING", "CONDITIONING")], title="Positive prompt")
    neg = g.node("CLIPTextEncode", (360, 200), [""], inputs=[("clip", "CLIP")],
                 outputs=[("CONDITIONING", "CONDITIONING")], title="Negative (unused at cfg 1)")
    g.link(clip, 0, pos, "clip")
    g.link(clip, 0, neg, "clip")
    positive = pos
    if guidance is not None:
        positive = g.node("FluxGuidance", (720, 0), [guidance], inputs=[("conditioning", "CONDITIONING")],
                          outputs=[("CONDITIONING", "CONDITIONING")])
        g.link(pos, 0, positive, "conditioning")
    loader = g.node("PipeFusionDiTLoader", (0, 400), [unet, "default", devices, "pipefusion", 0, 1],
                    outputs=[("pipefusion_model", "PIPEFUSION_MODEL")])
    latent = g.node("EmptySD3LatentImage", (360, 400), [1024, 1024, 1], outputs=[("LATENT", "LATENT")])
    sampler = g.node("PipeFusionKSampler", (1080, 100), [0, "randomize", steps, 1.0, "euler", "simple", 1.0],
                     inputs=[("pipefusion_model", "PIPEFUSION_MODEL"), ("positive", "CONDITIONING"),
                             ("negative", "CONDITIONING"), ("latent_image", "LATENT")], outputs=[("LATENT", "LATENT")])
    g.link(loader, 0, sampler, "pipefusion_model")
    g.link(positive, 0, sampler, "positive")
    g.link(neg, 0, sampler, "negative")
    g.link(latent, 0, sampler, "latent_image")
    vae = g.node("VAELoader", (1080, 400), ["ae.safetensors"], outputs=[("VAE", "VAE")])
    decode = g.node("VAEDecode", (1440, 100), [], inputs=[("samples", "LATENT"), ("vae", "VAE")],
                    outputs=[("IMAGE", "IMAGE")])
    g.link(sampler, 0, decode, "samples")
    g.link(vae, 0, decode, "vae")
    save = g.node("SaveImage", (1800, 100), ["PipeFusion"], inputs=[("images", "IMAGE")])
    g.link(decode, 0, save, "images")
    return g.dump()


PROMPT = "a lighthouse on a cliff at dawn, oil painting"
WORKFLOWS = {
    "flux1-dev-2gpu.json": flux("flux1-dev.safetensors", "0,1", 20, 3.5, PROMPT),
    "flux1-dev-4gpu.json": flux("flux1-dev.safetensors", "0,1,2,3", 20, 3.5, PROMPT),
    "flux1-schnell-2gpu.json": flux("flux1-schnell.safetensors", "0,1", 4, None, PROMPT),
}

if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "workflows"
    for name, wf in WORKFLOWS.items():
        (out / name).write_text(json.dumps(wf, indent=1) + "\n")
        print("wrote", out / name)
