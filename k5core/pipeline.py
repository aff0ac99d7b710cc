"""Prompt in, frames out: the one orchestration of encode -> sample -> decode that the CLI
(`python -m k5core.generate`), the ComfyUI nodes and the trainer's sample-during-training share.

The steps are separate functions so a caller can hold only one big model at a time
(encode the prompts, free the text encoder, then load the DiT):

    settings = resolve(Settings(task="k5-lite-t2v-5s-sd", prompt="..."))   # defaults filled, size checked
    embeds, negative = encode_prompts(text_encoder, settings, image)    # I2I: the image goes to Qwen too
    image_latent = encode_image(vae, image, settings) if image is not None else None   # I2V / I2I
    result = generate(dit, vae, settings, embeds, negative, image_latent=image_latent)
    result.frames   # (B, F, H, W, 3) float in [0, 1] on the CPU

`generate` samples (k5core.sampling), calls `before_decode()` (free the DiT, move the VAE in), decodes
with the VAE's tiling and, for I2V, renormalises the first latent frames as the official pipeline does.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from .sampling import ProgressFn, check_size, default_negative_prompt, default_size, random_seed, sample
from .tasks import Task, get_task

I2V_MAX_AREA = {512: 512 * 768, 1024: 1024 * 1024}    # official I2V: pixel area of the output
I2V_DIVISIBILITY = {512: 16, 1024: 128}               # ... and the multiple both sides snap to


@dataclass(frozen=True)
class Settings:
    """What one generation asks for; None means the task's (or the official pipeline's) default."""
    task: str
    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    steps: int | None = None
    guidance: float | None = None
    shift: float | None = None
    seed: int | None = None
    magcache: bool = False

    @property
    def task_config(self) -> Task:
        return get_task(self.task)

    @property
    def uses_negative(self) -> bool:
        return self.guidance is None or abs(self.guidance - 1.0) > 1e-6

    def to_metadata(self, **extra) -> str:
        """The settings (and `extra`, e.g. model files) as one JSON string for the output file."""
        return json.dumps({"generator": "k5core", **asdict(self), **extra}, ensure_ascii=False)


def resolve(settings: Settings, image_size: tuple[int, int] | None = None) -> Settings:
    """Fill every default and check the size; `image_size` (height, width) of the I2V/I2I input
    picks the output size as the official pipelines do when width/height are not given."""
    task = settings.task_config
    height, width = settings.height, settings.width
    if (height is None) != (width is None):
        raise ValueError("width/height: give both or neither")
    if height is None:
        height, width = size_for_image(task, image_size) if image_size else default_size(task)
    frames = settings.frames if settings.frames is not None else task.frames
    check_size(task, width, height, frames)
    guidance = task.guidance if settings.guidance is None else float(settings.guidance)
    negative = settings.negative_prompt
    return replace(settings, width=width, height=height, frames=frames, guidance=guidance,
                   steps=task.steps if settings.steps is None else int(settings.steps),
                   shift=task.shift if settings.shift is None else float(settings.shift),
                   seed=random_seed() if settings.seed is None else int(settings.seed),
                   negative_prompt=default_negative_prompt(task) if negative is None else negative)


def size_for_image(task: Task, image_size: tuple[int, int]) -> tuple[int, int]:
    """(height, width) for an input image of `image_size` (height, width).

    I2V (official `resize_image`): keep the aspect ratio at the task's pixel area (512*768 SD,
    1024*1024 HD), each side rounded to a multiple of 16 (SD) or 128 (HD).
    I2I and others (official `find_nearest`): the bucket with the closest aspect ratio.
    """
    h, w = image_size
    if task.mode == "i2v" and task.resolution in I2V_MAX_AREA:
        step = I2V_DIVISIBILITY[task.resolution]
        k = math.sqrt(I2V_MAX_AREA[task.resolution] / (h * w)) / step
        return max(step, round(h * k) * step), max(step, round(w * k) * step)
    return min(task.buckets, key=lambda b: abs(b[0] / b[1] - h / w))


# ----------------------------------------------------------------------------- encode
def encode_prompts(text_encoder, settings: Settings, image: torch.Tensor | None = None):
    """(embeds, negative embeds or None) for a resolved Settings; one encoder call for both.
    I2I (content image_edit): the (H, W, 3) source image, fitted to the output size as the DiT sees it,
    is encoded with the prompt and the negative prompt (official); other tasks encode text only."""
    task = settings.task_config
    prompts = [settings.prompt] + ([settings.negative_prompt] if settings.uses_negative else [])
    images = None
    if image is not None and task.content == "image_edit":
        images = fit_image(image, settings).mul(255).round().to(torch.uint8)[0].permute(1, 2, 0)  # (H, W, 3)
    embeds = text_encoder.encode(prompts, task.content, images=images)
    if not settings.uses_negative:
        return embeds, None
    return embeds.select(0), embeds.select(1)


def encode_image(vae, image: torch.Tensor, settings: Settings) -> torch.Tensor:
    """An (H, W, 3) image (uint8, or float in [0, 1]) -> scaled latent (1, 16, 1, h/8, w/8) at the
    settings' size: resized to cover it, then centre-cropped (official `resize_video`)."""
    x = fit_image(image, settings) * 2.0 - 1.0
    return vae.encode(x[:, :, None].clamp(-1.0, 1.0))          # (1, 16, 1, h, w)


def fit_image(image: torch.Tensor, settings: Settings) -> torch.Tensor:
    """An (H, W, 3) image (uint8, or float in [0, 1]) -> (1, 3, height, width) float in [0, 1] at the
    settings' size: resized to cover it, then centre-cropped (official `resize_video`)."""
    if image.dim() != 3 or image.shape[-1] != 3:
        raise ValueError(f"image: expected (H, W, 3), got {tuple(image.shape)}")
    x = image.permute(2, 0, 1)[None].float()                   # (1, 3, H, W)
    x = x / 255.0 if image.dtype == torch.uint8 else x
    return cover_crop(x, settings.height, settings.width).clamp(0.0, 1.0)


def cover_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, C, H, W) resized (bilinear, antialiased) to cover height x width, then centre-cropped."""
    h, w = x.shape[-2:]
    scale = min(h / height, w / width)
    rh, rw = max(height, int(h / scale)), max(width, int(w / scale))
    x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (rh - height) // 2, (rw - width) // 2
    return x[..., top:top + height, left:left + width]


# ----------------------------------------------------------------------------- generate
@dataclass
class Result:
    frames: torch.Tensor       # (B, F, H, W, 3) float in [0, 1], CPU
    latent: torch.Tensor       # (B, 16, T, H/8, W/8) float32, as sampled (before the I2V renormalisation)
    settings: Settings


def generate(dit, vae, settings: Settings, embeds, negative_embeds=None, *,
             image_latent: torch.Tensor | None = None, noise: torch.Tensor | None = None,
             progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None,
             before_decode: Callable[[], None] | None = None, batch_cfg: bool = True) -> Result:
    """Sample a latent for resolved `settings` and decode it to frames.

    progress(step, total, info) sees the sampling steps (info: sampling.StepInfo) and then the VAE
    tiles (info: a str); should_stop() can end either (SamplingCancelled / InterruptedError).
    before_decode() runs between the two (free the DiT, move the VAE to the GPU).
    """
    s = settings
    if s.width is None or s.seed is None:
        raise ValueError("generate: pass resolve(settings) (width, height, seed... must be filled)")
    task = s.task_config
    latent = sample(dit, task, embeds, negative_embeds if s.uses_negative else None,
                    width=s.width, height=s.height, frames=s.frames, steps=s.steps, guidance=s.guidance,
                    shift=s.shift, seed=s.seed, noise=noise, image_latent=image_latent, progress=progress,
                    should_stop=should_stop, magcache=s.magcache, batch_cfg=batch_cfg)
    if before_decode is not None:
        before_decode()
    frames = decode(vae, task, latent, progress=progress, should_stop=should_stop)
    return Result(frames, latent.cpu(), s)


def decode(vae, task: Task | None, latent: torch.Tensor, progress: ProgressFn | None = None,
           should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """Latent (B, 16, T, h, w) -> frames (B, F, H, W, 3) float [0, 1] on the CPU; an I2V task's latent
    is renormalised first (task None: a latent that did not come from the sampler, e.g. VAE Encode)."""
    if task is not None and task.mode == "i2v":
        latent = normalize_first_frames(latent)
    video = vae.decode(latent, progress=progress, should_stop=should_stop)      # (B, 3, F, H, W) in [-1, 1]
    return ((video.float().cpu() + 1.0) / 2.0).permute(0, 2, 3, 4, 1).clamp_(0.0, 1.0)


def normalize_first_frames(latent: torch.Tensor, count: int = 4, reference: int = 5) -> torch.Tensor:
    """The official I2V post-processing: match the mean/std of the first `count` latent frames to the
    next `reference` frames, within limits (mean -0.05..+0.1, std -0.1..+0.25 of each frame's own).
    Latents with no frame after the first `count` are returned unchanged."""
    t = latent.shape[2]
    if t <= count:
        return latent
    src = latent[:, :, :count]
    ref = latent[:, :, count:count + min(reference, t - 1)]
    out = latent.clone()
    for b in range(latent.shape[0]):
        s = src[b]
        s_mean = s.mean(dim=(0, 2, 3), keepdim=True)           # per frame over (C, H, W)
        s_std = s.std(dim=(0, 2, 3), keepdim=True)
        r_mean = torch.clamp(ref[b].mean(), s_mean - 0.05, s_mean + 0.1)
        r_std = torch.clamp(ref[b].std(), s_std - 0.1, s_std + 0.25)
        out[b, :, :count] = (s - s_mean) / s_std * r_std + r_mean
    return out
