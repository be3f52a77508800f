"""Samplers with two model evaluations per step: heun, dpm_2, dpmpp_sde (ComfyUI 0.3.75's math).

Stage 0 of step i evaluates at sigmas[i] and returns the intermediate point; stage 1 evaluates there and
finishes the step from the step's start, which is kept in a full-latent buffer. A step that ends at sigma
0 has only stage 0, as in ComfyUI (heun and dpm_2 take an Euler step there, dpmpp_sde the prediction).
"""
from __future__ import annotations

from .base import Eval, Sampler, TokenBuffer, ancestral_step, f32, half_log_snr, sde_schedule, sigma_of_half_log_snr, to_d


class _TwoStage(Sampler):
    def __init__(self, sigmas, model_sampling=None, noise=None) -> None:
        super().__init__(sigmas, model_sampling, noise)
        self._start = TokenBuffer()  # x at the start of the step

    def _mid_sigma(self, i: int):
        """The sigma of step i's second evaluation."""
        raise NotImplementedError

    def _plan(self):
        plan = []
        for i in range(self.steps):
            plan.append(Eval(i, self.sigmas[i], 0))
            if self.sigmas[i + 1] != 0:
                plan.append(Eval(i, self._mid_sigma(i), 1))
        return plan


class Heun(_TwoStage):
    """heun: Euler to sigmas[i+1], evaluate there, redo the step with the mean of both slopes."""

    name = "heun"

    def __init__(self, sigmas, model_sampling=None, noise=None) -> None:
        super().__init__(sigmas, model_sampling, noise)
        self._d = TokenBuffer()

    def _mid_sigma(self, i):
        return self.sigmas[i + 1]

    def _update(self, k, sl, x, denoised):
        e = self.plan[k]
        s, nxt = self.sigmas[e.step], self.sigmas[e.step + 1]
        dt = nxt - s
        if e.stage == 1:
            d_2 = to_d(x, nxt, denoised)
            return self._start.read(sl, x.shape[1]) + (self._d.read(sl, x.shape[1]) + d_2) / 2 * dt
        d = to_d(x, s, denoised)
        if nxt == 0:
            return x + d * dt
        self._start.write(sl, x)
        self._d.write(sl, d)
        return x + d * dt


class Dpm2(_TwoStage):
    """dpm_2: the slope at the log-midpoint sigma, applied to the whole step (DPM-Solver-2)."""

    name = "dpm_2"

    def _mid_sigma(self, i):
        return self.sigmas[i].log().lerp(self.sigmas[i + 1].log(), 0.5).exp()

    def _update(self, k, sl, x, denoised):
        e = self.plan[k]
        s, nxt = self.sigmas[e.step], self.sigmas[e.step + 1]
        if e.stage == 1:
            return self._start.read(sl, x.shape[1]) + to_d(x, e.sigma, denoised) * (nxt - s)
        d = to_d(x, s, denoised)
        if nxt == 0:
            return x + d * (nxt - s)
        self._start.write(sl, x)
        return x + d * (self.plan[k + 1].sigma - s)


class DpmppSde(_TwoStage):
    """dpmpp_sde: DPM-Solver++ (stochastic), r = 1/2, with Brownian-tree noise; half-log-SNR from logit(sigma)
    for flow models, whose first sigma ComfyUI nudges below 1 (``percent_to_sigma(1e-4)``)."""

    name = "dpmpp_sde"
    needs_model_sampling = True
    needs_noise = True
    r = 0.5

    def __init__(self, sigmas, model_sampling=None, noise=None) -> None:
        sig, self._tree_span = sde_schedule(sigmas, model_sampling)
        self.flow = bool(getattr(model_sampling, "flow", False))
        self._coef = [self._coefficients(sig[i], sig[i + 1]) for i in range(len(sig) - 1)]
        super().__init__(sig, model_sampling, noise)
        self.final_sigma = f32(sigmas)[-1]
        self._stream = noise.brownian(*self._tree_span) if self._tree_span else None
        self._den = TokenBuffer()

    def _coefficients(self, s, nxt):
        if nxt == 0:
            return None
        lam_s, lam_t = half_log_snr(s, self.flow), half_log_snr(nxt, self.flow)
        h = lam_t - lam_s
        lam_s1 = lam_s + self.r * h
        fac = 1 / (2 * self.r)
        s_1 = sigma_of_half_log_snr(lam_s1, self.flow)
        alpha_s, alpha_s1, alpha_t = s * lam_s.exp(), s_1 * lam_s1.exp(), nxt * lam_t.exp()
        down, up = ancestral_step(lam_s.neg().exp(), lam_s1.neg().exp())
        h_ = down.log().neg() - lam_s
        stage0 = ((alpha_s1 / alpha_s) * (-h_).exp(), alpha_s1 * (-h_).expm1(), alpha_s1, up)
        down, up = ancestral_step(lam_s.neg().exp(), lam_t.neg().exp())
        h_ = down.log().neg() - lam_s
        stage1 = ((alpha_t / alpha_s) * (-h_).exp(), alpha_t * (-h_).expm1(), alpha_t, up)
        return dict(sigma_mid=s_1, fac=fac, stages=(stage0, stage1))

    def _mid_sigma(self, i):
        return self._coef[i]["sigma_mid"]

    def _draw(self, k: int) -> int:
        """Brownian call index of evaluation k's update: two per step that does not end at sigma 0."""
        e = self.plan[k]
        return 2 * sum(1 for j in range(e.step) if self._coef[j] is not None) + e.stage

    def _update(self, k, sl, x, denoised):
        e = self.plan[k]
        coef = self._coef[e.step]
        if coef is None:
            return denoised
        s = self.sigmas[e.step]
        c_x, c_den, alpha, up = coef["stages"][e.stage]
        if e.stage == 0:
            self._start.write(sl, x)
            self._den.write(sl, denoised)
            start, den = x, denoised
            target = coef["sigma_mid"]
        else:
            start = self._start.read(sl, x.shape[1])
            fac = coef["fac"]
            den = (1 - fac) * self._den.read(sl, x.shape[1]) + fac * denoised
            target = self.sigmas[e.step + 1]
        out = c_x * start - c_den * den
        noise = self._stream(self._draw(k), s, target)[:, sl]
        return out + alpha * noise * 1.0 * up
