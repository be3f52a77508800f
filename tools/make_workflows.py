"""Writes workflows/*.json (ComfyUI's UI format) and a thumbnail .jpg beside each: Flux.1 dev on 2 and 4
GPUs, Flux.1 schnell on 2 GPUs, SD3.5 large with true CFG (positive and negative) on 4 GPUs, PixArt-Σ 1024 on
2 GPUs, Flux.1 Kontext editing a loaded image on 2 GPUs, Chroma with true CFG on 2 GPUs, Qwen-Image with true
CFG on 4 GPUs, Qwen-Image-Edit editing a loaded image with true CFG on 4 GPUs, Z-Image Turbo (8 steps) on 2 GPUs,
and the built-in trained model on 2 CPU ranks (its own caption and decode nodes: runs anywhere without downloads),
each with our loader and sampler; and for every family the stock text-to-image workflow (UNETLoader -> KSampler)
with PipeFusion Parallelize added. Every loader and Parallelize node plans with strategy ``auto`` (the names say
"auto plan": the planner picks PipeFusion, DistriFusion, CFG split or Ulysses for the machine).

    ./.venv/bin/python tools/make_workflows.py     (needs Pillow, which ComfyUI's requirements bring)

Stock nodes for everything but the DiT: the family's text encoder loader (DualCLIPLoader for Flux,
TripleCLIPLoader for SD3.5, CLIPLoader type pixart or chroma) -> CLIPTextEncode (-> ReferenceLatent of
LoadImage -> FluxKontextImageScale -> VAEEncode for Kontext) (-> FluxGuidance), the family's empty latent,
VAELoader -> VAEDecode -> SaveImage; Qwen-Image-Edit encodes prompt and image with TextEncodeQwenImageEdit. widgets_values follow each node's widget
inputs in ComfyUI's order.
"""
from __future__ import annotations

import json
from pathlib import Path


class Graph:
    def __init__(self) -> None:
        self.nodes, self.links = [], []

    def node(self, type_: str, pos, widgets, inputs=(), outputs=(), title=None, size=None) -> dict:
        n = {"id": len(self.nodes) + 1, "type": type_, "pos": list(pos), "size": list(size or SIZES[type_]), "flags": {},
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
                "links": self.links, "groups": [], "config": {}, "extra": {"ds": VIEW}, "version": 0.4}


# Node sizes (body, without the 30 px title) that hold every widget: at least what the ComfyUI 0.3.75
# frontend computes for the node (LGraphNode.computeSize), e.g. 286 px for the PipeFusion KSampler.
SIZES = {"DualCLIPLoader": (300, 130), "TripleCLIPLoader": (300, 110), "CLIPLoader": (300, 110),
         "CLIPTextEncode": (380, 130), "FluxGuidance": (280, 60), "PipeFusionDiTLoader": (300, 264),
         "EmptySD3LatentImage": (280, 110), "EmptyLatentImage": (280, 110), "EmptyFlux2LatentImage": (280, 110),
         "PipeFusionKSampler": (300, 290),
         "VAELoader": (280, 60), "VAEDecode": (200, 50), "SaveImage": (300, 300),
         "PipeFusionBuiltinCaption": (380, 80), "PipeFusionBuiltinDecode": (260, 50),
         "LoadImage": (300, 320), "FluxKontextImageScale": (260, 30), "VAEEncode": (200, 50),
         "ReferenceLatent": (240, 50), "UNETLoader": (300, 80), "PipeFusionParallelize": (300, 244),
         "KSampler": (300, 290), "TextEncodeQwenImageEdit": (380, 170), "ImageScaleToTotalPixels": (300, 80)}
# Columns 40 px apart, rows 60 px apart (a title is 30 px); the whole graph is 1,680 x 430 px.
X = (0, 340, 760, 1080, 1420)
# The view the workflow opens at: 75% (readable; the frontend stops drawing text below 60%), the graph
# below the workflow tab and the run button, left of the minimap.
VIEW = {"scale": 0.75, "offset": [90, 230]}


def _encoders(g: Graph, kind: str) -> dict:
    if kind == "flux":
        return g.node("DualCLIPLoader", (X[0], 0), ["t5xxl_fp16.safetensors", "clip_l.safetensors", "flux", "default"],
                      outputs=[("CLIP", "CLIP")])
    if kind == "sd3":
        return g.node("TripleCLIPLoader", (X[0], 0), ["clip_l.safetensors", "clip_g.safetensors",
                                                   "t5xxl_fp16.safetensors"], outputs=[("CLIP", "CLIP")])
    if kind in TEXT_ENCODERS:  # one stock CLIPLoader with the family's encoder file and type
        return g.node("CLIPLoader", (X[0], 0), [*TEXT_ENCODERS[kind], "default"], outputs=[("CLIP", "CLIP")])
    return g.node("CLIPLoader", (X[0], 0), ["t5xxl_fp16.safetensors", "pixart", "default"], outputs=[("CLIP", "CLIP")])


# Qwen-Image: Qwen2.5-VL 7B, CLIPLoader type qwen_image; Z-Image: Qwen3 4B, type lumina2; Chroma: T5 XXL, type
# chroma; Flux.2: Mistral 3 Small, type flux2 (ComfyUI 0.3.75's names).
TEXT_ENCODERS = {"qwen_image": ("qwen_2.5_vl_7b_fp8_scaled.safetensors", "qwen_image"),
                 "zimage": ("qwen_3_4b.safetensors", "lumina2"), "chroma": ("t5xxl_fp16.safetensors", "chroma"),
                 "flux2": ("mistral_3_small_flux2_fp8.safetensors", "flux2")}


def _reference(g: Graph, pos: dict, reference: str, vae_name: str) -> tuple[dict, dict]:
    """Kontext: the image to edit, scaled to a size the model knows, as a reference latent on the positive
    prompt; returns (the positive conditioning node, the VAE loader)."""
    vae = g.node("VAELoader", (X[2], 330), [vae_name], outputs=[("VAE", "VAE")])
    image = g.node("LoadImage", (X[0], 584), [reference, "image"], outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")])
    scale = g.node("FluxKontextImageScale", (X[1], 584), [], inputs=[("image", "IMAGE")], outputs=[("IMAGE", "IMAGE")])
    encode = g.node("VAEEncode", (X[2], 584), [], inputs=[("pixels", "IMAGE"), ("vae", "VAE")],
                    outputs=[("LATENT", "LATENT")])
    positive = g.node("ReferenceLatent", (X[2], 450), [], inputs=[("conditioning", "CONDITIONING"),
                                                                 ("latent", "LATENT")],
                      outputs=[("CONDITIONING", "CONDITIONING")])
    g.link(image, 0, scale, "image")
    g.link(scale, 0, encode, "pixels")
    g.link(vae, 0, encode, "vae")
    g.link(pos, 0, positive, "conditioning")
    g.link(encode, 0, positive, "latent")
    return positive, vae


def workflow(kind: str, unet: str, devices: str, steps: int, cfg: float, guidance: float | None, prompt: str,
             negative: str, sampler_name: str, scheduler: str, vae_name: str, size: int, reference: str = "") -> dict:
    g = Graph()
    clip = _encoders(g, kind)
    pos = g.node("CLIPTextEncode", (X[1], 0), [prompt], inputs=[("clip", "CLIP")],
                 outputs=[("CONDITIONING", "CONDITIONING")], title="Positive prompt")
    neg_title = "Negative (unused at cfg 1)" if cfg == 1.0 else "Negative prompt"
    neg = g.node("CLIPTextEncode", (X[1], 220), [negative], inputs=[("clip", "CLIP")],
                 outputs=[("CONDITIONING", "CONDITIONING")], title=neg_title)
    g.link(clip, 0, pos, "clip")
    g.link(clip, 0, neg, "clip")
    positive, vae = _reference(g, pos, reference, vae_name) if reference else (pos, None)
    if guidance is not None:
        cond = positive
        positive = g.node("FluxGuidance", (X[2], 0), [guidance], inputs=[("conditioning", "CONDITIONING")],
                          outputs=[("CONDITIONING", "CONDITIONING")])
        g.link(cond, 0, positive, "conditioning")
    loader = g.node("PipeFusionDiTLoader", (X[0], 220), [unet, "default", devices, "auto", 0, 1, "compute", "", 0],
                    outputs=[("pipefusion_model", "PIPEFUSION_MODEL")])
    if kind == "pixart":
        latent = g.node("EmptyLatentImage", (X[2], 130), [size, size, 1], outputs=[("LATENT", "LATENT")])
    elif kind == "flux2":  # 128 channels at 1/16 of the image
        latent = g.node("EmptyFlux2LatentImage", (X[2], 130), [size, size, 1], outputs=[("LATENT", "LATENT")])
    else:
        latent = g.node("EmptySD3LatentImage", (X[2], 130), [size, size, 1], outputs=[("LATENT", "LATENT")])
    return _sample_and_save(g, loader, positive, neg, latent, vae or vae_name, [steps, cfg, sampler_name, scheduler])


def _sample_and_save(g: Graph, loader: dict, positive: dict, negative: dict, latent: dict, vae: dict | str,
                     settings: list) -> dict:
    """PipeFusionKSampler (``settings``: steps, cfg, sampler, scheduler) -> VAEDecode -> SaveImage; the graph.
    ``vae``: the VAELoader node, or the name of the VAE file for a new one."""
    sampler = g.node("PipeFusionKSampler", (X[3], 0), [0, "randomize", *settings, 1.0, 0.0],
                     inputs=[("pipefusion_model", "PIPEFUSION_MODEL"), ("positive", "CONDITIONING"),
                             ("negative", "CONDITIONING"), ("latent_image", "LATENT")], outputs=[("LATENT", "LATENT")])
    g.link(loader, 0, sampler, "pipefusion_model")
    g.link(positive, 0, sampler, "positive")
    g.link(negative, 0, sampler, "negative")
    g.link(latent, 0, sampler, "latent_image")
    if isinstance(vae, str):
        vae = g.node("VAELoader", (X[2], 330), [vae], outputs=[("VAE", "VAE")])
    decode = g.node("VAEDecode", (X[4], 0), [], inputs=[("samples", "LATENT"), ("vae", "VAE")],
                    outputs=[("IMAGE", "IMAGE")])
    g.link(sampler, 0, decode, "samples")
    g.link(vae, 0, decode, "vae")
    save = g.node("SaveImage", (X[4], 110), ["PipeFusion"], inputs=[("images", "IMAGE")])
    g.link(decode, 0, save, "images")
    return g.dump()


def stock_workflow(kind: str, unet: str, devices: str, steps: int, cfg: float, guidance: float | None, prompt: str,
                   negative: str, sampler_name: str, scheduler: str, vae_name: str, size: int,
                   reference: str = "") -> dict:
    """ComfyUI's own text-to-image workflow (UNETLoader -> KSampler; for Kontext the image to edit as a
    ReferenceLatent) with one node added: PipeFusion Parallelize between the model loader and the KSampler."""
    g = Graph()
    clip = _encoders(g, kind)
    pos = g.node("CLIPTextEncode", (X[1], 0), [prompt], inputs=[("clip", "CLIP")],
                 outputs=[("CONDITIONING", "CONDITIONING")], title="Positive prompt")
    neg = g.node("CLIPTextEncode", (X[1], 220), [negative], inputs=[("clip", "CLIP")],
                 outputs=[("CONDITIONING", "CONDITIONING")],
                 title="Negative (unused at cfg 1)" if cfg == 1.0 else "Negative prompt")
    g.link(clip, 0, pos, "clip")
    g.link(clip, 0, neg, "clip")
    positive, vae = _reference(g, pos, reference, vae_name) if reference else (pos, None)
    if guidance is not None:
        cond = positive
        positive = g.node("FluxGuidance", (X[2], 0), [guidance], inputs=[("conditioning", "CONDITIONING")],
                          outputs=[("CONDITIONING", "CONDITIONING")])
        g.link(cond, 0, positive, "conditioning")
    loader = g.node("UNETLoader", (X[0], 180), [unet, "default"], outputs=[("MODEL", "MODEL")])
    par = g.node("PipeFusionParallelize", (X[0], 300), [devices, "auto", 0, 1, "default", "compute", "", 0],
                 inputs=[("model", "MODEL")], outputs=[("MODEL", "MODEL")])
    g.link(loader, 0, par, "model")
    latent = g.node("EmptyLatentImage" if kind == "pixart" else "EmptySD3LatentImage", (X[2], 130), [size, size, 1],
                    outputs=[("LATENT", "LATENT")])
    sampler = g.node("KSampler", (X[3], 0), [0, "randomize", steps, cfg, sampler_name, scheduler, 1.0],
                     inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                             ("latent_image", "LATENT")], outputs=[("LATENT", "LATENT")])
    g.link(par, 0, sampler, "model")
    g.link(positive, 0, sampler, "positive")
    g.link(neg, 0, sampler, "negative")
    g.link(latent, 0, sampler, "latent_image")
    vae = vae or g.node("VAELoader", (X[2], 330), [vae_name], outputs=[("VAE", "VAE")])
    decode = g.node("VAEDecode", (X[4], 0), [], inputs=[("samples", "LATENT"), ("vae", "VAE")],
                    outputs=[("IMAGE", "IMAGE")])
    g.link(sampler, 0, decode, "samples")
    g.link(vae, 0, decode, "vae")
    save = g.node("SaveImage", (X[4], 110), ["PipeFusion"], inputs=[("images", "IMAGE")])
    g.link(decode, 0, save, "images")
    return g.dump()


def qwen_edit(unet: str, devices: str, steps: int, cfg: float, prompt: str, negative: str, image_name: str) -> dict:
    """Qwen-Image-Edit as ComfyUI's own template builds it: TextEncodeQwenImageEdit gives both prompts the image
    (its vision tokens and its latent as a reference latent, so positive and negative carry the same references),
    the image scaled to about one megapixel and VAE-encoded is the latent to sample."""
    g = Graph()
    clip = _encoders(g, "qwen_image")
    vae = g.node("VAELoader", (X[2], 330), ["qwen_image_vae.safetensors"], outputs=[("VAE", "VAE")])
    image = g.node("LoadImage", (X[0], 560), [image_name, "image"], outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")])
    conds = []
    for i, (text, title) in enumerate(((prompt, "Edit instruction"), (negative, "Negative prompt"))):
        enc = g.node("TextEncodeQwenImageEdit", (X[1], 230 * i), [text], title=title,
                     inputs=[("clip", "CLIP"), ("vae", "VAE"), ("image", "IMAGE")],
                     outputs=[("CONDITIONING", "CONDITIONING")])
        g.link(clip, 0, enc, "clip")
        g.link(vae, 0, enc, "vae")
        g.link(image, 0, enc, "image")
        conds.append(enc)
    scale = g.node("ImageScaleToTotalPixels", (X[1], 560), ["lanczos", 1.0], inputs=[("image", "IMAGE")],
                   outputs=[("IMAGE", "IMAGE")])
    encode = g.node("VAEEncode", (X[2], 560), [], inputs=[("pixels", "IMAGE"), ("vae", "VAE")],
                    outputs=[("LATENT", "LATENT")])
    g.link(image, 0, scale, "image")
    g.link(scale, 0, encode, "pixels")
    g.link(vae, 0, encode, "vae")
    loader = g.node("PipeFusionDiTLoader", (X[0], 220), [unet, "default", devices, "auto", 0, 1, "compute", "", 0],
                    outputs=[("pipefusion_model", "PIPEFUSION_MODEL")])
    return _sample_and_save(g, loader, conds[0], conds[1], encode, vae, [steps, cfg, "euler", "simple"])


def flux(unet: str, devices: str, steps: int, guidance: float | None, prompt: str) -> dict:
    return workflow("flux", unet, devices, steps, 1.0, guidance, prompt, "", "euler", "simple", "ae.safetensors",
                    1024)


COLORS = ((66, 133, 244), (52, 168, 83), (251, 188, 5), (234, 67, 53))


def thumbnail(path: Path, model: str, gpus: int, steps: int, cfg: bool, unit: str = "GPU") -> None:
    """The template card's picture (ComfyUI 0.3.75 fetches <workflow name>.jpg beside the JSON): the image cut
    into one patch band per GPU, and the chain of GPUs, each holding a stage of the model's blocks."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (512, 512), (24, 26, 32))
    d = ImageDraw.Draw(img)
    big, small = ImageFont.load_default(size=40), ImageFont.load_default(size=22)
    d.text((28, 24), model, font=big, fill=(240, 240, 240))
    d.text((28, 76), f"auto plan, {gpus} {unit}s, {steps} steps" + (", CFG" if cfg else ""), font=small,
           fill=(190, 190, 200))
    top, side = 130, 340
    band = side / gpus
    for i in range(gpus):  # the image, in patch bands
        y = top + i * band
        d.rectangle((28, y, 28 + side, y + band - 4), fill=tuple(c // 2 for c in COLORS[i]), outline=COLORS[i], width=3)
        d.text((44, y + band / 2 - 12), f"patch {i + 1}", font=small, fill=(240, 240, 240))
    box = (side - 16 * (gpus - 1)) / gpus
    for i in range(gpus):  # the pipeline of stages
        y = top + i * (box + 16)
        d.rounded_rectangle((392, y, 488, y + box), radius=10, fill=COLORS[i])
        d.text((404, y + box / 2 - 12), f"{unit} {i}", font=small, fill=(20, 20, 20))
    img.save(path, "JPEG", quality=88)


def builtin(devices: str, steps: int, caption: str) -> dict:
    """The built-in trained model (comfy_pipefusion/builtin/shapes-flux.safetensors copied into
    models/diffusion_models): no text encoder, no VAE, no download; runs on CPU ranks."""
    g = Graph()
    loader = g.node("PipeFusionDiTLoader", (X[0], 0), ["shapes-flux.safetensors", "float32", devices, "auto", 0, 1,
                                                       "compute", "", 0],
                    outputs=[("pipefusion_model", "PIPEFUSION_MODEL")])
    caption_node = g.node("PipeFusionBuiltinCaption", (X[1], 0), [caption, 1],
                          inputs=[("pipefusion_model", "PIPEFUSION_MODEL")],
                          outputs=[("conditioning", "CONDITIONING"), ("latent", "LATENT")])
    sampler = g.node("PipeFusionKSampler", (X[2], 0), [0, "randomize", steps, 1.0, "euler", "simple", 1.0, 0.0],
                     inputs=[("pipefusion_model", "PIPEFUSION_MODEL"), ("positive", "CONDITIONING"),
                             ("negative", "CONDITIONING"), ("latent_image", "LATENT")], outputs=[("LATENT", "LATENT")])
    g.link(loader, 0, caption_node, "pipefusion_model")
    g.link(loader, 0, sampler, "pipefusion_model")
    g.link(caption_node, 0, sampler, "positive")
    g.link(caption_node, 0, sampler, "negative")  # unused at cfg 1
    g.link(caption_node, 1, sampler, "latent_image")
    decode = g.node("PipeFusionBuiltinDecode", (X[3], 0), [], inputs=[("samples", "LATENT")],
                    outputs=[("IMAGE", "IMAGE")])
    g.link(sampler, 0, decode, "samples")
    save = g.node("SaveImage", (X[3], 110), ["PipeFusion-builtin"], inputs=[("images", "IMAGE")])
    g.link(decode, 0, save, "images")
    return g.dump()




PROMPT = "a lighthouse on a cliff at dawn, oil painting"
# The file names are what ComfyUI's template browser shows as each card's title and description.
WORKFLOWS = {
    "Flux.1 dev on 2 GPUs (PipeFusion nodes, auto plan, 20 steps)": (
        flux("flux1-dev.safetensors", "0,1", 20, 3.5, PROMPT), ("Flux.1 dev", 2, 20, False)),
    "Flux.1 dev on 4 GPUs (PipeFusion nodes, auto plan, 20 steps)": (
        flux("flux1-dev.safetensors", "0,1,2,3", 20, 3.5, PROMPT), ("Flux.1 dev", 4, 20, False)),
    "Flux.1 schnell on 2 GPUs (PipeFusion nodes, auto plan, 4 steps)": (
        flux("flux1-schnell.safetensors", "0,1", 4, None, PROMPT), ("Flux.1 schnell", 2, 4, False)),
    "SD3.5 large on 4 GPUs with CFG (PipeFusion nodes, auto plan, 28 steps)": (
        workflow("sd3", "sd3.5_large.safetensors", "0,1,2,3", 28, 4.5, None, PROMPT, "blurry, low quality, watermark",
                 "dpmpp_2m", "sgm_uniform", "sd3.5_vae.safetensors", 1024), ("SD3.5 large", 4, 28, True)),
    "PixArt-Sigma 1024 on 2 GPUs (PipeFusion nodes, auto plan, 20 steps)": (
        workflow("pixart", "PixArt-Sigma-XL-2-1024-MS.safetensors", "0,1", 20, 4.5, None, PROMPT,
                 "blurry, low quality", "euler", "normal", "sdxl_vae.safetensors", 1024), ("PixArt-Sigma", 2, 20, True)),
    "Flux.1 Kontext dev on 2 GPUs, editing an image (PipeFusion nodes, auto plan, 20 steps)": (
        workflow("flux", "flux1-kontext-dev.safetensors", "0,1", 20, 1.0, 2.5, "make it a watercolor painting", "",
                 "euler", "simple", "ae.safetensors", 1024, reference="example.png"), ("Flux.1 Kontext", 2, 20, False)),
    "Chroma on 2 GPUs with CFG (PipeFusion nodes, auto plan, 26 steps)": (
        workflow("chroma", "chroma-unlocked-v50.safetensors", "0,1", 26, 4.0, None, PROMPT,
                 "blurry, low quality, watermark", "euler", "beta", "ae.safetensors", 1024), ("Chroma", 2, 26, True)),
    "Qwen-Image on 4 GPUs with CFG (PipeFusion nodes, auto plan, 30 steps)": (
        workflow("qwen_image", "qwen_image_bf16.safetensors", "0,1,2,3", 30, 2.5, None, PROMPT, " ", "euler", "simple",
                 "qwen_image_vae.safetensors", 1328), ("Qwen-Image", 4, 30, True)),
    "Qwen-Image-Edit on 4 GPUs with CFG, editing an image (PipeFusion nodes, auto plan, 20 steps)": (
        qwen_edit("qwen_image_edit_bf16.safetensors", "0,1,2,3", 20, 2.5, "make it a watercolor painting", " ",
                  "example.png"), ("Qwen-Image-Edit", 4, 20, True)),
    "Z-Image Turbo on 2 GPUs (PipeFusion nodes, auto plan, 8 steps)": (
        workflow("zimage", "z_image_turbo_bf16.safetensors", "0,1", 8, 1.0, None, PROMPT, "", "euler",
                 "simple", "ae.safetensors", 1024), ("Z-Image Turbo", 2, 8, False)),
    "Flux.2 dev on 2 GPUs (PipeFusion nodes, auto plan, 20 steps)": (
        workflow("flux2", "flux2_dev_fp8mixed.safetensors", "0,1", 20, 1.0, 4.0, PROMPT, "", "euler", "simple",
                 "flux2-vae.safetensors", 1024), ("Flux.2 dev", 2, 20, False)),
    "Flux.1 dev, stock workflow + PipeFusion Parallelize on 2 GPUs (auto plan, 20 steps)": (
        stock_workflow("flux", "flux1-dev.safetensors", "0,1", 20, 1.0, 3.5, PROMPT, "", "euler", "simple",
                       "ae.safetensors", 1024), ("Flux.1 dev", 2, 20, False)),
    "SD3.5 large, stock workflow + PipeFusion Parallelize on 4 GPUs (auto plan, 28 steps)": (
        stock_workflow("sd3", "sd3.5_large.safetensors", "0,1,2,3", 28, 4.5, None, PROMPT,
                       "blurry, low quality, watermark", "dpmpp_2m", "sgm_uniform", "sd3.5_vae.safetensors", 1024),
        ("SD3.5 large", 4, 28, True)),
    # the stock workflow + Parallelize for the other families (PixArt, Chroma, Qwen-Image, Z-Image, Kontext)
    "PixArt-Sigma 1024, stock workflow + PipeFusion Parallelize on 2 GPUs (auto plan, 20 steps)": (
        stock_workflow("pixart", "PixArt-Sigma-XL-2-1024-MS.safetensors", "0,1", 20, 4.5, None, PROMPT,
                       "blurry, low quality", "euler", "normal", "sdxl_vae.safetensors", 1024),
        ("PixArt-Sigma", 2, 20, True)),
    "Chroma, stock workflow + PipeFusion Parallelize on 2 GPUs (auto plan, 26 steps)": (
        stock_workflow("chroma", "chroma-unlocked-v50.safetensors", "0,1", 26, 4.0, None, PROMPT,
                       "blurry, low quality, watermark", "euler", "beta", "ae.safetensors", 1024),
        ("Chroma", 2, 26, True)),
    "Qwen-Image, stock workflow + PipeFusion Parallelize on 4 GPUs (auto plan, 30 steps)": (
        stock_workflow("qwen_image", "qwen_image_bf16.safetensors", "0,1,2,3", 30, 2.5, None, PROMPT, " ", "euler",
                       "simple", "qwen_image_vae.safetensors", 1328), ("Qwen-Image", 4, 30, True)),
    "Z-Image Turbo, stock workflow + PipeFusion Parallelize on 2 GPUs (auto plan, 8 steps)": (
        stock_workflow("zimage", "z_image_turbo_bf16.safetensors", "0,1", 8, 1.0, None, PROMPT, "", "euler", "simple",
                       "ae.safetensors", 1024), ("Z-Image Turbo", 2, 8, False)),
    "Flux.1 Kontext dev, stock workflow + PipeFusion Parallelize on 2 GPUs, editing an image (auto plan, 20 steps)": (
        stock_workflow("flux", "flux1-kontext-dev.safetensors", "0,1", 20, 1.0, 2.5, "make it a watercolor painting",
                       "", "euler", "simple", "ae.safetensors", 1024, reference="example.png"),
        ("Flux.1 Kontext", 2, 20, False)),
    "Built-in shapes model on 2 CPU ranks (PipeFusion nodes, auto plan, 8 steps, no download)": (
        builtin("cpu:2", 8, "red circle middle center stripes"), ("Built-in shapes", 2, 8, False, "CPU")),
}

if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "workflows"
    for old in [*out.glob("*.json"), *out.glob("*.jpg")]:
        old.unlink()
    for name, (wf, card) in WORKFLOWS.items():
        (out / f"{name}.json").write_text(json.dumps(wf, indent=1) + "\n")
        thumbnail(out / f"{name}.jpg", *card)
        print("wrote", out / f"{name}.json", "and .jpg")
