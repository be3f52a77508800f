"""The tests' frozen-trajectory sampler, never in the production sampler list (issue 11).

In-process tests pass the class itself as ``SampleSpec(sampler=Frozen)``; worker groups resolve the name
"frozen" in their job files when started with ``WORKER_ARGS`` (``--test-samplers`` this file).
"""
from __future__ import annotations

from pathlib import Path

import torch

from comfy_pipefusion.sampling.base import Sampler

WORKER_ARGS = ["--test-samplers", str(Path(__file__).resolve())]
"""What a worker group needs to run job files whose samplers are named in SAMPLERS below."""


def frozen_sigmas(steps: int, sigma: float = 0.7) -> torch.Tensor:
    """A constant schedule for the frozen-trajectory test: every step sees the same model input."""
    return torch.full((steps + 1,), sigma, dtype=torch.float32)


class Frozen(Sampler):
    """Test sampler: identity until the last step, which returns the prediction.

    With a constant sigma schedule every step sees the same input, so one step's K/V equal the next
    step's and stale activations equal fresh ones: every strategy must then equal serial exactly.
    """

    name = "frozen"
    inverse_scaling = False

    @classmethod
    def schedule(cls, steps: int) -> torch.Tensor:
        return frozen_sigmas(steps)

    def _update(self, k, sl, x, denoised):
        return denoised.clone() if k == self.steps - 1 else x


SAMPLERS = {Frozen.name: Frozen}
"""Test samplers by the name job files give them."""


def resolve(sampler: str):
    """The sampler a test names: a production name as it is, a test sampler's class for its name."""
    return SAMPLERS.get(sampler, sampler)
