"""Fixtures shared by the test modules."""
from __future__ import annotations

import os
import sys
import types

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models are all per-op overhead: one thread is faster and spares a shared CPU; the
    trainer and CLI subprocesses inherit OMP_NUM_THREADS."""
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    """A miniature ComfyUI models folder with every tiny model file (written once per session)."""
    from node_harness import tiny_models
    return tiny_models(tmp_path_factory.getbasetemp() / "k5-tiny-models")


@pytest.fixture
def fake_comfyui(monkeypatch):
    """comfy.model_management and comfy.utils as ComfyUI has them, recording what the nodes do."""
    from nodes import comfy
    state = types.SimpleNamespace(interrupt_after=None, steps=[], unloads=0, interrupted=False)
    mm = types.ModuleType("comfy.model_management")

    class InterruptProcessingException(Exception):
        pass

    def processing_interrupted():
        return state.interrupted

    def interrupt_current_processing(value=True):
        state.interrupted = value

    def unload_all_models():
        state.unloads += 1

    mm.InterruptProcessingException = InterruptProcessingException
    mm.processing_interrupted = processing_interrupted
    mm.interrupt_current_processing = interrupt_current_processing
    mm.throw_exception_if_processing_interrupted = lambda: None
    mm.unload_all_models = unload_all_models
    mm.soft_empty_cache = lambda force=False: None
    mm.minimum_inference_memory = lambda: 1000
    mm.free_memory = lambda memory_required, device, keep_loaded=(): state.freed.append((memory_required, device))
    state.freed = []
    mm.get_torch_device = lambda: torch.device("cpu")
    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            state.steps.append((value, total))
            if state.interrupt_after is not None and value >= state.interrupt_after:
                state.interrupted = True     # the user presses Cancel during this step

    utils.ProgressBar = ProgressBar
    formats = types.ModuleType("comfy.latent_formats")
    formats.HunyuanVideo = type("HunyuanVideo", (), {})
    formats.Flux = type("Flux", (), {})
    previews = types.ModuleType("latent_preview")

    class Previewer:
        def __init__(self, fmt):
            self.fmt = fmt

        def decode_latent_to_preview_image(self, preview_format, x0):
            state.previews.append((self.fmt, tuple(x0.shape)))
            return ("JPEG", "image", 512)

    previews.get_previewer = lambda device, latent_format: Previewer(type(latent_format).__name__)
    state.previews = []
    monkeypatch.setitem(sys.modules, "comfy.latent_formats", formats)
    monkeypatch.setitem(sys.modules, "latent_preview", previews)
    monkeypatch.setitem(sys.modules, "comfy", types.ModuleType("comfy"))
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    monkeypatch.setitem(sys.modules, "comfy.utils", utils)
    monkeypatch.setattr(comfy, "_unload_callbacks", [])
    return types.SimpleNamespace(state=state, mm=mm)
