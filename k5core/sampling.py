"""Flow-matching sampling of the Kandinsky 5 DiT, as the official `generation_utils.generate`.

The latent travels from noise at t = 1 to data at t = 0 in Euler steps over the shifted schedule
t' = shift * t / (1 + (shift - 1) * t) of t = linspace(1, 0, steps + 1):

    x_{i+1} = x_i + (t'_{i+1} - t'_i) * v(x_i, t'_i * 1000)

with classifier-free guidance v = v_uncond + guidance * (v_cond - v_uncond); guidance 1 runs the
conditional branch only (nocfg and distilled tasks). Both branches run as one batch of 2B when memory
allows (text padded to one length, padding masked).

Visual condition (33 input channels = [noisy latent 16, condition latent 16, mask 1]):
- video models (`visual_cond`): the condition channels are zeros. For I2V the encoded first frame is
  written over the noisy latent's first frame before every step and its mask is 1, exactly as the
  official pipeline (and ComfyUI) do; T2V passes zeros.
- `instruct_type: channel` (I2I): the encoded source image fills the condition channels, mask 1;
  without an image both are zeros (text-to-image on the editing model).

Shapes: latents are (B, 16, T, H/8, W/8) float32 with T = (frames - 1) / 4 + 1; the VAE module applies
the scaling factor, so latents here are already scaled. The initial noise is drawn with the official
layout (B*T, H, W, 16) from a generator on the sampling device, so one seed gives one video per device.

Cancelling: `should_stop()` is asked before every step; when it answers True, `sample` raises
`SamplingCancelled` (an `InterruptedError`, like the VAE's tiling loop) carrying the latent so far, so a
half-denoised latent is never mistaken for a result. ComfyUI's interrupt and the trainer's stop both
map onto it.
"""
from __future__ import annotations

import contextlib
import secrets
from dataclasses import dataclass
from typing import Callable

import torch

from .tasks import DEFAULT_NEGATIVE_PROMPT, Task, latent_frames
from .text import TextEmbeds

LATENT_CHANNELS = 16
SPATIAL_RATIO = 8            # VAE downsampling of height and width
PIXEL_MULTIPLE = 16          # VAE ratio 8 x DiT patch 2
NABLA_PIXEL_MULTIPLE = 128   # NABLA tiles are 8 x 8 tokens = 128 x 128 pixels

ProgressFn = Callable[[int, int, object], None]


class SamplingCancelled(InterruptedError):
    """`should_stop()` ended sampling before step `step` of `total`; `latent` is the state so far."""

    def __init__(self, step: int, total: int, latent: torch.Tensor):
        super().__init__(f"sampling stopped before step {step + 1}/{total}")
        self.step, self.total, self.latent = step, total, latent


@dataclass
class StepInfo:
    """What `progress(step, total, info)` receives after each step: the timesteps just taken, whether
    MagCache skipped the blocks, and the predicted clean latent x0 = x - t * v (for previews)."""
    t: float
    t_next: float
    skipped: bool
    x0: torch.Tensor | None = None

    def __str__(self) -> str:
        return f"t {self.t:.3f} -> {self.t_next:.3f}" + (" (cached)" if self.skipped else "")


# ----------------------------------------------------------------------------- schedule and sizes
def schedule(steps: int, shift: float) -> torch.Tensor:
    """The official shifted timesteps from 1 to 0: (steps + 1,) float32."""
    if steps < 1:
        raise ValueError(f"steps: expected >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift: expected > 0, got {shift}")
    t = torch.linspace(1, 0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


def default_size(task: Task) -> tuple[int, int]:
    """(height, width) when none is given: the official T2V/I2V default 512x768 (h x w) when it is
    one of the task's buckets, else the task's first bucket."""
    return (512, 768) if task.is_video and (512, 768) in task.buckets else task.default_size


def default_negative_prompt(task: Task) -> str:
    """The official pipelines' default negative prompt: the long one for video, empty for images."""
    return DEFAULT_NEGATIVE_PROMPT if task.is_video else ""


def check_size(task: Task, width: int, height: int, frames: int) -> None:
    """Raise ValueError naming the setting when the DiT cannot take this size."""
    multiple = NABLA_PIXEL_MULTIPLE if task.attention.type == "nabla" else PIXEL_MULTIPLE
    why = " (NABLA attention works on 128x128-pixel tiles)" if multiple == NABLA_PIXEL_MULTIPLE else \
        " (VAE ratio 8 x patch size 2)"
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or value < multiple or value % multiple:
            raise ValueError(f"{name}: task {task.name} needs a positive multiple of {multiple} pixels"
                             f"{why}, got {value!r}")
    if not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames: expected a positive frame count, got {frames!r}")
    if not task.is_video and frames != 1:
        raise ValueError(f"frames: task {task.name} makes images; frames must be 1, got {frames}")
    if task.is_video and (frames - 1) % 4:
        lower, upper = (frames - 1) // 4 * 4 + 1, (frames - 1) // 4 * 4 + 5
        raise ValueError(f"frames: the video VAE needs 4k+1 frames (1, 5, ..., 121, ...), got {frames}; "
                         f"use {lower} or {upper}")


def latent_shape(task: Task, width: int, height: int, frames: int, batch: int = 1) -> tuple[int, ...]:
    """(B, 16, T, H/8, W/8) of a checked size; T = (frames - 1) / 4 + 1 (1 for images)."""
    check_size(task, width, height, frames)
    return (batch, LATENT_CHANNELS, latent_frames(frames), height // SPATIAL_RATIO, width // SPATIAL_RATIO)


def make_noise(shape, seed: int, device="cpu") -> torch.Tensor:
    """Initial noise (B, C, T, H, W) float32, drawn as the official code does: randn(B*T, H, W, C)
    from a generator seeded with `seed` on `device`."""
    b, c, t, h, w = shape
    g = torch.Generator(device=device).manual_seed(int(seed))
    noise = torch.randn((b * t, h, w, c), generator=g, device=device, dtype=torch.float32)
    return noise.view(b, t, h, w, c).permute(0, 4, 1, 2, 3).contiguous()


def random_seed() -> int:
    """A fresh seed in [0, 2**32) for callers that were given none (record it to reproduce)."""
    return secrets.randbits(32)


# ----------------------------------------------------------------------------- text
def as_text_embeds(e, batch: int | None, where: str) -> TextEmbeds:
    """A TextEmbeds from a TextEmbeds or a text cache item (mapping with text_embed, pooled and
    optionally text_mask; unbatched (L, D) gets a batch dimension), one prompt repeated to `batch`."""
    if not isinstance(e, TextEmbeds):
        get = e.get if isinstance(e, dict) else (lambda k: getattr(e, k, None))
        embed, mask, pooled = get("text_embed"), get("text_mask"), get("pooled")
        if embed is None or pooled is None:
            raise TypeError(f"{where}: expected k5core.text.TextEmbeds or a text cache item with "
                            f"text_embed and pooled, got {type(e).__name__}")
        if embed.dim() == 2:
            embed, pooled, mask = embed[None], pooled.reshape(1, -1), None if mask is None else mask[None]
        if mask is None:
            mask = torch.ones(embed.shape[:2], dtype=torch.bool, device=embed.device)
        e = TextEmbeds(embed, mask.bool(), pooled)
    if batch is not None and len(e) != batch:
        if len(e) != 1:
            raise ValueError(f"{where}: {len(e)} prompts for a batch of {batch}")
        e = e.select([0] * batch)
    return e


# ----------------------------------------------------------------------------- visual condition
def visual_condition(task: Task, shape, image_latent: torch.Tensor | None, device) -> torch.Tensor | None:
    """The 17 condition channels [latent 16, mask 1] (B, 17, T, H, W) for a 33-channel DiT, None for
    a 16-channel one. Video: zeros, mask 1 on the given first frames. I2I: the image latent, mask 1."""
    p = task.dit
    b, c, t, h, w = shape
    if p.visual_embed_dim == c:
        if image_latent is not None:
            raise ValueError(f"image_latent: task {task.name} takes no image (its DiT has {c} input channels)")
        return None
    cond = torch.zeros((b, c + 1, t, h, w), device=device)
    if image_latent is None:
        return cond
    if p.instruct_type == "channel":
        cond[:, :c] = image_latent
        cond[:, c:] = 1.0
    else:
        cond[:, c:, :image_latent.shape[2]] = 1.0
    return cond


def _check_image_latent(task: Task, image_latent, shape, device) -> torch.Tensor | None:
    """(B|1, 16, k, H, W) with k <= T (video: the first k latent frames; I2I: k = T = 1) -> float32
    (B, 16, k, H, W) on `device`."""
    if image_latent is None:
        if task.mode == "i2v":
            raise ValueError(f"image_latent: task {task.name} is image-to-video and needs the encoded "
                             f"first frame (B, 16, 1, H/8, W/8)")
        return None
    if image_latent.dim() == 4:
        image_latent = image_latent[:, :, None]
    b, c, t, h, w = shape
    ok = image_latent.dim() == 5 and image_latent.shape[0] in (1, b) and image_latent.shape[1] == c \
        and 1 <= image_latent.shape[2] <= t and tuple(image_latent.shape[3:]) == (h, w)
    if not ok:
        raise ValueError(f"image_latent: expected (B, {c}, k <= {t}, {h}, {w}) to match the latent "
                         f"{tuple(shape)}, got {tuple(image_latent.shape)}")
    return image_latent.to(device, torch.float32).expand(b, -1, -1, -1, -1)


# ----------------------------------------------------------------------------- the loop
def sample(model, task: Task, embeds, negative_embeds=None, *, width: int, height: int, frames: int,
           steps: int | None = None, guidance: float | None = None, shift: float | None = None,
           seed: int | None = None, noise: torch.Tensor | None = None,
           image_latent: torch.Tensor | None = None, progress: ProgressFn | None = None,
           should_stop: Callable[[], bool] | None = None, magcache=False, batch_cfg: bool = True,
           device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Denoise one batch and return the latent (B, 16, T, H/8, W/8) float32.

    model: K5DiT, or any callable with its forward signature (x, timestep, text_embed,
        pooled_text_embed, text_mask=, scale_factor=) -> velocity (B, 16, T, H, W).
    embeds / negative_embeds: TextEmbeds (or text cache items); B prompts, or 1 repeated. The negative
        is needed when guidance != 1 (encode `default_negative_prompt(task)` when the user gave none).
    steps, guidance, shift: the task's values when None.
    noise: the initial latent noise; else drawn from `seed` (random when None) on the device.
    image_latent: scaled VAE latent of the I2V first frame(s) (B|1, 16, k, H/8, W/8) or the I2I source.
    progress(step, total, StepInfo) after each step; should_stop() before each (raises SamplingCancelled).
    magcache: False, True (the task's official ratios) or a sequence of ratios (k5core.magcache).
    batch_cfg: run both guidance branches in one forward; falls back to two on CUDA out-of-memory.
    device / dtype: where and in what precision the model runs (default: from its parameters).
    """
    steps = task.steps if steps is None else int(steps)
    guidance = task.guidance if guidance is None else float(guidance)
    shift = task.shift if shift is None else float(shift)
    device = torch.device(device) if device is not None else _model_device(model, noise)
    dtype = dtype or _compute_dtype(model)
    cfg = abs(guidance - 1.0) > 1e-6

    text = as_text_embeds(embeds, None, "embeds")
    batch = noise.shape[0] if noise is not None else len(text)
    shape = latent_shape(task, width, height, frames, batch)
    text = as_text_embeds(text, batch, "embeds").to(device, dtype)
    negative = None
    if cfg:
        if negative_embeds is None:
            raise ValueError(f"negative_embeds: guidance {guidance} needs the negative prompt's embeddings "
                             f"(encode default_negative_prompt(task) when none was given)")
        negative = as_text_embeds(negative_embeds, batch, "negative_embeds").to(device, dtype)

    x = _initial_noise(noise, shape, seed, device)
    image = _check_image_latent(task, image_latent, shape, device)
    cond = visual_condition(task, shape, image, device)
    first = image if task.is_video else None     # I2V: written over the sample's first frames each step
    ts = schedule(steps, shift).to(device)
    velocity = _Velocity(model, task, text, negative, guidance, batch_cfg, dtype)

    with _magcache_for(model, task, magcache, steps) as cache, torch.no_grad():
        velocity.on_forward = None if cache is None else cache.set_branches
        for i in range(steps):
            if should_stop is not None and should_stop():
                raise SamplingCancelled(i, steps, write_first_frames(x, first))
            x = write_first_frames(x, first)
            inp = x if cond is None else torch.cat([x, cond], dim=1)
            if cache is not None:
                cache.begin_step(i)
            v = velocity(inp, ts[i] * 1000)
            if progress is not None:
                skipped = cache is not None and cache.skipped_last
                progress(i + 1, steps, StepInfo(float(ts[i]), float(ts[i + 1]), skipped, x - ts[i] * v))
            x = x + (ts[i + 1] - ts[i]) * v
    return write_first_frames(x, first)


def write_first_frames(x: torch.Tensor, first: torch.Tensor | None) -> torch.Tensor:
    """The sample with its first latent frames replaced by the conditioning image's (I2V); the
    trainer builds its DiT input the same way."""
    if first is None:
        return x
    x = x.clone()
    x[:, :, :first.shape[2]] = first
    return x


def _initial_noise(noise, shape, seed, device) -> torch.Tensor:
    if noise is None:
        return make_noise(shape, random_seed() if seed is None else seed, device)
    if tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise: expected shape {tuple(shape)} for this size, got {tuple(noise.shape)}")
    return noise.to(device=device, dtype=torch.float32)


class _Velocity:
    """v(x, t*1000) with classifier-free guidance; one batched forward for both branches when allowed."""

    def __init__(self, model, task: Task, text: TextEmbeds, negative: TextEmbeds | None, guidance: float,
                 batch_cfg: bool, dtype):
        self.model, self.task, self.text, self.negative = model, task, text, negative
        self.guidance, self.batch_cfg, self.dtype = guidance, batch_cfg, dtype
        self.both = TextEmbeds.cat([text, negative]) if negative is not None and batch_cfg else None
        self.on_forward = None   # MagCache hook: told which guidance branch each batch chunk is

    def forward(self, x, timestep, text: TextEmbeds) -> torch.Tensor:
        t = timestep.to(torch.float32).expand(x.shape[0])
        v = self.model(x.to(self.dtype), t, text.text_embed, text.pooled, text_mask=text.text_mask,
                       scale_factor=self.task.scale_factor)
        return v.float()

    def __call__(self, x, timestep) -> torch.Tensor:
        if self.negative is None:
            return self._branches((0,), lambda: self.forward(x, timestep, self.text))
        if self.both is not None:
            try:
                cond, uncond = self._branches((0, 1), lambda: self.forward(
                    torch.cat([x, x]), timestep, self.both)).chunk(2)
            except torch.OutOfMemoryError:
                self.both = None     # not enough memory for 2B at once: run the branches one by one
                torch.cuda.empty_cache()
                return self(x, timestep)
        else:
            cond = self._branches((0,), lambda: self.forward(x, timestep, self.text))
            uncond = self._branches((1,), lambda: self.forward(x, timestep, self.negative))
        return uncond + self.guidance * (cond - uncond)

    def _branches(self, ids, run):
        if self.on_forward is not None:
            self.on_forward(ids)
        return run()


def _magcache_for(model, task: Task, magcache, steps: int):
    """A context holding a k5core.magcache.MagCache attached to the model, or None when off."""
    if magcache is False or magcache is None:
        return contextlib.nullcontext(None)
    from .magcache import MagCache
    cache = MagCache.for_task(task, steps) if magcache is True else MagCache(magcache, steps)
    return cache.attached(model)


def _model_device(model, noise) -> torch.device:
    """The device of the model's first parameter, else the noise's, else the CPU."""
    params = getattr(model, "parameters", None)
    p = next(params(), None) if params is not None else None
    if p is not None:
        return p.device
    return noise.device if noise is not None else torch.device("cpu")


def _compute_dtype(model) -> torch.dtype:
    """The precision the model computes in: its first fp32/fp16/bf16 parameter (fp8 weights are
    storage only), float32 for plain callables."""
    params = getattr(model, "parameters", None)
    for p in (params() if params is not None else ()):
        if p.dtype in (torch.float32, torch.float16, torch.bfloat16):
            return p.dtype
    return torch.float32
