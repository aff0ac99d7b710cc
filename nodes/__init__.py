"""ComfyUI node classes of the pack (thin adapters over k5core), merged from one module per family.

An import error in any family is not swallowed, so ComfyUI's log names the real cause instead of
silently losing nodes.
"""
import importlib

from . import cache, comfy

FAMILIES = ["loaders", "lora", "encode", "sample", "vae", "video", "train"]

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _family in FAMILIES:
    _module = importlib.import_module(f".{_family}", __name__)
    _twice = NODE_CLASS_MAPPINGS.keys() & _module.NODE_CLASS_MAPPINGS.keys()
    if _twice:
        raise RuntimeError(f"nodes/{_family}.py defines node types already defined elsewhere: {sorted(_twice)}")
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(_module, "NODE_DISPLAY_NAME_MAPPINGS", {}))

comfy.on_unload_request(cache.CACHE.clear)   # ComfyUI's "unload models" also frees ours (no-op outside ComfyUI)
