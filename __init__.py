"""ComfyUI entry point of the Kandinsky 5 pack: node mappings and the web extension folder.

The pack folder goes on sys.path so `k5core` and `trainer` have one import name everywhere:
in ComfyUI, in the trainer subprocess (`python -m trainer` run from this folder) and in the tests.
"""
import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    sys.path.insert(0, _PACK_DIR)

try:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError as e:  # imported as a plain module, outside a package
    if "attempted relative import" not in str(e):
        raise
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = "./web"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
