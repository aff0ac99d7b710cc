"""Sampler node: K5_MODEL + K5_EMBEDS -> K5_LATENT with k5core.sampling (flow-matching Euler, CFG,
I2V first-frame conditioning, MagCache), ComfyUI's progress bar, latent preview and cancel."""
from __future__ import annotations

import logging

from k5core.sampling import PIXEL_MULTIPLE, SPATIAL_RATIO, check_size, sample
from k5core.tasks import Task

from . import comfy
from .cache import CACHE, ModelHandle
from .encode import Embeds
from .vae import latent_samples, make_latent

log = logging.getLogger("k5.nodes")
SEED_MAX = 0xFFFFFFFFFFFFFFFF


def size_of(task: Task, latent: dict | None, width: int, height: int, frames: int) -> tuple[int, int, int]:
    """(width, height, frames) to sample: a start latent's size when given, else the widgets'; image
    tasks always make 1 frame."""
    if latent is not None:
        _, _, t, h, w = latent_samples(latent, "latent").shape
        width, height = w * SPATIAL_RATIO, h * SPATIAL_RATIO
        frames = (t - 1) * 4 + 1
    if not task.is_video:
        frames = 1
    check_size(task, width, height, frames)
    return width, height, frames


def check_embeds(task: Task, embeds: Embeds) -> None:
    """Clear errors for embeddings that cannot condition this DiT, a warning for another template."""
    if not isinstance(embeds, Embeds):
        raise TypeError(f"embeds: expected K5_EMBEDS from K5 Text Encode, got {type(embeds).__name__}")
    dims = (embeds.positive.text_embed.shape[-1], embeds.positive.pooled.shape[-1])
    wanted = (task.dit.in_text_dim, task.dit.in_text_dim2)
    if dims != wanted:
        raise ValueError(f"embeds: text width {dims[0]} and pooled width {dims[1]} do not fit task {task.name}, "
                         f"which needs {wanted[0]} and {wanted[1]} (Kandinsky 5 uses Qwen2.5-VL-7B-Instruct, "
                         f"width 3584, and CLIP-L, width 768)")
    if embeds.content != task.content:
        log.warning("Kandinsky 5: prompts were encoded with the %r template but task %s was trained with %r; "
                    "set K5 Text Encode's content to %r", embeds.content, task.name, task.content, task.content)


class K5Sampler:
    DESCRIPTION = ("Sample a Kandinsky 5 latent: flow-matching Euler over the shifted schedule with "
                   "classifier-free guidance. 0 for steps, guidance or shift means the task's official value "
                   "(e.g. 50 steps, guidance 5, shift 10 for Lite T2V; 16 steps, guidance 1 for distilled).")
    CATEGORY = comfy.CATEGORY
    RETURN_TYPES = ("K5_LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("K5_MODEL",),
            "embeds": ("K5_EMBEDS",),
            "width": ("INT", {"default": 768, "min": PIXEL_MULTIPLE, "max": 4096, "step": PIXEL_MULTIPLE,
                              "tooltip": "multiple of 16 (128 for NABLA tasks: 10 s and HD)"}),
            "height": ("INT", {"default": 512, "min": PIXEL_MULTIPLE, "max": 4096, "step": PIXEL_MULTIPLE}),
            "frames": ("INT", {"default": 121, "min": 1, "max": 1441, "step": 4,
                               "tooltip": "pixel frames, 4k+1 (121 = 5 s at 24 fps); image models make 1"}),
            "steps": ("INT", {"default": 0, "min": 0, "max": 500, "tooltip": "0 = the task's (50; distilled 16)"}),
            "guidance": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 30.0, "step": 0.1,
                                   "tooltip": "0 = the task's (5; 3.5 images; 1 nocfg/distilled = no negative pass)"}),
            "shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                "tooltip": "schedule shift; 0 = the task's (10 video, 3 images)"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True}),
            "magcache": ("BOOLEAN", {"default": False, "tooltip":
                         "skip the visual blocks on steps where their output is predictable (official ratios; "
                         "faster, slightly different)"}),
        }, "optional": {
            "image_latent": ("K5_LATENT", {"tooltip": "I2V: the encoded first frame; I2I: the encoded source image"}),
            "latent": ("K5_LATENT", {"tooltip": "sets width, height and frames from its size"}),
        }}

    def sample(self, model: ModelHandle, embeds: Embeds, width, height, frames, steps, guidance, shift, seed,
               magcache, image_latent=None, latent=None):
        task = model.task_config
        width, height, frames = size_of(task, latent, width, height, frames)
        check_embeds(task, embeds)
        first = latent_samples(image_latent, "image_latent") if image_latent is not None else None
        if task.mode == "i2v" and first is None:
            raise ValueError(f"image_latent: task {task.name} is image-to-video; connect K5 VAE Encode of the "
                             f"first frame")
        steps = steps or task.steps
        dit = CACHE.dit(model)
        progress = comfy.progress_bar(steps, comfy.latent_previewer(task.vae))
        try:
            samples = sample(dit, task, embeds.positive, embeds.negative, width=width, height=height,
                             frames=frames, steps=steps, guidance=guidance or None, shift=shift or None,
                             seed=seed, image_latent=first, progress=progress, should_stop=comfy.should_stop,
                             magcache=magcache, device=comfy.torch_device())
        except InterruptedError as e:
            raise comfy.interrupted(e) from e
        return (make_latent(samples, task.vae, task.name),)


NODE_CLASS_MAPPINGS = {"K5Sampler": K5Sampler}
NODE_DISPLAY_NAME_MAPPINGS = {"K5Sampler": "K5 Sampler"}
