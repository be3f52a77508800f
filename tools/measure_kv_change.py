"""Where the staleness of K/V comes from: how much the image tokens' K and V of every block change from one step
to the next along a serial euler trajectory, and which part of that change the timestep (through each block's
modulation) and the latent account for.

    python tools/measure_kv_change.py [--presets tiny,chroma-tiny] [--steps 8] [--part image|text]

For consecutive evaluations (x_k, sigma_k) and (x_k+1, sigma_k+1), the K/V of the second are compared with the
first (what a stale buffer holds), with (x_k+1, sigma_k) (only the timestep moved: the timestep's part) and with
(x_k, sigma_k+1) (only the latent moved: the latent's part); relative L2 over all blocks, averaged over the steps.
For presets of families whose text joins the sequence (Flux, Chroma, SD3, Qwen-Image), without reference latents.

Measured (random weights, 2 cores), part of the timestep / of the latent:
    tiny         8 steps 0.276 (0.224 / 0.153)   64 steps 0.174 (0.173 / 0.020)
    chroma-tiny  8 steps 0.529 (0.501 / 0.139)   64 steps 0.455 (0.453 / 0.018)
Chroma's random modulation approximator reads the timestep through 16 sin/cos channels of 1000 sigma, most of
which turn by more than a radian per step: every block's shift/scale/gate, and with them K and V, change about
half per step whatever the number of steps, twice Flux's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def image_kv(fam, model, problem, x, sigma, part: str = "image"):
    """(K and V of the image tokens (``part`` "text": of the text stream's tokens) of every block, flattened;
    the model output) for one evaluation."""
    import torch

    from comfy_pipefusion.attention import StaleKV
    from comfy_pipefusion.models import family
    from comfy_pipefusion.patches import full_span

    cpu, n_span = torch.device("cpu"), problem.n_span_txt
    heads, head_dim = family.attention_shape(model)
    blocks = fam.blocks_of(model)
    kvs = [fam.kv_buffers(model, b, lambda kind: StaleKV(problem.model_batch, heads, n_span, problem.n_img, head_dim,
                                                          torch.float32, cpu)) for b in blocks]
    emb = fam.embeddings(model, problem.txt, problem.n_txt, problem.rows, problem.cols, cpu, torch.float32)
    temb = fam.time_embedding(model, emb, torch.full((problem.model_batch,), float(sigma)), problem.pooled,
                              problem.guidance, torch.float32)
    span = full_span(n_span, problem.n_img)
    _, img = fam.run_blocks(model, blocks, kvs, span, emb.txt, fam.embed_image(model, emb, x, span), temb,
                            emb.for_span(span))
    cut = slice(n_span, None) if part == "image" else slice(0, n_span)
    kv = [t[:, :, cut].flatten() for b in kvs for buf in b for t in (buf.k, buf.v)]
    return torch.cat(kv), fam.final_layer(model, img, temb)


def measure(preset: str, steps: int, part: str = "image") -> tuple[float, float, float]:
    """(change per step, the timestep's part, the latent's part), averaged over the steps."""
    import torch

    from comfy_pipefusion.config import ParallelConfig, SampleSpec
    from comfy_pipefusion.job import preset_problem
    from comfy_pipefusion.models import family
    from comfy_pipefusion.parallel.plan import ModelSource, load_rank_model

    fam, p = family.find_preset(preset)
    model = load_rank_model(ModelSource(preset=preset), ParallelConfig("serial", 1), 0, torch.device("cpu"),
                            torch.float32)[0]
    problem = preset_problem(preset, SampleSpec(height=p["height"], width=p["width"], steps=steps, sampler="euler"))
    sig, x, rows = problem.sigmas, problem.x0, []
    with torch.inference_mode():
        for k in range(steps - 1):
            stale, v = image_kv(fam, model, problem, x, sig[k], part)
            x1 = x + (sig[k + 1] - sig[k]) * v  # euler on the velocity
            fresh = image_kv(fam, model, problem, x1, sig[k + 1], part)[0]
            time_held = image_kv(fam, model, problem, x1, sig[k], part)[0]
            latent_held = image_kv(fam, model, problem, x, sig[k + 1], part)[0]
            n = fresh.norm()
            rows.append([float((fresh - a).norm() / n) for a in (stale, time_held, latent_held)])
            x = x1
    return tuple(torch.tensor(rows).mean(0).tolist())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,chroma-tiny")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--part", choices=("image", "text"), default="image",
                    help="whose K/V: the image tokens' or the text stream's")
    args = ap.parse_args(argv)
    for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
        total, timestep, latent = measure(preset, args.steps, args.part)
        print(f"{preset:16s} {args.steps} steps: {args.part} K/V change per step {total:.3f}; the timestep's part "
              f"{timestep:.3f}, the latent's part {latent:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
