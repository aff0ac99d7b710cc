"""Tiny random DiTs written as real checkpoint files (official, ComfyUI and diffusers layouts)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..files import save_safetensors
from ..loading import build_dit
from ..tasks import get_task


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Fill every parameter with seeded noise (zero-initialised modulation would hide the blocks);
    norm weights stay near 1 so activations keep their scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1.0 + noise * 0.5 if name.endswith("norm.weight") else noise / max(1, p.shape[-1]) ** 0.5 * 4)
    return model


def tiny_state_dict(task: str = "k5-tiny-t2v", seed: int = 0) -> dict[str, torch.Tensor]:
    """Official-layout state dict of a tiny random DiT."""
    return randomize_(build_dit(get_task(task)), seed).state_dict()


def write_tiny_dit(out_dir, task: str = "k5-tiny-t2v", seed: int = 0, layout: str = "official",
                   dtype=torch.float32) -> Path:
    """Write a tiny random DiT: layout "official" (one safetensors), "comfy" (model.diffusion_model.
    prefix), "diffusers" (folder with config.json) or "pt" (weights-only torch file)."""
    out_dir = Path(out_dir)
    sd = {k: v.to(dtype) for k, v in tiny_state_dict(task, seed).items()}
    stem = f"{task}-s{seed}"
    if layout == "official":
        return save_safetensors(sd, out_dir / f"{stem}.safetensors", {"task": task})
    if layout == "comfy":
        sd = {f"model.diffusion_model.{k}": v for k, v in sd.items()}
        return save_safetensors(sd, out_dir / f"{stem}-comfy.safetensors")
    if layout == "pt":
        path = out_dir / f"{stem}.pt"
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(sd, path)
        return path
    if layout == "diffusers":
        folder = out_dir / f"{stem}-diffusers"
        save_safetensors(sd, folder / "diffusion_pytorch_model.safetensors")
        (folder / "config.json").write_text(json.dumps(diffusers_config(task)))
        return folder
    raise ValueError(f"unknown layout {layout!r}")


def diffusers_config(task: str) -> dict:
    """config.json of diffusers' Kandinsky5Transformer3DModel for a task's DiT."""
    p = get_task(task).dit
    return {"_class_name": "Kandinsky5Transformer3DModel", "in_visual_dim": p.in_visual_dim,
            "out_visual_dim": p.out_visual_dim, "in_text_dim": p.in_text_dim,
            "in_text_dim2": p.in_text_dim2, "time_dim": p.time_dim, "patch_size": list(p.patch_size),
            "model_dim": p.model_dim, "ff_dim": p.ff_dim, "num_text_blocks": p.num_text_blocks,
            "num_visual_blocks": p.num_visual_blocks, "axes_dims": list(p.axes_dims),
            "visual_cond": p.visual_cond or p.instruct_type == "channel"}
