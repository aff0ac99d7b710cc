"""VAE nodes: IMAGE -> K5_LATENT (I2V first frame, I2I source) and K5_LATENT -> IMAGE frames.

K5_LATENT is a dict: {"samples": (B, 16, T, H/8, W/8) float32 scaled latent on the CPU,
"kind": "hunyuan" | "flux" (the VAE it belongs to), "task": the task that sampled it or None}.
"""
from __future__ import annotations

import torch

from k5core.pipeline import cover_crop, decode
from k5core.tasks import get_task
from k5core.vae import VAETiling

from . import comfy
from .cache import CACHE, VAEHandle

ENCODE_MODES = ("image", "video")


def make_latent(samples: torch.Tensor, kind: str, task: str | None = None) -> dict:
    """A K5_LATENT value."""
    return {"samples": samples.float().cpu(), "kind": kind, "task": task}


def latent_samples(latent, where: str) -> torch.Tensor:
    """The (B, 16, T, h, w) tensor of a K5_LATENT, checked."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.dim() != 5:
        got = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(latent).__name__
        raise ValueError(f"{where}: expected a K5_LATENT with samples (B, 16, T, h, w), got {got}")
    return samples


def images_to_video(image: torch.Tensor, width: int, height: int, mode: str) -> torch.Tensor:
    """ComfyUI IMAGE (N, H, W, 3) in [0, 1] -> VAE input (B, 3, F, H', W') in [-1, 1]: each image one
    sample (mode "image": B = N, F = 1) or all images one clip (mode "video": B = 1, F = N); resized to
    cover width x height and centre-cropped when both are given (0 keeps the size)."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[-1] < 3:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image: expected a ComfyUI IMAGE (N, H, W, 3), got {got}")
    if (width == 0) != (height == 0):
        raise ValueError(f"width/height: give both (pixels) or leave both 0 to keep the size, got {width}x{height}")
    x = image[..., :3].permute(0, 3, 1, 2).float()            # (N, 3, H, W)
    if width:
        x = cover_crop(x, height, width).clamp(0.0, 1.0)
    x = x * 2.0 - 1.0
    if mode == "image":
        return x[:, :, None]                                   # (N, 3, 1, H, W)
    if mode == "video":
        return x.permute(1, 0, 2, 3)[None]                     # (1, 3, N, H, W)
    raise ValueError(f"mode: expected one of {', '.join(ENCODE_MODES)}, got {mode!r}")


def video_to_images(frames: torch.Tensor) -> torch.Tensor:
    """(B, F, H, W, 3) frames in [0, 1] -> ComfyUI IMAGE (B*F, H, W, 3), float32 on the CPU."""
    return frames.reshape(-1, *frames.shape[2:]).float().cpu().contiguous()


class K5VAEEncode:
    DESCRIPTION = ("Encode images with the Kandinsky 5 VAE: the first frame for image-to-video, the source "
                   "image for I2I, or a clip (mode video, 4k+1 frames). Resizes to cover width x height and "
                   "crops the centre, as the official pipelines do.")
    CATEGORY = comfy.CATEGORY
    RETURN_TYPES = ("K5_LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("K5_VAE",),
            "image": ("IMAGE",),
            "width": ("INT", {"default": 768, "min": 0, "max": 4096, "step": 16, "tooltip":
                      "output width (the sampler's); 0 with height 0 keeps the image size"}),
            "height": ("INT", {"default": 512, "min": 0, "max": 4096, "step": 16}),
            "mode": (list(ENCODE_MODES), {"default": "image", "tooltip":
                     "image: every image is one sample; video: the images are the frames of one clip"}),
        }}

    def encode(self, vae: VAEHandle, image, width, height, mode):
        video = images_to_video(image, width, height, mode)
        model = CACHE.vae(vae)
        try:
            samples = model.encode(video, progress=comfy.progress_bar(1), should_stop=comfy.should_stop)
        except InterruptedError as e:
            raise comfy.interrupted(e) from e
        return (make_latent(samples, model.kind),)


class K5VAEDecode:
    DESCRIPTION = ("Decode a Kandinsky 5 latent to frames (ComfyUI IMAGE, so every video or image saver "
                   "works). Tiling bounds the memory: tiles of spatial_tile pixels and chunks of temporal_chunk "
                   "frames, blended over their overlaps.")
    CATEGORY = comfy.CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        d = VAETiling()
        return {"required": {
            "vae": ("K5_VAE",),
            "latent": ("K5_LATENT",),
            "tiling": ("BOOLEAN", {"default": d.enabled, "tooltip": "off: decode in one piece (needs much more memory)"}),
            "spatial_tile": ("INT", {"default": d.spatial_tile, "min": 32, "max": 4096, "step": 8}),
            "spatial_overlap": ("INT", {"default": d.spatial_overlap, "min": 0, "max": 4096, "step": 8}),
            "temporal_chunk": ("INT", {"default": d.temporal_chunk, "min": 5, "max": 1025, "step": 4,
                                       "tooltip": "pixel frames per chunk, 4k+1"}),
            "temporal_overlap": ("INT", {"default": d.temporal_overlap, "min": 0, "max": 1024, "step": 4}),
        }}

    def decode(self, vae: VAEHandle, latent, tiling, spatial_tile, spatial_overlap, temporal_chunk,
               temporal_overlap):
        samples = latent_samples(latent, "latent")
        model = CACHE.vae(vae)
        kind = latent.get("kind")
        if kind and kind != model.kind:
            raise ValueError(f"vae: this latent belongs to the {kind} VAE but {vae.path} is a {model.kind} VAE "
                             f"({'video models use HunyuanVideo' if kind == 'hunyuan' else 'Lite T2I/I2I use Flux'})")
        model.set_tiling(tiling, spatial_tile, spatial_overlap, temporal_chunk, temporal_overlap)
        task = get_task(latent["task"]) if latent.get("task") else None
        try:
            frames = decode(model, task, samples, progress=comfy.progress_bar(1), should_stop=comfy.should_stop)
        except InterruptedError as e:
            raise comfy.interrupted(e) from e
        return (video_to_images(frames),)


NODE_CLASS_MAPPINGS = {"K5VAEEncode": K5VAEEncode, "K5VAEDecode": K5VAEDecode}
NODE_DISPLAY_NAME_MAPPINGS = {"K5VAEEncode": "K5 VAE Encode", "K5VAEDecode": "K5 VAE Decode"}
