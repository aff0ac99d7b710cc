"""The model objects behind the K5_MODEL, K5_TEXT_ENCODER and K5_VAE sockets.

A socket carries a *handle*: a small frozen description of what to load (file, dtype, fp8, LoRAs,
memory settings), so loader nodes are instant and ComfyUI's own output cache holds no weights. Nodes
that compute ask `CACHE` for the object behind a handle; it is loaded on first use and kept between
queue runs, so a new seed reloads nothing and a prompt already encoded never loads the text encoder.

- One object of each kind stays loaded (the previous one is freed *before* the next loads, so two
  DiTs never share memory).
- One DiT in memory serves every handle on the same file: the LoRAs, block swap and fp8 matmul of the
  handle being sampled are applied to it just before sampling (`activation_offload` is carried for
  the training nodes; inference keeps no activations) (LoRAs are applied and removed through
  k5core.lora, merged weights restored exactly). Asking for fp8 storage of a DiT already loaded in
  high precision converts it in place instead of reading the file again.
- ComfyUI's unload requests free everything here: see `nodes.comfy.on_unload_request` for the hook.
"""
from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from k5core.devices import pick_dtype

from . import comfy

log = logging.getLogger("k5.nodes")

DTYPES = ("auto", "bf16", "fp16", "fp32")   # widget choices, resolved by k5core.devices.pick_dtype
FP8_MODES = ("none", "e4m3fn", "e4m3fn_scaled")
LORA_MODES = {"auto": None, "merge": True, "unmerged": False}   # -> apply_loras(merge=...)
QUANTIZATIONS = ("none", "nf4", "int8")


def resolve_dtype(name: str, device) -> torch.dtype:
    """A dtype widget value on a device: "auto" is float32 on the CPU and bfloat16 on GPUs."""
    if name not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {name!r}")
    return pick_dtype(name, device)


# ----------------------------------------------------------------------------- handles
@dataclass(frozen=True)
class LoraSpec:
    """One LoRA on a K5_MODEL: file, strength, and how to apply it ("auto", "merge", "unmerged")."""
    path: str
    strength: float = 1.0
    mode: str = "auto"


@dataclass(frozen=True)
class ModelHandle:
    """K5_MODEL: which DiT, loaded how, with which LoRAs and memory settings."""
    path: str
    task: str
    dtype: str = "auto"
    fp8: str = "none"
    attention: str = "sdpa"
    blocks_to_swap: int = 0
    activation_offload: bool = False
    fp8_scaled_mm: bool = False
    compile: bool = False
    loras: tuple[LoraSpec, ...] = ()

    @property
    def load_key(self) -> tuple:
        """What the weights in memory depend on (LoRAs and memory settings are applied on top)."""
        return (self.path, self.task, self.dtype, self.fp8, self.attention)

    def with_lora(self, lora: LoraSpec) -> "ModelHandle":
        return replace(self, loras=self.loras + (lora,))

    def with_memory(self, blocks_to_swap: int, activation_offload: bool, fp8: str | None = None,
                    fp8_scaled_mm: bool = False, compile: bool = False) -> "ModelHandle":
        return replace(self, blocks_to_swap=int(blocks_to_swap), activation_offload=bool(activation_offload),
                       fp8=self.fp8 if fp8 in (None, "keep") else fp8, fp8_scaled_mm=bool(fp8_scaled_mm),
                       compile=bool(compile))

    @property
    def task_config(self):
        from k5core.tasks import get_task
        return get_task(self.task)


@dataclass(frozen=True)
class TextEncoderHandle:
    """K5_TEXT_ENCODER: Qwen2.5-VL and CLIP-L files or folders, tokenizers, quantization."""
    qwen: str
    clip: str
    quantization: str = "none"
    dtype: str = "auto"
    device: str = "auto"
    qwen_tokenizer: str = ""
    clip_tokenizer: str = ""
    comfy_root: str = ""


@dataclass(frozen=True)
class VAEHandle:
    """K5_VAE: a HunyuanVideo or Flux VAE file or folder (k5core.vae tells which on load)."""
    path: str
    dtype: str = "auto"


# ----------------------------------------------------------------------------- loaded objects
@dataclass
class _LoadedDiT:
    model: torch.nn.Module
    fp8: str
    loras: tuple[LoraSpec, ...] = ()
    lora_names: list[str] = field(default_factory=list)
    blocks_to_swap: int = 0
    scaled_mm: bool = False
    compiled: bool = False


def _bytes_on_disk(path) -> int:
    """Size of a model file or folder: what loading it will roughly need."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class ModelCache:
    """Loaded DiTs, text encoders and VAEs by handle; `keep` objects of each kind (default 1)."""

    KINDS = ("dit", "text", "vae")

    def __init__(self, keep: int = 1):
        self.keep = keep
        self._items: dict[str, OrderedDict] = {k: OrderedDict() for k in self.KINDS}
        self.loads: Counter = Counter()      # (kind, key) -> times read from disk (tests, logs)

    # -- bookkeeping -------------------------------------------------------------------------------
    def _get(self, kind: str, key):
        items = self._items[kind]
        if key in items:
            items.move_to_end(key)
            return items[key]
        return None

    def _make_room(self, kind: str) -> None:
        items = self._items[kind]
        while len(items) >= self.keep:
            key, obj = items.popitem(last=False)
            self._release(kind, obj)
            log.info("Kandinsky 5: freed %s %s", kind, key[0] if isinstance(key, tuple) else key)
        comfy.empty_cache()

    def _put(self, kind: str, key, obj) -> None:
        self._items[kind][key] = obj
        self.loads[(kind, key)] += 1
        comfy.on_unload_request(self.clear)

    @staticmethod
    def _release(kind: str, obj) -> None:
        if kind == "text":
            obj.unload()
        elif kind == "dit":      # drop the weights even if something (a traceback) still holds the module
            if obj.blocks_to_swap:
                from k5core.offload import enable_block_swap
                enable_block_swap(obj.model, 0, "meta")      # swap off (frees the CPU homes), all to meta
            else:
                obj.model.to("meta")
        else:
            obj.network.to("meta")

    def loaded(self, kind: str) -> list:
        """Keys of the loaded objects of a kind, oldest first."""
        return list(self._items[kind])

    def unload(self, kind: str, key=None) -> None:
        """Free one object (by key) or all objects of a kind."""
        items = self._items[kind]
        for k in [key] if key is not None else list(items):
            obj = items.pop(k, None)
            if obj is not None:
                self._release(kind, obj)
        comfy.empty_cache()

    def clear(self) -> None:
        """Free everything (ComfyUI's unload requests land here)."""
        if any(self._items.values()):
            log.info("Kandinsky 5: unloading cached models")
        for kind in self.KINDS:
            self.unload(kind)
        EMBEDS.clear()

    # -- DiT ---------------------------------------------------------------------------------------
    def dit(self, handle: ModelHandle) -> torch.nn.Module:
        """The K5DiT for a handle, loaded or converted as needed, with the handle's LoRAs and
        memory settings applied."""
        entry = self._get("dit", handle.load_key) or self._convert_to_fp8(handle) or self._load_dit(handle)
        self._sync_loras(entry, handle.loras)
        self._sync_memory(entry, handle)
        return entry.model

    def _load_dit(self, handle: ModelHandle) -> _LoadedDiT:
        from k5core.loading import load_dit
        self._make_room("dit")
        device = comfy.torch_device()
        comfy.free_comfy_memory(_bytes_on_disk(handle.path), device)
        fp8 = None if handle.fp8 == "none" else handle.fp8
        swap = handle.blocks_to_swap > 0
        log.info("Kandinsky 5: loading DiT %s (task %s%s)", handle.path, handle.task, f", fp8 {fp8}" if fp8 else "")
        model = load_dit(handle.path, task=handle.task, dtype=resolve_dtype(handle.dtype, device),
                         device="cpu" if swap else device, fp8=fp8, attention=handle.attention)
        entry = _LoadedDiT(model.eval().requires_grad_(False), handle.fp8)
        if swap:
            self._set_block_swap(entry, handle.blocks_to_swap, device)
        self._put("dit", handle.load_key, entry)
        return entry

    def _convert_to_fp8(self, handle: ModelHandle) -> _LoadedDiT | None:
        """fp8 asked for a DiT already loaded in high precision: quantize it in place (LoRAs and
        block swap are taken off first and put back by `dit`)."""
        if handle.fp8 == "none":
            return None
        source = replace(handle, fp8="none").load_key
        entry = self._get("dit", source)
        if entry is None:
            return None
        from k5core.fp8 import quantize_model
        self._sync_loras(entry, ())
        self._set_block_swap(entry, 0, comfy.torch_device())
        quantize_model(entry.model, handle.fp8)
        entry.fp8 = handle.fp8
        del self._items["dit"][source]
        self._items["dit"][handle.load_key] = entry
        comfy.empty_cache()
        log.info("Kandinsky 5: converted the loaded DiT to fp8 %s", handle.fp8)
        return entry

    def _sync_loras(self, entry: _LoadedDiT, wanted: tuple[LoraSpec, ...]) -> None:
        """Make the LoRAs on the model equal `wanted`: strengths change in place, other changes
        remove the applied LoRAs and apply the wanted ones (every file is checked before use)."""
        from k5core.lora import apply_loras, remove_loras, set_lora_multiplier
        if entry.loras == wanted:
            return
        model = entry.model
        if [(l.path, l.mode) for l in entry.loras] == [(l.path, l.mode) for l in wanted]:
            for name, lora in zip(entry.lora_names, wanted):
                set_lora_multiplier(model, name, lora.strength)
            entry.loras = wanted
            return
        if entry.lora_names:
            remove_loras(model, entry.lora_names)
        entry.loras, entry.lora_names = (), []
        names: list[str] = []
        try:
            for lora in wanted:
                names += apply_loras(model, [(lora.path, lora.strength)], merge=LORA_MODES[lora.mode])
        except BaseException:
            if names:
                remove_loras(model, names)
            raise
        entry.loras, entry.lora_names = wanted, names

    def _sync_memory(self, entry: _LoadedDiT, handle: ModelHandle) -> None:
        self._set_block_swap(entry, handle.blocks_to_swap, comfy.torch_device())
        if entry.scaled_mm != handle.fp8_scaled_mm:
            from k5core.fp8 import use_scaled_mm
            use_scaled_mm(entry.model, handle.fp8_scaled_mm)
            entry.scaled_mm = handle.fp8_scaled_mm
        if entry.compiled != handle.compile:
            entry.model.compile_blocks(handle.compile)
            entry.compiled = handle.compile

    @staticmethod
    def _set_block_swap(entry: _LoadedDiT, blocks: int, device) -> None:
        """`blocks` visual blocks in CPU memory, streamed to the device as they run (k5core.offload);
        0 puts the whole model on the device."""
        if entry.blocks_to_swap == blocks:
            return
        from k5core.offload import enable_block_swap
        enable_block_swap(entry.model, blocks, device)
        entry.blocks_to_swap = blocks

    # -- text encoders -----------------------------------------------------------------------------
    def text_encoder(self, handle: TextEncoderHandle):
        """The k5core TextEncoder for a handle, on its device."""
        from k5core.text import TextEncoder
        device = torch.device("cpu") if handle.device == "cpu" else comfy.torch_device()
        encoder = self._get("text", handle)
        if encoder is not None:
            if encoder.qwen.device != device and handle.quantization == "none":
                encoder.to(device)
            return encoder
        self._make_room("text")
        comfy.free_comfy_memory(_bytes_on_disk(handle.qwen) + _bytes_on_disk(handle.clip), device)
        log.info("Kandinsky 5: loading text encoders %s + %s", handle.qwen, handle.clip)
        encoder = TextEncoder.load(
            handle.qwen, handle.clip, device=device,
            dtype=None if handle.dtype == "auto" else resolve_dtype(handle.dtype, device),
            quantization=None if handle.quantization == "none" else handle.quantization,
            qwen_tokenizer=handle.qwen_tokenizer or None, clip_tokenizer=handle.clip_tokenizer or None,
            comfy_root=handle.comfy_root or None, text_dim=None, pooled_dim=None)
        self._put("text", handle, encoder)
        return encoder

    def offload_text_encoder(self, handle: TextEncoderHandle) -> None:
        """Move a loaded encoder to CPU memory (bitsandbytes-quantized ones stay where they are)."""
        encoder = self._get("text", handle)
        if encoder is not None and handle.quantization == "none":
            encoder.to("cpu")
            comfy.empty_cache()

    # -- VAEs --------------------------------------------------------------------------------------
    def vae(self, handle: VAEHandle):
        """The k5core K5VAE for a handle, on the compute device."""
        from k5core.vae import load_vae
        device = comfy.torch_device()
        vae = self._get("vae", handle)
        if vae is not None:
            if vae.device != device:
                vae.to(device)
            return vae
        self._make_room("vae")
        log.info("Kandinsky 5: loading VAE %s", handle.path)
        vae = load_vae(handle.path, device=device, dtype=resolve_dtype(handle.dtype, device))
        self._put("vae", handle, vae)
        return vae


class LRU(OrderedDict):
    """A dict that keeps its `size` most recently used items."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get(self, key, default=None):
        if key in self:
            self.move_to_end(key)
            return self[key]
        return default

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


CACHE = ModelCache()
EMBEDS = LRU(32)       # (encoder handle, prompt, negative prompt, content) -> K5_EMBEDS, on the CPU
