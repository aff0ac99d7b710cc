"""Load a Kandinsky 5 DiT from the files users have, with one copy of the weights in RAM.

Reads safetensors files, diffusers folders (config.json + one or sharded safetensors) and `.pt`
files (only with `weights_only=True`). Key layouts: official (= diffusers' Kandinsky5Transformer3DModel)
and ComfyUI's `model.diffusion_model.` prefix; fp8 weights with scales (ComfyUI scaled fp8, musubi-tuner)
and quantize-on-load go through k5core.fp8.Fp8Plan. The model is built on the meta device and filled with
`load_state_dict(assign=True)`, tensor by tensor, so peak RAM stays near one copy of the weights.
The task is inferred from tensor shapes (and the file name, where shapes are shared) when not given.
"""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open

from .dit import K5DiT
from .files import read_safetensors_header
from .fp8 import Fp8Plan
from .fp8 import granularity as fp8_granularity
from .tasks import TASKS, DiTParams, Task, get_task

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.")
ANCHOR = "text_embeddings.in_layer.weight"  # present in every Kandinsky 5 DiT
NOT_A_DIT = {  # key fragments of other model files users pass by mistake
    "a VAE": ("encoder.down", "decoder.up", "encoder.conv_in", "quant_conv"),
    "a text encoder": ("embed_tokens", "text_model.", "model.layers.", "visual.blocks", "lm_head"),
}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with the file named in the message."""


# ----------------------------------------------------------------------------- reading
def checkpoint_files(path: Path) -> list[Path]:
    """The weight files behind a path: the file itself, or a diffusers folder's shards."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        return [path]
    index = sorted(path.glob("*.safetensors.index.json"))
    if index:
        shards = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: folder holds no .safetensors weights (expected a diffusers "
                              f"transformer folder with diffusion_pytorch_model*.safetensors)")
    return files


def read_shapes(files: list[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Key -> (shape, dtype) of every tensor, reading only headers (safetensors) or mmap (.pt)."""
    shapes = {}
    for f in files:
        if f.suffix == ".safetensors":
            header, _ = read_safetensors_header(f)
            shapes.update({k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items()})
        else:
            shapes.update({k: (tuple(t.shape), str(t.dtype)) for k, t in _torch_load(f).items()})
    return shapes


def _torch_load(f: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"{f}: not a loadable checkpoint (safetensors or weights-only torch "
                              f"file expected): {type(e).__name__}: {e}") from None
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict):
        raise CheckpointError(f"{f}: holds a {type(sd).__name__}, not a state dict")
    return sd


def iter_tensors(files: list[Path]):
    """Yield (key, tensor) one tensor at a time so conversions never hold two full copies."""
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(f, framework="pt", device="cpu") as sf:
                for k in sf.keys():
                    yield k, sf.get_tensor(k)
        else:
            yield from _torch_load(f).items()


# ----------------------------------------------------------------------------- layout
def detect_prefix(keys, where: str) -> str:
    """Find the key prefix (official: none, ComfyUI: `model.diffusion_model.`) or explain the file."""
    for prefix in ("", *PREFIXES):
        if prefix + ANCHOR in keys:
            return prefix
    for what, fragments in NOT_A_DIT.items():
        if any(frag in k for k in keys for frag in fragments):
            raise CheckpointError(f"{where}: this looks like {what}, not a Kandinsky 5 DiT "
                                  f"(no '{ANCHOR}' key); put it in the matching loader")
    sample = ", ".join(sorted(keys)[:5]) or "(no tensors)"
    raise CheckpointError(f"{where}: unknown key layout, not a Kandinsky 5 DiT (no '{ANCHOR}'; "
                          f"first keys: {sample})")


def dit_params_from_shapes(shapes: dict, prefix: str, where: str) -> DiTParams:
    """Rebuild the DiT's constructor arguments from tensor shapes (axes_dims from the head size)."""
    def shape(key):
        try:
            return shapes[prefix + key][0]
        except KeyError:
            raise CheckpointError(f"{where}: missing tensor '{prefix + key}'") from None

    model_dim, text_dim = shape("text_embeddings.in_layer.weight")
    time_dim, pooled_dim = shape("pooled_text_embeddings.in_layer.weight")
    head_dim = shape("visual_transformer_blocks.0.self_attention.query_norm.weight")[0]
    patch_in = shape("visual_embeddings.in_layer.weight")[1]
    out_dim = shape("out_layer.out_layer.weight")[0] // 4
    visual_in = patch_in // 4  # patch (1, 2, 2)
    in_visual_dim = out_dim
    axes = {16: (8, 4, 4), 64: (16, 24, 24), 128: (32, 48, 48)}.get(head_dim)
    if axes is None:
        raise CheckpointError(f"{where}: head size {head_dim} matches no Kandinsky 5 model (64 or 128)")
    return DiTParams(
        model_dim=model_dim, ff_dim=shape("visual_transformer_blocks.0.feed_forward.in_layer.weight")[0],
        num_text_blocks=_count(shapes, prefix + "text_transformer_blocks."),
        num_visual_blocks=_count(shapes, prefix + "visual_transformer_blocks."),
        axes_dims=axes, time_dim=time_dim, in_visual_dim=in_visual_dim, out_visual_dim=out_dim,
        in_text_dim=text_dim, in_text_dim2=pooled_dim, visual_cond=visual_in == 2 * in_visual_dim + 1)


def _count(shapes, prefix: str) -> int:
    ids = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def infer_task(params: DiTParams, path: Path) -> Task:
    """The task of a checkpoint: shapes choose the model family, the file name picks among tasks
    sharing one DiT (t2v/i2v, 5s/10s, distil/nocfg/pretrain, sd/hd); default the first listed."""
    candidates = [t for t in TASKS.values() if _same_shapes(t.dit, params)]
    if not candidates:
        raise CheckpointError(
            f"{path}: tensor shapes match no Kandinsky 5 task (model_dim {params.model_dim}, "
            f"{params.num_text_blocks}+{params.num_visual_blocks} blocks, text dim {params.in_text_dim}, "
            f"visual input {params.visual_embed_dim} channels)")
    name = _name_for_task(path)
    for tokens in (("i2v",), ("i2i",), ("10s",), ("distil",), ("nocfg",), ("pretrain",), ("hd",)):
        narrowed = [t for t in candidates if all(tok in t.name for tok in tokens)]
        if narrowed and all(tok in name for tok in tokens):
            candidates = narrowed
    plain = [t for t in candidates if t.variant in ("sft", "tiny")]
    return (plain or candidates)[0]


def _name_for_task(path: Path) -> str:
    """The name that tells tasks apart: the file name, or for a diffusers `transformer` folder its
    repository folder too (e.g. Kandinsky-5.0-I2V-Lite-5s-Diffusers/transformer)."""
    parts = [path.parent.name, path.name] if path.is_dir() else [path.name]
    return "/".join(parts).lower()


def _same_shapes(a: DiTParams, b: DiTParams) -> bool:
    """Equal tensor shapes; `instruct_type` channel and visual_cond both mean 33 input channels."""
    return replace(a, visual_cond=False, instruct_type=None) == replace(b, visual_cond=False, instruct_type=None) \
        and a.visual_embed_dim == b.visual_embed_dim


def check_task_fits(task: Task, params: DiTParams, path: Path) -> None:
    """Refuse a checkpoint whose shapes belong to another task, naming both."""
    if _same_shapes(task.dit, params):
        return
    found = infer_task(params, path).name if any(_same_shapes(t.dit, params) for t in TASKS.values()) \
        else "no known task"
    raise CheckpointError(
        f"{path}: shapes do not fit task {task.name} (file: model_dim {params.model_dim}, "
        f"{params.num_visual_blocks} visual blocks, {params.visual_embed_dim} input channels; task expects "
        f"{task.dit.model_dim}, {task.dit.num_visual_blocks}, {task.dit.visual_embed_dim}); the file "
        f"looks like {found}")


# ----------------------------------------------------------------------------- build
def build_dit(task: Task, dtype=None, device="cpu", attention: str = "sdpa") -> K5DiT:
    """A randomly initialised DiT for a task (tests, demo); use load_dit for real weights."""
    model = K5DiT(task.dit, task.attention, backend=attention)
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


def inspect_dit(path, task: str | Task | None = None) -> Task:
    """The task of a DiT file from tensor shapes and file name, reading headers only; a given task
    is checked against the shapes. Raises CheckpointError naming the file."""
    path = Path(path)
    shapes = read_shapes(checkpoint_files(path))
    return _task_from_shapes(shapes, detect_prefix(shapes.keys(), str(path)), path, task)


def _task_from_shapes(shapes: dict, prefix: str, path: Path, task: str | Task | None) -> Task:
    params = dit_params_from_shapes(shapes, prefix, str(path))
    if task is None:
        return infer_task(params, path)
    task = get_task(task) if isinstance(task, str) else task
    check_task_fits(task, params, path)
    return task


def load_dit(path, task: str | Task | None = None, dtype=None, device="cpu", fp8=None,
             attention: str = "sdpa") -> K5DiT:
    """Load a DiT checkpoint; `task` is inferred from shapes when None. `dtype` None keeps the
    file's floating dtype; `fp8` ("e4m3fn" / "e4m3fn_scaled") stores block Linear weights in fp8
    (k5core.fp8). Pre-quantized files (ComfyUI scaled fp8, musubi-tuner) load as they are."""
    if fp8 is not None:
        fp8_granularity(fp8)
    path = Path(path)
    files = checkpoint_files(path)
    shapes = read_shapes(files)
    prefix = detect_prefix(shapes.keys(), str(path))
    task = _task_from_shapes(shapes, prefix, path, task)
    try:
        plan = Fp8Plan({k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}, fp8, str(path))
        with torch.device("meta"):
            model = K5DiT(task.dit, task.attention, backend=attention)
        plan.apply(model)
        tensors = ((k[len(prefix):], t) for k, t in iter_tensors(files) if k.startswith(prefix))
        state = dict(plan.convert(tensors, dtype, device))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    _check_keys(model, state, path)
    model.load_state_dict(state, strict=True, assign=True)
    model.task = task
    model.source = str(path)
    return model


def _check_keys(model: K5DiT, state: dict, path: Path) -> None:
    expected = set(model.state_dict().keys())
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: keys do not match the Kandinsky 5 DiT ({len(missing)} missing, e.g. "
            f"{missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]})")
    for k, v in model.state_dict().items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{path}: tensor '{k}' has shape {tuple(state[k].shape)}, "
                                  f"expected {tuple(v.shape)}")
