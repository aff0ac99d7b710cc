"""Optimizers (AdamW, 8-bit AdamW from bitsandbytes, Adafactor) and learning-rate schedules
(constant, linear, cosine, each with linear warmup) for the LoRA parameters."""
from __future__ import annotations

import inspect
import math

import torch

from .config import ConfigError, TrainConfig, parse_key_values


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by cfg.optimizer_type with cfg.optimizer_args (key=value) passed through."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("the LoRA network has no trainable parameters")
    kwargs = parse_key_values(cfg.optimizer_args, "--optimizer_args")
    name = cfg.optimizer_type
    if name == "adamw":
        cls = torch.optim.AdamW
    elif name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ConfigError([f"--optimizer_type adamw8bit needs bitsandbytes ({e}); install it or use adamw"])
        cls = bnb.optim.AdamW8bit
    elif name == "adafactor":
        from transformers.optimization import Adafactor
        cls = Adafactor
        # a fixed learning rate (ours, driven by the scheduler), not Adafactor's relative steps
        kwargs = {"relative_step": False, "scale_parameter": False, "warmup_init": False, **kwargs}
    else:
        raise ConfigError([f"--optimizer_type: unknown optimizer {name!r}"])
    _check_kwargs(cls, kwargs, name)
    return cls(params, lr=cfg.learning_rate, **kwargs)


def _check_kwargs(cls, kwargs: dict, name: str) -> None:
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "params", "lr"}
    bad = sorted(set(kwargs) - accepted)
    if bad:
        raise ConfigError([f"--optimizer_args: {', '.join(bad)} not accepted by {name} "
                           f"(accepted: {', '.join(sorted(accepted))})"])


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """cfg.lr_warmup_steps as a step count (a value below 1 is a fraction of the run)."""
    w = cfg.lr_warmup_steps
    return int(round(w * total_steps)) if 0 < w < 1 else int(w)


def lr_factor(step: int, total: int, warmup: int, kind: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak rate at optimizer step `step` (0-based) of `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / (warmup + 1)
    if kind in ("constant", "constant_with_warmup"):
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        decay = 1.0 - progress
    elif kind == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown lr scheduler {kind!r}")
    return min_ratio + (1.0 - min_ratio) * decay


class Schedule:
    """A picklable lr_lambda for LambdaLR (its state_dict then restores on resume)."""

    def __init__(self, total: int, warmup: int, kind: str, min_ratio: float):
        self.total, self.warmup, self.kind, self.min_ratio = total, warmup, kind, min_ratio

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.total, self.warmup, self.kind, self.min_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """LambdaLR over optimizer steps: warmup then the chosen decay."""
    schedule = Schedule(total_steps, warmup_steps(cfg, total_steps), cfg.lr_scheduler, cfg.lr_scheduler_min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
