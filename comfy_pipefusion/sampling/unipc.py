"""UniPC (bh1, multistep, order up to 3) as ComfyUI 0.3.75 runs it (comfy/extra_samplers/uni_pc.py).

ComfyUI's UniPC works in a variance-preserving space: x_vp = x / sqrt(1 + sigma^2), with the sigmas used
directly as its time variable, whatever the model's prediction type; it converts the denoiser to a data
prediction through an eps estimate. Its loop, one evaluation per step:

    eval 0 at t_0 on x_vp;  for u = 1 .. N-1: predictor to t_u, eval at the predicted point, corrector;
    finally a predictor-only update to t_N (a last sigma of 0 becomes 0.001) and x / alpha(t_N).

Here evaluation k returns the *predicted* point of update k + 1; the corrector of update k runs when
evaluation k's prediction arrives. The data predictions of the last order + 1 evaluations, the predictor's
base term and the predicted point are full-latent buffers. ComfyUI writes the 0.001 into the caller's
sigmas, so its final inverse noise scaling uses 0.001 too (a 1/0.999 factor for flow models): kept.
ComfyUI's first evaluation sees (x / c) * c rather than x (c = sqrt(1 + sigma_0^2)), which can differ from
the engine's x by one float32 ulp; the step itself uses ComfyUI's arithmetic.
"""
from __future__ import annotations

import torch

from .base import Sampler, TokenBuffer, f32


def _log_alpha(t):
    return 0.5 * torch.log(1 / ((t * t) + 1))


def _alpha(t):
    return torch.exp(_log_alpha(t))


def _std(t):
    return torch.sqrt(1. - torch.exp(2. * _log_alpha(t)))


def _lambda(t):
    lma = _log_alpha(t)
    return lma - 0.5 * torch.log(1. - torch.exp(2. * lma))


class UniPC(Sampler):
    """uni_pc (variant bh1)."""

    name = "uni_pc"

    def __init__(self, sigmas, model_sampling=None, noise=None) -> None:
        ts = f32(sigmas).clone()
        if len(ts) and ts[-1] == 0:
            ts[-1] = 0.001
        super().__init__(ts, model_sampling, noise)
        self.final_sigma = ts[-1] if len(ts) else f32(0.0)
        n = self.steps
        self.order = min(3, len(ts) - 2)
        self._updates = {u: self._coefficients(u) for u in range(1, n + 1)} if self.order >= 1 else {}
        self._ring = [TokenBuffer() for _ in range(max(self.order + 1, 1))]
        self._base, self._pred = TokenBuffer(), TokenBuffer()

    def _order_of(self, u: int) -> int:
        return u if u < self.order else min(self.order, self.steps + 1 - u)

    def _coefficients(self, u: int) -> dict:
        """The scalars of the update to t_u from the evaluations u - order .. u - 1."""
        order, t = self._order_of(u), self.sigmas[u]
        prev = list(range(u - order, u))  # evaluation indices, oldest first
        lam_0, lam_t = _lambda(self.sigmas[prev[-1]]), _lambda(t)
        alpha_t = torch.exp(_log_alpha(t))
        h = lam_t - lam_0
        rks = [(_lambda(self.sigmas[prev[-(i + 1)]]) - lam_0) / h for i in range(1, order)]
        rk_vec = torch.tensor(rks + [1.0])
        hh = -h
        h_phi_1 = torch.expm1(hh)
        h_phi_k, fact, b_h = h_phi_1 / hh - 1, 1, hh
        rows, b = [], []
        for i in range(1, order + 1):
            rows.append(torch.pow(rk_vec, i - 1))
            b.append(h_phi_k * fact / b_h)
            fact *= i + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        r_mat, b = torch.stack(rows), torch.tensor(b)
        rhos_p = None
        if order >= 2:
            rhos_p = torch.tensor([0.5]) if order == 2 else torch.linalg.solve(r_mat[:-1, :-1], b[:-1])
        corrector = u != self.steps
        rhos_c = None
        if corrector:
            rhos_c = torch.tensor([0.5]) if order == 1 else torch.linalg.solve(r_mat, b)
        return dict(prev=prev, rks=rks, rhos_p=rhos_p, rhos_c=rhos_c, ratio=_std(t) / _std(self.sigmas[prev[-1]]),
                    a_phi=alpha_t * h_phi_1, a_b=alpha_t * b_h)

    def _history(self, k: int, sl: slice, n: int) -> torch.Tensor:
        return self._ring[k % len(self._ring)].read(sl, n)

    def _diffs(self, c: dict, sl: slice, n: int, model_0: torch.Tensor) -> list[torch.Tensor]:
        """D1s: (model_i - model_0) / r_i for the older evaluations, newest first."""
        prev = c["prev"]
        return [(self._history(prev[-(i + 1)], sl, n) - model_0) / c["rks"][i - 1] for i in range(1, len(prev))]

    @staticmethod
    def _combine(diffs: list[torch.Tensor], rhos: torch.Tensor):
        out = 0
        for i, d in enumerate(diffs):
            out = d * rhos[i] if i == 0 else out + d * rhos[i]
        return out

    def _update(self, k, sl, x, denoised):
        n, t = x.shape[1], self.sigmas[k]
        xv = x / torch.sqrt(1.0 + t ** 2.0) if k == 0 else self._pred.read(sl, n)
        eps = (xv * ((t ** 2 + 1.0) ** 0.5) - denoised) / t
        model_k = (xv - _std(t) * eps) / _alpha(t)
        if k == 0:
            cur = xv
        else:
            c = self._updates[k]
            model_0 = self._history(c["prev"][-1], sl, n)
            corr = self._combine(self._diffs(c, sl, n, model_0), c["rhos_c"])
            cur = self._base.read(sl, n) - c["a_b"] * (corr + c["rhos_c"][-1] * (model_k - model_0))
        self._ring[k % len(self._ring)].write(sl, model_k)
        u = k + 1
        if u not in self._updates:  # one step only: ComfyUI never updates x
            return cur / _alpha(self.sigmas[-1])
        c = self._updates[u]
        model_0 = self._history(c["prev"][-1], sl, n)
        base = c["ratio"] * cur - c["a_phi"] * model_0
        pred = self._combine(self._diffs(c, sl, n, model_0), c["rhos_p"]) if c["rhos_p"] is not None else 0
        nxt = base - c["a_b"] * pred
        if u == self.steps:
            return nxt / _alpha(self.sigmas[-1])
        self._base.write(sl, base)
        self._pred.write(sl, nxt)
        return nxt * ((self.sigmas[u] ** 2 + 1.0) ** 0.5)
