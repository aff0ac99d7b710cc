"""LoRA for the Kandinsky 5 DiT: one network to train, save, load and apply low-rank adapters.

A LoRA adds `multiplier * (alpha / rank) * up(down(x))` to the output of a Linear layer, with
`down` (rank, in) and `up` (out, rank). Three ways to have it act on the model:
- training: `LoRANetwork(model, rank, alpha, ...)` creates adapters (up zero-initialised, so the
  model starts unchanged) and `.apply_to()` attaches them; the base weights are frozen;
- unmerged inference: `apply_loras(model, [(file, multiplier)], merge=False)` attaches adapters read
  from files; works over fp8 weights, multipliers change without reloading;
- merged inference: `apply_loras(..., merge=True)` adds the deltas into the weights (bf16/fp16/fp32
  only). The original weights are kept in CPU memory while merged, so `remove_loras` restores them
  bit for bit (the same trade ComfyUI's model patcher makes).

Where adapters live: each targeted Linear gets a child `lora_adapters` (ModuleDict, adapter name ->
LoRAAdapter) and one forward hook that adds the adapters' outputs. Being children of the Linear, the
adapters move with their block (`block.to(device)`, block swap) and follow `model.train()/eval()`.
The base model's own keys never change; while adapters are attached `model.state_dict()` also holds
`<linear>.lora_adapters.<name>.{lora_down.weight, lora_up.weight, alpha}`; they go when removed.

Files are kohya/musubi style, which musubi-tuner's `networks.lora_kandinsky` and ComfyUI's own
LoraLoader (native Kandinsky 5: `lora_unet_` + module path with `_`) both read:
    lora_unet_visual_transformer_blocks_0_self_attention_to_query.lora_down.weight  (rank, in)
    lora_unet_visual_transformer_blocks_0_self_attention_to_query.lora_up.weight    (out, rank)
    lora_unet_visual_transformer_blocks_0_self_attention_to_query.alpha             ()
with `ss_*` / `modelspec.*` training metadata. Reading also takes diffusers/PEFT keys
(`transformer.` or `base_model.model.` + path + `.lora_A[.default].weight` / `.lora_B...`; the
official camera LoRAs), ComfyUI-prefixed keys (`diffusion_model.` + path + `.lora_down.weight` or
`.lora_A.weight`) and bare module paths. A key without alpha means alpha = rank (scale 1, as ComfyUI
and diffusers do), unless a PEFT `config_lora.json` / `adapter_config.json` lies beside the file.

Default targets (musubi-tuner's): q/k/v/out of self- and cross-attention and the two feed-forward
layers of every text *and* visual block; modulation layers are excluded.
"""
from __future__ import annotations

import datetime
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from .files import read_safetensors_header, save_safetensors

PREFIX = "lora_unet_"
DEFAULT_INCLUDE = (
    r"(text|visual)_transformer_blocks\.\d+\.(self_attention|cross_attention)\.(to_query|to_key|to_value|out_layer)",
    r"(text|visual)_transformer_blocks\.\d+\.feed_forward\.(in_layer|out_layer)",
)
DEFAULT_EXCLUDE = (r".*modulation.*",)

# (down, up) suffixes of the key formats we read, and the key prefixes stripped before the module path
FACTOR_SUFFIXES = (("lora_down.weight", "lora_up.weight"), ("lora_A.weight", "lora_B.weight"),
                   ("lora_A.default.weight", "lora_B.default.weight"), ("lora.down.weight", "lora.up.weight"))
PATH_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.")
UNDERSCORE_PREFIXES = ("lora_unet_", "lora_transformer_")
PEFT_CONFIGS = ("config_lora.json", "adapter_config.json")

# metadata written into every file (musubi-tuner's names, see its training/trainer_base.py and
# utils/sai_model_spec.py)
NETWORK_MODULE = "networks.lora_kandinsky"
BASE_MODEL_VERSION = "kandinsky5"
MODELSPEC = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "Kandinsky-5/lora",
             "modelspec.implementation": "https://github.com/kandinskylab/kandinsky-5"}


class LoRAError(ValueError):
    """A LoRA that cannot be used with this model, with the file and the key named."""


class LoRAWarning(UserWarning):
    """A LoRA that only partly fits the model (some keys ignored)."""


# ----------------------------------------------------------------------------- targets
def lora_name(path: str) -> str:
    """Key stem of a module in kohya/musubi files: `lora_unet_` + path with `.` -> `_`."""
    return PREFIX + path.replace(".", "_")


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear of the model (fp8 Linears included) by module path, LoRA's own layers left out."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".lora_adapters." not in name}


def _patterns(patterns, default) -> list[re.Pattern]:
    patterns = default if patterns is None else [patterns] if isinstance(patterns, str) else patterns
    try:
        return [re.compile(p) for p in patterns]
    except re.error as e:
        raise ValueError(f"LoRA include/exclude pattern {e.pattern!r} is not a valid regex: {e}") from None


def select_targets(model: nn.Module, include=None, exclude=None) -> dict[str, nn.Linear]:
    """Linears whose path fully matches an include regex and no exclude regex. Given lists replace
    the defaults (DEFAULT_INCLUDE / DEFAULT_EXCLUDE); a single string is one pattern."""
    inc, exc = _patterns(include, DEFAULT_INCLUDE), _patterns(exclude, DEFAULT_EXCLUDE)
    targets = {path: m for path, m in linear_modules(model).items()
               if any(p.fullmatch(path) for p in inc) and not any(p.fullmatch(path) for p in exc)}
    if not targets:
        raise ValueError(f"no Linear layer of the model matches the LoRA targets (include "
                         f"{[p.pattern for p in inc]}, exclude {[p.pattern for p in exc]}); module paths "
                         f"look like 'visual_transformer_blocks.0.self_attention.to_query'")
    return targets


def is_mergeable(linear: nn.Linear) -> bool:
    """A delta can be added into bf16/fp16/fp32 weights; fp8 (1-byte) and integer weights cannot."""
    w = linear.weight
    return w.is_floating_point() and w.element_size() >= 2


# ----------------------------------------------------------------------------- adapter
class LoRAAdapter(nn.Module):
    """down (in -> rank) and up (rank -> out) of one Linear; forward(x) returns the output delta
    `multiplier * alpha / rank * up(down(x))`, or None when module dropout skips it."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float | None = None,
                 dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, multiplier: float = 1.0, dtype=torch.float32,
                 device=None):
        super().__init__()
        self.rank = rank
        self.lora_down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.lora_up = nn.Linear(rank, out_features, bias=False, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)  # a new LoRA leaves the model unchanged
        alpha = rank if not alpha else float(alpha)  # None or 0 mean alpha = rank (scale 1)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32, device=device))
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.multiplier = multiplier

    @property
    def scale(self) -> float:
        return self.alpha.item() / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return None
        dtype = self.lora_down.weight.dtype
        if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(dtype)
        h = self.lora_down(x)                                   # (..., rank)
        factor = self.multiplier / self.rank
        if self.training and self.dropout:
            h = F.dropout(h, p=self.dropout)
        if self.training and self.rank_dropout:                # drop whole ranks per sample
            keep = torch.rand(h.shape[0], *[1] * (h.ndim - 2), self.rank, device=h.device) > self.rank_dropout
            h = h * keep.to(h.dtype)
            factor = factor / (1.0 - self.rank_dropout)
        return self.lora_up(h) * (self.alpha * factor)         # alpha stays a tensor: no device sync

    def delta_weight(self) -> torch.Tensor:
        """The weight delta this adapter adds, in fp32: multiplier * alpha / rank * up @ down."""
        return self.lora_up.weight.float() @ self.lora_down.weight.float() * (self.scale * self.multiplier)


def _add_adapter_outputs(linear: nn.Linear, args, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of a Linear with adapters: output + the sum of the adapters' deltas, summed in
    the adapters' precision and rounded to the output dtype once."""
    total = output
    for adapter in linear.lora_adapters.values():
        if adapter.multiplier != 0:
            delta = adapter(args[0])
            if delta is not None:
                total = total + delta
    return total if total is output else total.to(output.dtype)


def _attach(linear: nn.Linear, name: str, adapter: LoRAAdapter) -> None:
    """Register the adapter as `linear.lora_adapters[name]`; the first one also adds the hook."""
    taken = "lora_adapters" in linear._modules and name in linear.lora_adapters
    if taken or hasattr(nn.ModuleDict, name) or not name.isidentifier():
        raise ValueError(f"cannot attach a LoRA named {name!r}: the name is taken or not an identifier")
    if "lora_adapters" not in linear._modules:
        linear.lora_adapters = nn.ModuleDict()
        linear._k5_lora_hook = linear.register_forward_hook(_add_adapter_outputs)
    linear.lora_adapters[name] = adapter


def _detach(linear: nn.Linear, name: str) -> None:
    adapters = linear._modules.get("lora_adapters")
    if adapters is None or name not in adapters:
        return
    del adapters[name]
    if not len(adapters):
        linear._k5_lora_hook.remove()
        del linear._k5_lora_hook
        del linear.lora_adapters


# ----------------------------------------------------------------------------- network
class LoRANetwork(nn.Module):
    """The adapters of one LoRA over a DiT. Its children are named by file key stem, so the native
    `state_dict()` is the file format (`lora_unet_<path>.lora_down.weight` ...). `load_state_dict`
    also takes the foreign formats `read_lora` reads. Create it on the final model (after fp8
    quantization and loading: it keeps references to the Linears), `apply_to()`, train
    `trainable_parameters()`, `save(path, metadata)`; `remove()` detaches."""

    def __init__(self, model: nn.Module, rank: int = 32, alpha: float | None = None,
                 dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, include=None, exclude=None,
                 dtype=torch.float32, multiplier: float = 1.0, name: str = "network",
                 per_module: dict[str, tuple[int, float]] | None = None):
        """rank/alpha/dropouts as in musubi-tuner (alpha None or 0 = rank); include/exclude: regexes
        on module paths; dtype: LoRA parameter dtype, independent of the base weights;
        per_module: exact {path: (rank, alpha)} (e.g. from a file), replacing rank/alpha/patterns."""
        super().__init__()
        self.__dict__["model"] = model                      # kept outside the module tree
        self._linears = linear_modules(model)               # plain dict: not registered as children
        self._task = getattr(getattr(model, "task", None), "name", None)
        self.name, self.multiplier, self.source = name, multiplier, "training"
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.include = list(DEFAULT_INCLUDE if include is None else [include] if isinstance(include, str) else include)
        self.exclude = list(DEFAULT_EXCLUDE if exclude is None else [exclude] if isinstance(exclude, str) else exclude)
        if per_module is None:
            per_module = {p: (rank, alpha) for p in select_targets(model, self.include, self.exclude)}
        self.rank = max(r for r, _ in per_module.values())   # for the metadata
        self.alpha = max((a or r) for r, a in per_module.values())
        self.paths: dict[str, str] = {}                     # file key stem -> module path
        for path, (r, a) in per_module.items():
            linear = self._linears[path]
            key = lora_name(path)
            self.add_module(key, LoRAAdapter(
                linear.in_features, linear.out_features, r, a, dropout, rank_dropout, module_dropout,
                multiplier, dtype, linear.weight.device))
            self.paths[key] = path
        self.applied = False

    @classmethod
    def from_weights(cls, model: nn.Module, weights: dict[str, "LoRAWeights"], multiplier: float = 1.0,
                     name: str = "lora", dtype=None, source: str = "state dict") -> "LoRANetwork":
        """A network holding read LoRA weights (see read_lora); dtype None keeps the file's dtype."""
        first = next(iter(weights.values()))
        net = cls(model, multiplier=multiplier, name=name, dtype=dtype or first.down.dtype,
                  per_module={p: (w.rank, w.alpha) for p, w in weights.items()})
        net._copy_weights(weights)
        net.requires_grad_(False)
        net.source = source
        return net

    def adapters(self) -> dict[str, LoRAAdapter]:
        """Module path -> adapter."""
        return {path: self._modules[key] for key, path in self.paths.items()}

    def apply_to(self) -> "LoRANetwork":
        """Attach the adapters to their Linears and freeze the base model's parameters."""
        if self.applied:
            return self
        model = self.model
        state = _state(model)
        if self.name in state.applied:
            raise ValueError(f"a LoRA named {self.name!r} is already applied to this model")
        for p in model.parameters():
            p.requires_grad_(False)
        for path, adapter in self.adapters().items():
            linear = self._linears[path]
            _attach(linear, self.name, adapter.train(linear.training))  # follow the model's mode
        state.applied[self.name] = self
        self.applied = True
        return self

    def remove(self) -> None:
        """Detach the adapters; the model is as before apply_to."""
        for path in self.paths.values():
            _detach(self._linears[path], self.name)
        _state(self.model).applied.pop(self.name, None)
        self.applied = False

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The LoRA parameters, with requires_grad set (a later `model.requires_grad_(False)` is undone)."""
        params = list(self.parameters())
        for p in params:
            p.requires_grad_(True)
        return params

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for adapter in self.adapters().values():
            adapter.multiplier = multiplier

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load weights in our format or any format `read_lora` reads; strict: the same modules."""
        weights = parse_lora(state_dict, self._linears, where="state dict")
        ours, theirs = set(self.paths.values()), set(weights)
        missing, unexpected = sorted(ours - theirs), sorted(theirs - ours)
        if strict and (missing or unexpected):
            raise LoRAError(f"LoRA state dict does not match the network: {len(missing)} modules missing "
                            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        self._copy_weights({p: w for p, w in weights.items() if p in ours})
        return nn.modules.module._IncompatibleKeys([lora_name(p) for p in missing],
                                                   [lora_name(p) for p in unexpected])

    def _copy_weights(self, weights: dict[str, "LoRAWeights"]) -> None:
        adapters = self.adapters()
        with torch.no_grad():
            for path, w in weights.items():
                a = adapters[path]
                if a.rank != w.rank:
                    raise LoRAError(f"LoRA for '{path}' has rank {w.rank}; the network has rank {a.rank}")
                a.lora_down.weight.copy_(w.down)
                a.lora_up.weight.copy_(w.up)
                a.alpha.fill_(w.alpha)

    def metadata(self) -> dict[str, str]:
        """Network and model fields of the file metadata (musubi-tuner's `ss_*` and `modelspec.*`)."""
        args = {"rank_dropout": self.rank_dropout, "module_dropout": self.module_dropout,
                "include_patterns": self.include, "exclude_patterns": self.exclude}
        meta = {"ss_network_module": NETWORK_MODULE, "ss_network_dim": self.rank,
                "ss_network_alpha": self.alpha, "ss_network_dropout": self.dropout,
                "ss_network_args": json.dumps({k: v for k, v in args.items() if v is not None}),
                "ss_base_model_version": BASE_MODEL_VERSION, **MODELSPEC,
                "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat()}
        if self._task:
            meta["k5_task"] = self._task
        return {k: str(v) for k, v in meta.items()}

    def save(self, path, metadata: dict | None = None, dtype=None) -> Path:
        """Write the LoRA as safetensors (atomically) with `metadata()` plus the given fields;
        dtype converts up/down (alpha stays fp32). Refuses non-finite weights."""
        tensors = {}
        for key, t in self.state_dict().items():
            t = t.detach()
            if not torch.isfinite(t).all():
                raise LoRAError(f"{path}: LoRA tensor '{key}' holds NaN/inf values (training diverged); "
                                f"not saved")
            tensors[key] = t.to(dtype) if dtype is not None and key.endswith(".weight") else t
        meta = {"modelspec.title": Path(path).stem, **self.metadata(), **(metadata or {})}
        return save_safetensors(tensors, path, meta)


def training_metadata(task: str | None = None, steps: int | None = None, epoch: int | None = None,
                      datasets: list[dict] | None = None, **fields) -> dict[str, str]:
    """Training fields for `save(metadata=...)` under musubi-tuner's names: ss_steps, ss_epoch,
    ss_datasets (JSON summary), `ss_<name>` for each extra field (learning_rate=1e-4 ->
    ss_learning_rate); k5_task names the task the LoRA was trained on."""
    meta = {f"ss_{k}": v for k, v in fields.items() if v is not None}
    if task is not None:
        meta["k5_task"] = task
    if steps is not None:
        meta["ss_steps"] = steps
    if epoch is not None:
        meta["ss_epoch"] = epoch
    if datasets is not None:
        meta["ss_datasets"] = json.dumps(datasets)
    return {k: str(v) for k, v in meta.items()}


# ----------------------------------------------------------------------------- reading
@dataclass
class LoRAWeights:
    """One module's LoRA factors: down (rank, in), up (out, rank), alpha (scale = alpha / rank)."""
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, multiplier: float = 1.0, device=None) -> torch.Tensor:
        """multiplier * alpha / rank * up @ down in fp32 (on `device`, e.g. the weight's GPU): (out, in)."""
        up, down = self.up.to(device, torch.float32), self.down.to(device, torch.float32)
        return up @ down * (multiplier * self.alpha / self.rank)


@dataclass
class LoRAFile:
    """A LoRA read for a model: module path -> weights, plus the file's metadata."""
    source: str
    weights: dict[str, LoRAWeights]
    metadata: dict[str, str]


def load_lora_tensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a LoRA file (safetensors, or a weights-only torch file)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        _, metadata = read_safetensors_header(path)
        return load_file(path), metadata
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LoRAError(f"{path}: not a LoRA file (safetensors or weights-only torch file expected): "
                        f"{type(e).__name__}: {e}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise LoRAError(f"{path}: holds a {type(sd).__name__}, not a dict of tensors")
    return sd, {}


def peft_alpha(path) -> tuple[float, int, bool] | None:
    """(lora_alpha, r, use_rslora) from a PEFT config beside a LoRA file, or None."""
    for name in PEFT_CONFIGS:
        cfg = Path(path).parent / name
        if cfg.is_file():
            try:
                data = json.loads(cfg.read_text())
                return float(data["lora_alpha"]), int(data["r"]), bool(data.get("use_rslora", False))
            except (ValueError, KeyError, TypeError) as e:
                raise LoRAError(f"{cfg}: PEFT config without a usable 'lora_alpha' and 'r': {e}") from None
    return None


def _split_key(key: str) -> tuple[str, str] | None:
    """(module key, role) with role 'down', 'up' or 'alpha'; None for keys of no LoRA role."""
    for down, up in FACTOR_SUFFIXES:
        for suffix, role in ((down, "down"), (up, "up")):
            if key.endswith("." + suffix):
                return key[:-len(suffix) - 1], role
    if key.endswith(".alpha"):
        return key[:-len(".alpha")], "alpha"
    return None


def _module_path(stem: str, linears: dict, underscored: dict) -> str | None:
    """The model's module path for a key stem in any supported format, or None."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in PATH_PREFIXES:
            if stem.startswith(prefix):
                stem, stripped = stem[len(prefix):], True
    if stem in linears:
        return stem
    for prefix in UNDERSCORE_PREFIXES:
        if stem.startswith(prefix):
            return underscored.get(stem[len(prefix):])
    return None


def parse_lora(tensors: dict[str, torch.Tensor], linears: dict[str, nn.Linear], where: str,
               default_alpha=None) -> dict[str, LoRAWeights]:
    """Group LoRA tensors by target module and check them against the model's Linears.

    Raises LoRAError when no key matches, on a shape mismatch, missing factors or non-finite
    values; warns (LoRAWarning) with the count when only some keys match."""
    underscored = {p.replace(".", "_"): p for p in linears}
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unmatched = []
    for key, tensor in tensors.items():
        split = _split_key(key)
        path = split and _module_path(split[0], linears, underscored)
        if path is None:
            unmatched.append(key)
            continue
        role = split[1]
        if role in parts.setdefault(path, {}):
            raise LoRAError(f"{where}: keys '{parts[path][role][0]}' and '{key}' both give the "
                            f"{role} factor of module '{path}'")
        parts[path][role] = (key, tensor)
    if not parts:
        raise LoRAError(f"{where}: no key matches a Linear of this Kandinsky 5 DiT ({len(tensors)} keys, "
                        f"e.g. {sorted(unmatched)[:4]}); expected keys like "
                        f"'{lora_name('visual_transformer_blocks.0.self_attention.to_query')}.lora_down.weight' "
                        f"or 'transformer.visual_transformer_blocks.0.self_attention.to_query.lora_A.weight'")
    if unmatched:
        warnings.warn(f"{where}: {len(unmatched)} of {len(tensors)} keys match no Linear of this model "
                      f"and are ignored, e.g. {sorted(unmatched)[:4]}", LoRAWarning, stacklevel=3)
    return {path: _check_module(path, p, linears[path], where, default_alpha) for path, p in parts.items()}


def _check_module(path, parts, linear: nn.Linear, where, default_alpha) -> LoRAWeights:
    """One module's factors, checked: both present, 2-D, shapes fit the Linear, finite."""
    for role in ("down", "up"):
        if role not in parts:
            other = next(k for k, _ in parts.values())
            raise LoRAError(f"{where}: module '{path}' has no {role} factor (found '{other}')")
    (down_key, down), (up_key, up) = parts["down"], parts["up"]
    want_down, want_up = ("rank", linear.in_features), (linear.out_features, "rank")
    if down.ndim != 2 or up.ndim != 2 or down.shape[1] != linear.in_features \
            or up.shape[0] != linear.out_features or up.shape[1] != down.shape[0]:
        raise LoRAError(f"{where}: '{down_key}' {tuple(down.shape)} / '{up_key}' {tuple(up.shape)} do not fit "
                        f"'{path}' (expects {want_down} / {want_up}); the LoRA was made for another "
                        f"model size (e.g. a Pro LoRA on a Lite model)")
    for key, t in (parts["down"], parts["up"], *([parts["alpha"]] if "alpha" in parts else [])):
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise LoRAError(f"{where}: LoRA tensor '{key}' holds NaN/inf or non-float values")
    rank = down.shape[0]
    if "alpha" in parts:
        alpha = parts["alpha"][1].float().item()
    elif default_alpha is not None:
        lora_alpha, _, rslora = default_alpha
        alpha = lora_alpha / (math.sqrt(rank) if rslora else rank) * rank
    else:
        alpha = float(rank)
    return LoRAWeights(down, up, alpha)


def read_lora(source, model: nn.Module) -> LoRAFile:
    """Read a LoRA (path or state dict) for a model in any supported key format, checked."""
    if isinstance(source, dict):
        tensors, metadata, where, config = source, {}, "LoRA state dict", None
    else:
        tensors, metadata = load_lora_tensors(source)
        where, config = str(source), peft_alpha(source)
    weights = parse_lora(tensors, linear_modules(model), where, config)
    return LoRAFile(where, weights, metadata)


# ----------------------------------------------------------------------------- applying
@dataclass
class MergedLoRA:
    """A LoRA whose deltas were added into the weights."""
    name: str
    source: str
    multiplier: float
    weights: dict[str, LoRAWeights]


@dataclass
class _LoRAState:
    applied: dict            # name -> LoRANetwork (unmerged / training) or MergedLoRA
    backups: dict            # module path -> original weight (CPU) while a merged LoRA touches it
    counter: int = 0


def _state(model: nn.Module) -> _LoRAState:
    if "_k5_lora_state" not in model.__dict__:
        model.__dict__["_k5_lora_state"] = _LoRAState({}, {})
    return model.__dict__["_k5_lora_state"]


def apply_loras(model: nn.Module, loras: Iterable, merge: bool | None = None, dtype=None) -> list[str]:
    """Apply LoRAs, each a path / state dict or a (source, multiplier) pair; returns their names.

    merge=True adds the deltas into the weights (not possible on fp8 weights: LoRAError), False
    attaches adapters (dtype None keeps the file's dtype), None merges unless a target is fp8.
    Every file is read and checked before the model is touched."""
    entries = [e if isinstance(e, (tuple, list)) else (e, 1.0) for e in loras]
    files = [(read_lora(src, model), float(m)) for src, m in entries]
    linears = linear_modules(model)
    targets = {p for f, _ in files for p in f.weights}
    blocked = sorted(p for p in targets if not is_mergeable(linears[p]))
    if merge is None:
        merge = not blocked
    elif merge and blocked:
        raise LoRAError(f"cannot merge a LoRA into the {linears[blocked[0]].weight.dtype} weights of "
                        f"'{blocked[0]}' ({len(blocked)} such layers); apply it unmerged (merge=False, "
                        f"the default for fp8 models)")
    state, names = _state(model), []
    for lora, multiplier in files:
        state.counter += 1
        name = f"lora{state.counter}"
        if merge:
            state.applied[name] = MergedLoRA(name, lora.source, multiplier, lora.weights)
            _remerge(model, lora.weights)
        else:
            LoRANetwork.from_weights(model, lora.weights, multiplier, name, dtype, lora.source).apply_to()
        names.append(name)
    return names


def _remerge(model: nn.Module, paths: Iterable[str]) -> None:
    """Set each weight to original + the sum of the merged LoRAs' deltas (one rounding), or back
    to the original when no merged LoRA touches it any more."""
    state, linears = _state(model), linear_modules(model)
    merged = [m for m in state.applied.values() if isinstance(m, MergedLoRA)]
    with torch.no_grad():
        for path in paths:
            weight = linears[path].weight
            if path not in state.backups:
                state.backups[path] = weight.detach().to("cpu", copy=True)
            original = state.backups[path]
            touching = [m for m in merged if path in m.weights]
            if not touching:
                weight.copy_(original)
                del state.backups[path]
                continue
            total = original.to(weight.device, torch.float32, copy=True)   # never add into the backup
            for m in touching:
                total += m.weights[path].delta(m.multiplier, weight.device)
            weight.copy_(total.to(weight.dtype))


def remove_loras(model: nn.Module, names: Iterable[str] | None = None) -> None:
    """Remove applied LoRAs (all when names is None); merged weights are restored bit-exactly."""
    state = _state(model)
    names = list(state.applied) if names is None else list(names)
    unknown = [n for n in names if n not in state.applied]
    if unknown:
        raise KeyError(f"no LoRA named {unknown} is applied (applied: {list(state.applied)})")
    touched = set()
    for name in names:
        lora = state.applied[name]
        if isinstance(lora, MergedLoRA):
            del state.applied[name]
            touched |= set(lora.weights)
        else:
            lora.remove()
    _remerge(model, sorted(touched))


def set_lora_multiplier(model: nn.Module, name: str, multiplier: float) -> None:
    """Change an applied LoRA's multiplier without reading it again (merged ones are re-merged)."""
    lora = _state(model).applied.get(name)
    if lora is None:
        raise KeyError(f"no LoRA named {name!r} is applied (applied: {list(_state(model).applied)})")
    if isinstance(lora, MergedLoRA):
        lora.multiplier = float(multiplier)
        _remerge(model, lora.weights)
    else:
        lora.set_multiplier(float(multiplier))


def applied_loras(model: nn.Module) -> dict[str, dict]:
    """name -> {source, multiplier, merged} of the LoRAs applied to a model, in order."""
    out = {}
    for name, lora in _state(model).applied.items():
        merged = isinstance(lora, MergedLoRA)
        out[name] = {"source": lora.source, "multiplier": lora.multiplier, "merged": merged}
    return out
