"""Save Video node: IMAGE frames -> an mp4 in ComfyUI's output folder (k5core.media, PyAV), shown in
the node. Any other IMAGE saver works with K5 VAE Decode's frames too."""
from __future__ import annotations

import json

import torch

from k5core.media import write_video

from . import comfy


class K5SaveVideo:
    DESCRIPTION = ("Save frames as an H.264 mp4 (PyAV; MPEG-4 when this PyAV has no libx264) in the output "
                   "folder, with the workflow in its metadata, and show it in the node.")
    CATEGORY = comfy.CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE",),
            "filename_prefix": ("STRING", {"default": "Kandinsky5/video"}),
            "fps": ("FLOAT", {"default": 24.0, "min": 1.0, "max": 240.0, "step": 1.0}),
            "crf": ("INT", {"default": 18, "min": 0, "max": 51, "tooltip": "H.264 quality: lower is better and larger"}),
        }, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def save(self, images, filename_prefix, fps, crf, prompt=None, extra_pnginfo=None):
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images: expected frames (N, H, W, 3) with N >= 1, got {got}")
        path, subfolder = comfy.save_path(filename_prefix, ".mp4", images.shape[2], images.shape[1])
        metadata = {"prompt": json.dumps(prompt)} if prompt is not None else {}
        metadata.update({k: json.dumps(v) for k, v in (extra_pnginfo or {}).items()})
        write_video(images[..., :3], path, fps=fps, crf=crf, metadata=metadata)
        preview = {"filename": path.name, "subfolder": subfolder, "type": "output"}
        return {"ui": {"images": [preview], "animated": (True,)}, "result": (str(path),)}


NODE_CLASS_MAPPINGS = {"K5SaveVideo": K5SaveVideo}
NODE_DISPLAY_NAME_MAPPINGS = {"K5SaveVideo": "K5 Save Video"}
