"""The one place that talks to ComfyUI: model folders, output folder, progress, cancel, memory, events.

Every function works in two worlds:
- inside ComfyUI it uses `folder_paths`, `comfy.utils`, `comfy.model_management`, `latent_preview`
  and `server`. ComfyUI imports all of them before it loads any custom node, so they are looked up in
  `sys.modules` at call time and never imported here (importing them outside ComfyUI could pick up an
  unrelated module of the same name, e.g. another package's `server`);
- outside ComfyUI (tests, scripts) it falls back to plain paths: model folders under `$K5_MODELS_DIR`
  (subfolders diffusion_models, vae, text_encoders, loras) and outputs under `$K5_OUTPUT_DIR`
  (default ./output); progress, cancel and events are no-ops.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Callable

log = logging.getLogger("k5.nodes")

CATEGORY = "Kandinsky 5"          # the node menu entry of every node of the pack

FOLDERS = ("diffusion_models", "vae", "text_encoders", "loras")
MODELS_ENV = "K5_MODELS_DIR"
OUTPUT_ENV = "K5_OUTPUT_DIR"
WEIGHT_SUFFIXES = (".safetensors", ".sft", ".pt", ".pth", ".ckpt", ".bin")
HF_CONFIG = "config.json"          # a folder holding this is one model (Hugging Face / diffusers layout)


def _module(name: str):
    """A ComfyUI module if ComfyUI is running in this process, else None."""
    return sys.modules.get(name)


def in_comfyui() -> bool:
    """True when running inside a ComfyUI server process."""
    fp = _module("folder_paths")
    return fp is not None and hasattr(fp, "get_filename_list")


# ----------------------------------------------------------------------------- model folders
def _check_folder(folder: str) -> None:
    if folder not in FOLDERS:
        raise ValueError(f"unknown model folder {folder!r}; expected one of {', '.join(FOLDERS)}")


def folder_paths_of(folder: str) -> list[Path]:
    """The directories searched for `folder` models: ComfyUI's, or $K5_MODELS_DIR/<folder>."""
    _check_folder(folder)
    if in_comfyui():
        return [Path(p) for p in _module("folder_paths").get_folder_paths(folder)]
    root = os.environ.get(MODELS_ENV)
    return [Path(root) / folder] if root else []


def _hf_folders(base: Path) -> list[Path]:
    """Sub-folders of `base` that hold a config.json (one model each), at most two levels deep."""
    found = []
    if not base.is_dir():
        return found
    for config in sorted(base.glob(f"*/{HF_CONFIG}")) + sorted(base.glob(f"*/*/{HF_CONFIG}")):
        folder = config.parent
        if not any(p in found for p in folder.parents):
            found.append(folder)
    return found


def _weight_files(base: Path) -> list[Path]:
    if not base.is_dir():
        return []
    return sorted(p for p in base.rglob("*") if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES)


def model_names(folder: str, folders: bool = False) -> list[str]:
    """Names a loader's dropdown shows: weight files (relative paths, as ComfyUI names them) and, with
    `folders=True`, Hugging Face / diffusers model folders (a sub-folder holding config.json).
    Files inside such a folder (its shards) are not listed on their own."""
    bases = folder_paths_of(folder)
    hf = {base: _hf_folders(base) if folders else [] for base in bases}
    names = [f.relative_to(base).as_posix() for base, found in hf.items() for f in found]
    if in_comfyui():
        files = list(_module("folder_paths").get_filename_list(folder))
    else:
        files = [p.relative_to(base).as_posix() for base in bases for p in _weight_files(base)]

    def in_model_folder(name: str) -> bool:
        return any(f in (base / name).parents for base, found in hf.items() for f in found)
    names += [n for n in files if not in_model_folder(n)]
    return sorted(dict.fromkeys(names), key=str.lower)


def model_path(folder: str, name: str) -> Path:
    """The full path of a dropdown name (file or model folder), or FileNotFoundError saying where we looked."""
    if not name or name == "none":
        raise FileNotFoundError(f"{folder}: no model selected; put a model file into the '{folder}' "
                                f"folder and pick it")
    bases = folder_paths_of(folder)
    if in_comfyui():
        full = _module("folder_paths").get_full_path(folder, name)
        if full:
            return Path(full)
    for base in bases:
        base = Path(os.path.abspath(base))
        candidate = Path(os.path.abspath(base / name))   # not resolved: symlinked model files are fine
        if base in candidate.parents and candidate.exists():
            return candidate
    where = ", ".join(str(b) for b in bases) or f"nowhere (ComfyUI absent and ${MODELS_ENV} unset)"
    raise FileNotFoundError(f"{folder}: model {name!r} not found; looked in {where}")


def comfy_root() -> Path | None:
    """The ComfyUI code folder (holds comfy/sd1_tokenizer and comfy/text_encoders/qwen25_tokenizer)."""
    fp = _module("folder_paths")
    if fp is None:
        return None
    where = getattr(fp, "__file__", None)
    return Path(where).resolve().parent if where else Path(fp.base_path)


# ----------------------------------------------------------------------------- outputs
def output_dir() -> Path:
    """ComfyUI's output folder, else $K5_OUTPUT_DIR, else ./output."""
    if in_comfyui():
        return Path(_module("folder_paths").get_output_directory())
    return Path(os.environ.get(OUTPUT_ENV) or "output").resolve()


def save_path(filename_prefix: str, suffix: str, width: int = 0, height: int = 0) -> tuple[Path, str]:
    """(full path of a new numbered file `<prefix>_00001_<suffix>`, subfolder relative to the output
    folder), numbered after the files already there, as ComfyUI's savers do."""
    out = output_dir()
    if in_comfyui():
        folder, name, counter, subfolder, _ = _module("folder_paths").get_save_image_path(
            filename_prefix, str(out), width, height)
        return Path(folder) / f"{name}_{counter:05}_{suffix}", subfolder
    prefix = Path(os.path.normpath(filename_prefix))
    folder = (out / prefix.parent).resolve()
    if folder != out and out not in folder.parents:
        raise ValueError(f"filename_prefix: {filename_prefix!r} points outside the output folder {out}")
    folder.mkdir(parents=True, exist_ok=True)
    taken = [p.name[len(prefix.name) + 1:].split("_")[0] for p in folder.glob(f"{prefix.name}_*")]
    counter = max((int(t) for t in taken if t.isdigit()), default=0) + 1
    subfolder = "" if str(prefix.parent) == "." else prefix.parent.as_posix()
    return folder / f"{prefix.name}_{counter:05}_{suffix}", subfolder


# ----------------------------------------------------------------------------- devices and memory
def torch_device():
    """ComfyUI's compute device (honours --cpu), else CUDA when available, else the CPU."""
    import torch

    mm = _module("comfy.model_management")
    if mm is not None:
        return mm.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def free_comfy_models() -> None:
    """Unload all of ComfyUI's own models and empty the CUDA cache. Calls the original unload
    function, not our hook, so our own cache stays."""
    mm = _module("comfy.model_management")
    if mm is None:
        return
    unload = getattr(mm.unload_all_models, "__k5_original__", mm.unload_all_models)
    unload()
    mm.soft_empty_cache()


def free_comfy_memory(needed_bytes: int, device) -> None:
    """Before one of our models loads on a GPU: let ComfyUI unload as many of its own models as it
    takes to leave `needed_bytes` (plus its inference reserve) free on `device`."""
    mm = _module("comfy.model_management")
    if mm is None or getattr(device, "type", "cpu") == "cpu":
        return
    mm.free_memory(needed_bytes + mm.minimum_inference_memory(), device)


def empty_cache() -> None:
    """Return cached CUDA memory (ComfyUI's way when present)."""
    import gc

    import torch

    gc.collect()
    mm = _module("comfy.model_management")
    if mm is not None:
        mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


_unload_callbacks: list[Callable[[], None]] = []


def on_unload_request(callback: Callable[[], None]) -> bool:
    """Call `callback` whenever ComfyUI unloads all models. Hooked: `comfy.model_management.
    unload_all_models`, which ComfyUI calls for POST /free (the "Unload models" / "Free model and node
    cache" buttons), after an out-of-memory error, and which other custom nodes call to free VRAM.
    Returns True when the hook is installed (False outside ComfyUI)."""
    if callback not in _unload_callbacks:
        _unload_callbacks.append(callback)
    mm = _module("comfy.model_management")
    if mm is None:
        return False
    if not hasattr(mm.unload_all_models, "__k5_original__"):
        original = mm.unload_all_models

        def unload_all_models(*args, **kwargs):
            for cb in list(_unload_callbacks):
                try:
                    cb()
                except Exception:  # never break ComfyUI's own unload
                    log.exception("Kandinsky 5: freeing cached models failed")
            return original(*args, **kwargs)

        unload_all_models.__k5_original__ = original
        unload_all_models.__doc__ = original.__doc__
        mm.unload_all_models = unload_all_models
    return True


# ----------------------------------------------------------------------------- progress and cancel
def should_stop() -> bool:
    """True once the user pressed Cancel in ComfyUI (k5core's `should_stop()` hook)."""
    mm = _module("comfy.model_management")
    return bool(mm is not None and mm.processing_interrupted())


def interrupted(error: BaseException) -> BaseException:
    """What to raise for a k5core cancel (InterruptedError): ComfyUI's interrupt exception when the
    user cancelled in ComfyUI (so the queue shows "interrupted", not an error), else the error itself."""
    mm = _module("comfy.model_management")
    if mm is not None and mm.processing_interrupted():
        mm.interrupt_current_processing(False)
        return mm.InterruptProcessingException()
    return error


def latent_previewer(kind: str) -> Callable | None:
    """x0 latent (B, 16, T, h, w) -> a preview image for ComfyUI's progress bar, using ComfyUI's own
    previewer (latent-to-RGB factors or TAE per --preview-method) for the VAE `kind` ("hunyuan" or
    "flux"); None when previews are off or ComfyUI is absent."""
    lp, formats, mm = _module("latent_preview"), _module("comfy.latent_formats"), _module("comfy.model_management")
    if lp is None or formats is None or mm is None:
        return None
    fmt = {"hunyuan": "HunyuanVideo", "flux": "Flux"}.get(kind)
    if fmt is None or not hasattr(formats, fmt):
        return None
    try:
        previewer = lp.get_previewer(mm.get_torch_device(), getattr(formats, fmt)())
    except Exception:  # a preview must never fail a run
        log.exception("Kandinsky 5: no latent preview")
        return None
    if previewer is None:
        return None
    return lambda x0: previewer.decode_latent_to_preview_image("JPEG", x0)


def progress_bar(total: int, preview: Callable | None = None) -> Callable[[int, int, object], None]:
    """A k5core progress callback `(step, total, info)` that drives ComfyUI's progress bar; when
    `preview` is given and `info` carries an x0 latent, the bar shows its preview image."""
    utils = _module("comfy.utils")
    bar = utils.ProgressBar(total) if utils is not None else None

    def progress(step: int, total: int, info=None) -> None:
        if bar is None:
            return
        image = None
        x0 = getattr(info, "x0", None)
        if preview is not None and x0 is not None:
            try:
                image = preview(x0)
            except Exception:
                log.exception("Kandinsky 5: latent preview failed")
        bar.update_absolute(step, total, image)
    return progress


# ----------------------------------------------------------------------------- events
def prompt_server():
    """ComfyUI's running PromptServer instance, or None outside ComfyUI."""
    return getattr(getattr(_module("server"), "PromptServer", None), "instance", None)


def send_event(name: str, data: dict, sid: str | None = None) -> bool:
    """Push a websocket message to the browser (`api.addEventListener(name, ...)` in the frontend).
    Returns False when there is no server (outside ComfyUI)."""
    instance = prompt_server()
    if instance is None:
        return False
    instance.send_sync(name, data, sid)
    return True
