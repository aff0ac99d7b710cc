"""How ComfyUI calls our nodes, for the node, workflow and training-node tests.

`call(node, **inputs)` is what ComfyUI's executor does for one node: check the inputs against
INPUT_TYPES (required present, nothing unknown, combo values listed, numbers in range, own socket
types carrying the right objects), call FUNCTION, and check the outputs against RETURN_TYPES.
`tiny_models(root)` writes a miniature ComfyUI install (tokenizers + model folders) of tiny files.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

import nodes
from nodes.cache import ModelHandle, TextEncoderHandle, VAEHandle
from nodes.encode import Embeds
from nodes.train import Dataset

MAPPINGS = nodes.NODE_CLASS_MAPPINGS
SIZE = dict(width=32, height=32)          # the smallest size the tiny tasks take: fast
STEPS = 2
TINY = {  # dropdown names of the tiny files under <root>/models
    "t2v": "k5-tiny-t2v-s0.safetensors", "i2v": "k5-tiny-i2v-s0.safetensors", "t2i": "k5-tiny-t2i-s0.safetensors",
    "qwen": "qwen_2.5_vl_7b_tiny.safetensors", "clip": "clip_l_tiny.safetensors", "clip_folder": "clip-vit-tiny",
    "hunyuan": "hunyuan_video_vae_tiny.safetensors", "flux": "ae_tiny.safetensors", "lora": "tiny_t2v_lora.safetensors",
}


# ----------------------------------------------------------------------------- tiny model folders
def tiny_models(root: Path) -> Path:
    """Write every tiny model once into `root` (a miniature ComfyUI install: comfy/<tokenizers> and
    models/<folders>); returns the models folder. Later calls reuse the files."""
    models, done = root / "models", root / "models.done"
    if not done.exists():
        _write_tiny_models(root, models)
        done.write_text("ok")
    return models


def _write_tiny_models(root: Path, models: Path) -> None:
    from k5core.lora import LoRANetwork
    from k5core.loading import load_dit
    from k5core.tiny.dit import write_tiny_dit
    from k5core.tiny.text import make_tiny_text_encoders
    from k5core.tiny.vae import make_tiny_flux_vae, make_tiny_hunyuan_vae

    text = make_tiny_text_encoders(root)
    shutil.copytree(text["clip_folder"], models / "text_encoders" / TINY["clip_folder"])
    for task in ("k5-tiny-t2v", "k5-tiny-i2v", "k5-tiny-t2i"):
        write_tiny_dit(models / "diffusion_models", task)
    make_tiny_hunyuan_vae(models / "vae")
    make_tiny_flux_vae(models / "vae")
    net = LoRANetwork(load_dit(models / "diffusion_models" / TINY["t2v"]), rank=4, alpha=4)
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        for a in net.adapters().values():
            a.lora_up.weight.copy_(torch.randn(a.lora_up.weight.shape, generator=g) * 0.5)
    net.save(models / "loras" / TINY["lora"])



# ----------------------------------------------------------------------------- calling nodes
def is_image(v) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape[-1] == 3 and v.dtype == torch.float32 \
        and float(v.min()) >= 0.0 and float(v.max()) <= 1.0


def is_latent(v) -> bool:
    s = v.get("samples") if isinstance(v, dict) else None
    return isinstance(s, torch.Tensor) and s.dim() == 5 and s.shape[1] == 16 and v.get("kind") in ("hunyuan", "flux")


SOCKETS = {
    "K5_MODEL": lambda v: isinstance(v, ModelHandle),
    "K5_TEXT_ENCODER": lambda v: isinstance(v, TextEncoderHandle),
    "K5_VAE": lambda v: isinstance(v, VAEHandle),
    "K5_EMBEDS": lambda v: isinstance(v, Embeds),
    "K5_LATENT": is_latent,
    "K5_LORA": lambda v: isinstance(v, (str, Path)),
    "K5_DATASET": lambda v: isinstance(v, Dataset),
    "IMAGE": is_image,
    "STRING": lambda v: isinstance(v, str),
    "INT": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "FLOAT": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "BOOLEAN": lambda v: isinstance(v, bool),
}


def check_inputs(cls, inputs: dict) -> None:
    """Validate inputs as ComfyUI does before it runs a node (plus the socket object types)."""
    spec = cls.INPUT_TYPES()
    required, optional, hidden = spec.get("required", {}), spec.get("optional", {}), spec.get("hidden", {})
    missing = required.keys() - inputs.keys()
    unknown = inputs.keys() - required.keys() - optional.keys() - hidden.keys()
    assert not missing, f"{cls.__name__}: missing inputs {sorted(missing)}"
    assert not unknown, f"{cls.__name__}: unknown inputs {sorted(unknown)}"
    for name, value in inputs.items():
        if name in hidden:
            continue
        kind, opts = ((required.get(name) or optional.get(name)) + ({},))[:2]
        if isinstance(kind, list):
            assert value in kind, f"{cls.__name__}.{name}: {value!r} is not one of {kind}"
            continue
        assert SOCKETS[kind](value), f"{cls.__name__}.{name}: {type(value).__name__} is not a {kind}"
        if kind in ("INT", "FLOAT"):
            assert opts.get("min", -math.inf) <= value <= opts.get("max", math.inf), \
                f"{cls.__name__}.{name}: {value} outside [{opts.get('min')}, {opts.get('max')}]"


def call(node: str, **inputs):
    """Run one node as ComfyUI would; returns its outputs (a tuple), checked against RETURN_TYPES."""
    cls = MAPPINGS[node]
    check_inputs(cls, inputs)
    out = getattr(cls(), cls.FUNCTION)(**inputs)
    if isinstance(out, dict):
        assert cls.OUTPUT_NODE and "ui" in out, f"{node}: a dict result must be an output node's ui"
        out = out.get("result", ())
    assert isinstance(out, tuple) and len(out) == len(cls.RETURN_TYPES), f"{node}: returned {type(out).__name__}"
    for value, kind in zip(out, cls.RETURN_TYPES):
        assert SOCKETS[kind](value), f"{node}: output {type(value).__name__} is not a {kind}"
    return out


def loaders(task="t2v", vae="hunyuan", fp8="none"):
    (model,) = call("K5ModelLoader", model_name=TINY[task], task="auto", dtype="auto", fp8=fp8, attention="sdpa")
    (te,) = call("K5TextEncoderLoader", qwen=TINY["qwen"], clip=TINY["clip"], quantization="none",
                 dtype="auto", device="auto")
    (v,) = call("K5VAELoader", vae_name=TINY[vae], dtype="auto")
    return model, te, v


def encode(te, prompt="a red fox runs through snow", content="video", after="offload"):
    return call("K5TextEncode", text_encoder=te, prompt=prompt, negative_prompt="static, blurry",
                content=content, after=after)[0]


def sample(model, embeds, seed=1, frames=5, **kw):
    args = dict(model=model, embeds=embeds, **SIZE, frames=frames, steps=STEPS, guidance=0.0, shift=0.0,
                seed=seed, magcache=False)
    return call("K5Sampler", **{**args, **kw})[0]


def decode(vae, latent):
    return call("K5VAEDecode", vae=vae, latent=latent, tiling=True, spatial_tile=256, spatial_overlap=64,
                temporal_chunk=17, temporal_overlap=4)[0]


