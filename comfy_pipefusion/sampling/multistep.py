"""Multistep samplers: dpmpp_2m and dpmpp_2m_sde (ComfyUI 0.3.75's math), one evaluation per step.

Both extrapolate with the previous step's prediction, kept in a full-latent buffer: a patch reads the
previous prediction of its tokens, then overwrites it with its own.
"""
from __future__ import annotations

from .base import Sampler, TokenBuffer, f32, half_log_snr, sde_schedule


class Dpmpp2M(Sampler):
    """DPM-Solver++(2M) in t = -log(sigma) for every model type (ComfyUI has no flow branch here)."""

    name = "dpmpp_2m"

    def __init__(self, sigmas, model_sampling=None, noise=None) -> None:
        super().__init__(sigmas, model_sampling, noise)
        self._old = TokenBuffer()
        self._coef = [self._coefficients(i) for i in range(self.steps)]

    def _coefficients(self, i):
        t, t_next = self.sigmas[i].log().neg(), self.sigmas[i + 1].log().neg()
        h = t_next - t
        ratio, c = t_next.neg().exp() / t.neg().exp(), (-h).expm1()
        if i == 0 or self.sigmas[i + 1] == 0:
            return ratio, c, None
        r = (t - self.sigmas[i - 1].log().neg()) / h
        return ratio, c, (1 + 1 / (2 * r), 1 / (2 * r))

    def _update(self, k, sl, x, denoised):
        ratio, c, mix = self._coef[k]
        den = denoised
        if mix is not None:
            den = mix[0] * denoised - mix[1] * self._old.read(sl, x.shape[1])
        self._old.write(sl, denoised)
        return ratio * x - c * den


class Dpmpp2MSde(Sampler):
    """DPM-Solver++(2M) SDE, midpoint, eta 1, Brownian-tree noise; in half-log-SNR, -logit(sigma) for flow
    models, whose first sigma ComfyUI nudges below 1 (``percent_to_sigma(1e-4)``)."""

    name = "dpmpp_2m_sde"
    needs_model_sampling = True
    needs_noise = True
    eta = 1.0

    def __init__(self, sigmas, model_sampling=None, noise=None) -> None:
        sig, span = sde_schedule(sigmas, model_sampling)
        super().__init__(sig, model_sampling, noise)
        self.final_sigma = f32(sigmas)[-1]
        self._stream = noise.brownian(*span) if span else None
        self._old = TokenBuffer()
        self._coef, self._draws = [], []
        h_last, n = None, 0
        for i in range(self.steps):
            coef, h = self._coefficients(i, h_last)
            self._coef.append(coef)
            self._draws.append(n if coef is not None else None)
            n += coef is not None
            h_last = h if h is not None else h_last

    def _coefficients(self, i, h_last):
        s, nxt = self.sigmas[i], self.sigmas[i + 1]
        if nxt == 0:
            return None, None
        lam_s, lam_t = half_log_snr(s, self.flow), half_log_snr(nxt, self.flow)
        h = lam_t - lam_s
        h_eta = h * (self.eta + 1)
        alpha_t = nxt * lam_t.exp()
        c_x, c_den = nxt / s * (-h * self.eta).exp(), alpha_t * (-h_eta).expm1().neg()
        c_old = None if i == 0 else 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / (h_last / h))
        c_noise = (-2 * h * self.eta).expm1().neg().sqrt()
        return (c_x, c_den, c_old, c_noise), h

    def _update(self, k, sl, x, denoised):
        coef = self._coef[k]
        if coef is None:
            self._old.write(sl, denoised)
            return denoised
        c_x, c_den, c_old, c_noise = coef
        out = c_x * x + c_den * denoised
        if c_old is not None:
            out = out + c_old * (denoised - self._old.read(sl, x.shape[1]))
        self._old.write(sl, denoised)
        noise = self._stream(self._draws[k], self.sigmas[k], self.sigmas[k + 1])[:, sl]
        return out + noise * self.sigmas[k + 1] * c_noise * 1.0
