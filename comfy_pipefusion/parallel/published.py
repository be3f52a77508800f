"""The simulator against published figures: xDiT's Flux.1-dev with PipeFusion on 8 x L40 over PCIe.

xDiT's published latencies (28 steps; seconds):

    1024^2: 1 GPU 18.36; PipeFusion 2 / 4 / 8 GPUs 11.03 / 7.05 / 5.53
    2048^2: 1 GPU 105.7; PipeFusion 2 / 4 / 8 GPUs 58.2 / 30.1 / 18.7

The simulator is calibrated on one number only, the 1-GPU 1024^2 latency: it fixes the GPU's achieved
FLOP rate, from which every block's cost follows by counting (``flop_costs``). Everything else is assumed,
not fitted:

- Flux.1-dev: width 3072, 19 double + 38 single blocks, 512 T5 tokens; 1024^2 is 64 x 64 image tokens.
  Every block does 12 d^2 multiply-adds per token (double: each stream's qkv 3 d^2, out 1 d^2, MLP 8 d^2;
  single: qkv 3 d^2, MLP in 4 d^2, out 5 d^2) plus attention 2 d per (query, key) pair.
- xDiT's PipeFusion runs the transformer per patch with the whole text (encoder_hidden_states) in each
  patch's forward, so the text tokens are computed with every patch: ``text_stream="every_patch"``.
- warm-up 1 step (xDiT's default ``--warmup_steps``), M = number of GPUs (its default patch count),
  bfloat16 activations.
- L40 has no NVLink and no PCIe peer-to-peer: NCCL goes through host memory. Link: 10 GB/s, 20 us
  (PCIe Gen4 x16 is 32 GB/s raw; host-staged transfers reach about a third of it).
- no fixed per-call overhead (GPU kernels of these sizes are compute-bound).
"""
from __future__ import annotations

from .simulate import BlockCost, Costs, Link, Workload, simulate

XDIT_FLUX_L40 = {  # (pixels per side) -> {GPUs: seconds}
    1024: {1: 18.36, 2: 11.03, 4: 7.05, 8: 5.53},
    2048: {1: 105.7, 2: 58.2, 4: 30.1, 8: 18.7},
}
L40_PCIE = Link(bandwidth=10e9, latency=20e-6)
FLUX_DEV = dict(width=3072, double=19, single=38, n_txt=512)


def flop_costs(width: int, flops_per_s: float, link: Link, kinds=("double", "single")) -> Costs:
    """Block costs from counting: 24 d^2 FLOP per token, 4 d FLOP per (query, key) pair."""
    cost = BlockCost(per_token=24 * width ** 2 / flops_per_s, per_pair=4 * width / flops_per_s)
    return Costs(blocks={k: cost for k in kinds}, link=link)


def flux_dev(px: int, steps: int = 28, warmup: int = 1) -> Workload:
    f = FLUX_DEV
    return Workload(kinds=("double",) * f["double"] + ("single",) * f["single"], width=f["width"],
                    rows=px // 16, cols=px // 16, n_txt=f["n_txt"], evals=steps, warmup_evals=warmup, elem=2)


def calibrated_rate(seconds: float, work: Workload) -> float:
    """The FLOP rate at which ``work`` takes ``seconds`` on one device (the model is linear in 1/rate)."""
    return simulate("serial", 1, work, flop_costs(work.width, 1.0, L40_PCIE)).wall_s / seconds


def xdit_table() -> list[dict]:
    """Predicted against published, calibrated on the 1-GPU 1024^2 figure only."""
    rate = calibrated_rate(XDIT_FLUX_L40[1024][1], flux_dev(1024))
    costs = flop_costs(FLUX_DEV["width"], rate, L40_PCIE)
    rows = []
    for px, published in XDIT_FLUX_L40.items():
        for gpus, seconds in published.items():
            p = simulate("pipefusion" if gpus > 1 else "serial", gpus, flux_dev(px), costs,
                         patches=gpus, text_stream="every_patch")
            rows.append({"px": px, "gpus": gpus, "published_s": seconds, "predicted_s": p.wall_s,
                         "error": p.wall_s / seconds - 1, "calibration": px == 1024 and gpus == 1})
    return rows
