"""LoRA Loader node: adds a LoRA to a K5_MODEL handle; chain several. Applied (and removed again)
on the cached DiT by k5core.lora just before sampling; unmerged on fp8 models."""
from __future__ import annotations

import os
from pathlib import Path

from . import comfy
from .cache import LORA_MODES, LoraSpec, ModelHandle

NONE = "none"


def lora_file(value) -> Path:
    """A K5_LORA value (a path, or an object with `.path`, as the Train node returns) as a checked path."""
    path = getattr(value, "path", value)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"lora: expected a LoRA file path (K5_LORA), got {type(value).__name__}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"lora: {path} does not exist (has the training saved it yet?)")
    return path


class K5LoRALoader:
    DESCRIPTION = ("Add a LoRA (kohya/musubi, diffusers/PEFT or ComfyUI keys) to a Kandinsky 5 model; chain "
                   "several. auto merges into bf16/fp16 weights and applies unmerged on fp8 weights.")
    CATEGORY = comfy.CATEGORY
    RETURN_TYPES = ("K5_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("K5_MODEL",),
            "lora_name": ([NONE] + comfy.model_names("loras"), {"tooltip": "LoRA file in models/loras"}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}),
            "mode": (list(LORA_MODES), {"default": "auto", "tooltip":
                     "merge: add into the weights (fast sampling); unmerged: run beside them (any dtype, "
                     "strength changes are free); auto: merge unless the weights are fp8"}),
        }, "optional": {
            "lora": ("K5_LORA", {"tooltip": "a LoRA file from another node (e.g. K5 Train LoRA); "
                                 "used instead of lora_name"}),
        }}

    def apply(self, model: ModelHandle, lora_name, strength, mode, lora=None):
        if mode not in LORA_MODES:
            raise ValueError(f"mode: expected one of {', '.join(LORA_MODES)}, got {mode!r}")
        if lora is not None:
            path = lora_file(lora)
        elif lora_name == NONE:
            return (model,)
        else:
            path = comfy.model_path("loras", lora_name)
        if strength == 0:
            return (model,)
        return (model.with_lora(LoraSpec(str(path), float(strength), mode)),)


NODE_CLASS_MAPPINGS = {"K5LoRALoader": K5LoRALoader}
NODE_DISPLAY_NAME_MAPPINGS = {"K5LoRALoader": "K5 LoRA Loader"}
