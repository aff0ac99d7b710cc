"""Flow-matching training times and targets (the official sign convention).

x_t = (1 - t) * x_0 + t * noise, t in [0, 1] (t = 1 is pure noise); the DiT sees t * 1000 and predicts
the velocity v = noise - x_0, so the official Euler sampler x_{t'} = x_t + (t' - t) * v runs t from 1
down to 0. The samplings follow musubi-tuner's names:
    uniform   t ~ U(0, 1)
    sigmoid   t = sigmoid(sigmoid_scale * n),                 n ~ N(0, 1)
    shift     t = s * u / (1 + (s - 1) * u), u = sigmoid(sigmoid_scale * n), s = discrete_flow_shift
    logsnr    t = sigmoid(-l / 2),                            l ~ N(logit_mean, logit_std)
then t is rescaled into [min_timestep, max_timestep] / 1000.
"""
from __future__ import annotations

import math

import torch


def sample_t(n: int, sampling: str, generator: torch.Generator, *, shift: float = 1.0,
             sigmoid_scale: float = 1.0, logit_mean: float = 0.0, logit_std: float = 1.0,
             min_timestep: float = 0.0, max_timestep: float = 1000.0) -> torch.Tensor:
    """Draw n training times in [min_timestep, max_timestep] / 1000 on the CPU (float32, shape (n,))."""
    if sampling == "uniform":
        t = torch.rand(n, generator=generator)
    elif sampling in ("sigmoid", "shift"):
        t = torch.sigmoid(sigmoid_scale * torch.randn(n, generator=generator))
        if sampling == "shift":
            t = shift_t(t, shift)
    elif sampling == "logsnr":
        logsnr = logit_mean + logit_std * torch.randn(n, generator=generator)
        t = torch.sigmoid(-logsnr / 2)
    else:
        raise ValueError(f"unknown timestep sampling {sampling!r}; use uniform, sigmoid, shift or logsnr")
    lo, hi = min_timestep / 1000.0, max_timestep / 1000.0
    return t * (hi - lo) + lo


def shift_t(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The official schedule shift t' = s t / (1 + (s - 1) t): more time near pure noise for s > 1."""
    return shift * t / (1 + (shift - 1) * t)


def noisy_latents(latent: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x_0 + t noise, t (B,) broadcast over (B, C, T, H, W)."""
    t = t.view(-1, *([1] * (latent.ndim - 1))).to(latent.dtype)
    return (1 - t) * latent + t * noise


def velocity_target(latent: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The DiT's regression target: v = noise - x_0."""
    return noise - latent


def loss_weights(t: torch.Tensor, scheme: str) -> torch.Tensor:
    """Per-sample loss weights from t (SD3's schemes on sigma = t): none -> 1, sigma_sqrt -> t^-2,
    cosmap -> 2 / (pi (1 - 2t + 2t^2))."""
    if scheme == "none":
        return torch.ones_like(t)
    if scheme == "sigma_sqrt":
        return t.clamp_min(1e-3) ** -2.0
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1 - 2 * t + 2 * t ** 2))
    raise ValueError(f"unknown weighting scheme {scheme!r}; use none, sigma_sqrt or cosmap")


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted MSE: mean over every element of each sample, then the weighted batch mean (fp32)."""
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)       # (B,)
    return (per_sample * weights.to(per_sample)).mean()
