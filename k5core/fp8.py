"""fp8 (e4m3fn) storage of the DiT's big Linear weights, with scales, and the file layouts that carry them.

Why: the attention and feed-forward Linears of the transformer blocks hold ~85% of a Kandinsky 5 DiT's
weights; one byte per weight plus a float32 scale roughly halves the model (Lite fits 12 GB, Pro 24 GB
with block swap). Embeddings, norms, modulation and the output layer stay in the compute dtype: they
are small and the official code runs the modulation in fp32.

A weight W is stored as q = round_e4m3(W / s) with s = amax / 448 taken over a group of weights:
    "tensor"   one scale                      scale shape ()          ComfyUI scaled-fp8 files
    "channel"  one scale per output row       scale shape (out, 1)    musubi-tuner "channel"
    "block"    one per 64 inputs of each row  scale shape (out, in/64, 1)  musubi-tuner "block"
Modes of `load_dit(fp8=...)` and `make_fp8 --fp8`: "e4m3fn" = per tensor (loads in ComfyUI core and
allows torch._scaled_mm on sm89+), "e4m3fn_scaled" = per output channel (safe for rows of very
different size; the measured output error of the three granularities is equal, see MODES).

File layouts read (keys after the model prefix such as `model.diffusion_model.`):
- ComfyUI scaled fp8: marker `scaled_fp8`, `<layer>.weight` fp8, `<layer>.scale_weight` float32 scalar,
  optional `<layer>.scale_input` (dropped: activations are never quantized with a stored scale here);
- musubi-tuner: `<layer>.scale_weight` shaped (1,), (out, 1) or (out, in/block, 1), any float dtype;
- ComfyUI mixed precision: `<layer>.weight_scale` + `<layer>.comfy_quant` (JSON bytes), `input_scale`
  (dropped); the fp8 weight may be stored as uint8;
- plain fp8 (weights cast to fp8 without scales): scale 1.
fp8 weights of layers kept in high precision (modulation, embeddings, out layer) are dequantized on
load. Files are written in the ComfyUI scaled-fp8 layout with the mode's scale shape (make_fp8).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
BLOCK_SIZE = 64  # inputs per scale in "block" granularity
# mode -> scale granularity. fp8 vs fp32 output error, relative L2, mean of 8 random models
# (`python tests/bench/bench_memory.py --error --seeds 8`): model_dim 512 x 4 blocks: tensor 0.0308,
# channel 0.0290, block 0.0286; tiny: 0.0240, 0.0216, 0.0217. The spread between seeds (~0.002) is as
# large as the differences: e4m3 is a float format and the scale only sets its range. "scaled" is per
# channel: the bytes of per tensor, safe for rows of very different size (one scale per tensor pushes
# small rows into subnormals); per block costs 6% more bytes for no gain beyond noise.
MODES = {"e4m3fn": "tensor", "e4m3fn_scaled": "channel"}
MARKER = "scaled_fp8"                      # ComfyUI's key saying "this file is scaled fp8"
SCALE_KEYS = (".scale_weight", ".weight_scale")   # ComfyUI old/musubi, ComfyUI mixed precision
DROPPED_SUFFIXES = (".scale_input", ".input_scale")
COMFY_QUANT = ".comfy_quant"               # per-layer JSON {"format": ...} of ComfyUI mixed precision
# The Linear layers stored in fp8: attention q/k/v/out and feed-forward of the text and visual blocks.
TARGET = re.compile(r"(text|visual)_transformer_blocks\.\d+\.(self_attention|cross_attention)\."
                    r"(to_query|to_key|to_value|out_layer)$"
                    r"|(text|visual)_transformer_blocks\.\d+\.feed_forward\.(in_layer|out_layer)$")


def granularity(mode: str) -> str:
    """The scale granularity of an fp8 mode, with an error listing the modes."""
    try:
        return MODES[mode]
    except KeyError:
        raise ValueError(f"fp8={mode!r}: expected one of {', '.join(map(repr, MODES))} or None") from None


def is_target(name: str) -> bool:
    """Whether the Linear layer `name` (official module path) is stored in fp8."""
    return TARGET.fullmatch(name) is not None


# ----------------------------------------------------------------------------- numbers
def scale_shape_for(weight_shape, kind: str) -> tuple[int, ...]:
    """Shape of the scale of an (out, in) weight for a granularity."""
    out, inp = weight_shape
    if kind == "tensor":
        return ()
    if kind == "channel":
        return (out, 1)
    if kind == "block":
        if inp % BLOCK_SIZE:
            raise ValueError(f"block scaling needs in_features divisible by {BLOCK_SIZE}, got {inp}")
        return (out, inp // BLOCK_SIZE, 1)
    raise ValueError(f"unknown fp8 granularity {kind!r} (tensor, channel or block)")


def scale_kind(scale_shape, weight_shape) -> str | None:
    """The granularity a scale of this shape means for an (out, in) weight; None if it fits none."""
    out, inp = weight_shape
    shape = tuple(scale_shape)
    if shape in ((), (1,)):
        return "tensor"
    if shape == (out, 1):
        return "channel"
    if len(shape) == 3 and shape[0] == out and shape[2] == 1 and shape[1] > 0 and inp % shape[1] == 0:
        return "block"
    return None


def _grouped(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """View an (out, in) weight as (out, blocks, in/blocks) when the scale is per block."""
    return w.unflatten(1, (scale.shape[1], -1)) if scale.ndim == 3 else w


def quantize(weight: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight -> (fp8 weight, float32 scale) with absmax scaling per group, in float32."""
    shape = scale_shape_for(weight.shape, kind)
    w = weight.detach().float()
    if kind == "block":
        w = w.unflatten(1, (shape[1], -1))                     # (out, blocks, 64)
    dims = {"tensor": None, "channel": (1,), "block": (2,)}[kind]
    amax = w.abs().amax() if dims is None else w.abs().amax(dim=dims, keepdim=True)
    scale = (amax / torch.finfo(FP8).max).clamp(min=1e-12)
    q = (w / scale).clamp(-torch.finfo(FP8).max, torch.finfo(FP8).max).to(FP8)
    return q.reshape(weight.shape), scale.reshape(shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype) -> torch.Tensor:
    """fp8 weight * scale, computed in float32 and cast to `dtype` (bf16/fp16 scales would round)."""
    return (_grouped(q, scale).float() * scale.float()).reshape(q.shape).to(dtype)


class _DequantLinear(torch.autograd.Function):
    """y = x W^T + b with W dequantized on the fly in forward and again in backward, so autograd
    keeps the 1-byte weight (not a bf16 copy) for backward. The fp8 weight itself gets no gradient."""

    @staticmethod
    def forward(ctx, x, q, scale, bias):
        ctx.save_for_backward(q, scale)
        ctx.has_bias = bias is not None
        return F.linear(x, dequantize(q, scale, x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        q, scale = ctx.saved_tensors
        grad_x = grad @ dequantize(q, scale, grad.dtype) if ctx.needs_input_grad[0] else None
        grad_b = grad.flatten(0, -2).sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return grad_x, None, None, grad_b


def scaled_mm_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias) -> torch.Tensor:
    """y = x W^T + b on fp8 tensor cores: x is quantized per row (token) to e4m3 with its own
    absmax scale; per-tensor weight scales use tensorwise scaling, per-channel ones rowwise."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()                      # (M, in), row-major
    x_scale = (x2.detach().abs().amax(dim=1, keepdim=True).float() / torch.finfo(FP8).max).clamp(min=1e-12)
    xq = (x2.float() / x_scale).clamp(-torch.finfo(FP8).max, torch.finfo(FP8).max).to(FP8)
    if scale.numel() == 1:       # tensorwise: both scales scalars
        w_scale, x_scale, out_scale = scale.float().reshape(()), torch.ones((), device=x.device), x_scale
    else:                        # rowwise: (M, 1) and (1, out)
        w_scale, out_scale = scale.float().reshape(1, -1), None
    y = torch._scaled_mm(xq, q.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=x.dtype)
    if out_scale is not None:
        y = (y.float() * out_scale).to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], q.shape[0])


def scaled_mm_supported(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> bool:
    """torch._scaled_mm fits: CUDA sm89+ (rowwise needs sm90 and bf16), e4m3 weight, no per-block
    scale, dims divisible by 16, a 16-bit activation dtype. (It has no backward: inference only.)"""
    if not (x.is_cuda and q.dtype == FP8 and scale.ndim < 3 and x.dtype in (torch.bfloat16, torch.float16)):
        return False
    if scale.numel() > 1 and x.dtype != torch.bfloat16:   # rowwise scaling writes bf16 only
        return False
    if q.shape[0] % 16 or q.shape[1] % 16:
        return False
    major, minor = torch.cuda.get_device_capability(x.device)
    return (major, minor) >= ((8, 9) if scale.numel() == 1 else (9, 0))


class FP8Linear(nn.Linear):
    """nn.Linear whose weight is stored in fp8 with a float32 `scale_weight` buffer (shape by
    granularity). Forward dequantizes to the input dtype, or runs torch._scaled_mm when
    `use_scaled_mm` is set and the GPU supports it. Still an nn.Linear for name/isinstance lookups."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, scale_shape=(),
                 fp8_dtype=FP8, device=None, dtype=None):
        nn.Module.__init__(self)     # no nn.Linear init: it would allocate and randomise a weight
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=fp8_dtype, device=device),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None
        self.register_buffer("scale_weight", torch.ones(scale_shape, dtype=torch.float32, device=device))
        self.use_scaled_mm = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, kind: str) -> FP8Linear:
        """Quantize an nn.Linear's weight (the bias keeps its dtype)."""
        q, scale = quantize(linear.weight, kind)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, tuple(scale.shape),
                    device=linear.weight.device, dtype=linear.weight.dtype)
        layer.weight.data, layer.scale_weight = q, scale
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach()
        return layer

    @property
    def granularity(self) -> str:
        return scale_kind(self.scale_weight.shape, self.weight.shape)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        """The weight in high precision (for merging a LoRA or comparing)."""
        return dequantize(self.weight, self.scale_weight, dtype)

    def assign_weight(self, weight: torch.Tensor) -> None:
        """Requantize from a high-precision weight with the same granularity (e.g. after a merge)."""
        q, scale = quantize(weight, self.granularity)
        self.weight.data, self.scale_weight = q.to(self.weight.device), scale.to(self.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_scaled_mm and not (torch.is_grad_enabled() and x.requires_grad) \
                and scaled_mm_supported(x, self.weight, self.scale_weight):
            return scaled_mm_linear(x, self.weight, self.scale_weight, self.bias)
        return _DequantLinear.apply(x, self.weight, self.scale_weight, self.bias)

    def _apply(self, fn, recurse=True):
        """Module.to(dtype) / .half() cast every float tensor, fp8 included: keep the weight in fp8
        (its values are exact in any wider float) and the scale in float32."""
        q_dtype, scale = self.weight.dtype, self.scale_weight
        super()._apply(fn, recurse)
        if self.weight.dtype != q_dtype:
            self.weight.data = self.weight.data.to(q_dtype)
        if self.scale_weight.dtype != torch.float32:
            self.scale_weight = scale.to(self.scale_weight.device)
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8={self.weight.dtype}, scale={self.granularity}"


# ----------------------------------------------------------------------------- models
def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path `name`."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model(model: nn.Module, fp8: str = "e4m3fn_scaled") -> nn.Module:
    """Replace the block Linear layers of an in-memory DiT by FP8Linear (in place; returns model).
    Checkpoints go through load_dit(fp8=...), which quantizes tensor by tensor while reading."""
    kind = granularity(fp8)
    for name, module in list(model.named_modules()):
        if is_target(name) and type(module) is nn.Linear:
            set_module(model, name, FP8Linear.from_linear(module, kind))
    return model


def use_scaled_mm(model: nn.Module, enabled: bool = True) -> int:
    """Let FP8Linear layers use torch._scaled_mm where supported (quantizes activations per token:
    faster on sm89+, slightly less exact). Returns the number of layers switched."""
    layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    for m in layers:
        m.use_scaled_mm = enabled
    return len(layers)


def stored_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer as stored (fp8 weights count 1 byte each)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ----------------------------------------------------------------------------- checkpoints
def _is_fp8(dtype: str) -> bool:
    return dtype in ("F8_E4M3", "F8_E5M2", "torch.float8_e4m3fn", "torch.float8_e5m2")


def _fp8_dtype(dtype: str):
    return torch.float8_e5m2 if dtype in ("F8_E5M2", "torch.float8_e5m2") else FP8


def _as_scale(t: torch.Tensor) -> torch.Tensor:
    """A file's scale as float32, a scalar when it holds one value ((1,) in musubi files)."""
    return t.float().reshape(()) if t.numel() == 1 else t.float()


def _is_u8(dtype: str) -> bool:
    return dtype in ("U8", "torch.uint8")


@dataclass
class Fp8Layer:
    """How one fp8 Linear layer is filled: from the file's fp8 weight and scale, or quantized now."""
    scale_shape: tuple[int, ...]
    fp8_dtype: torch.dtype
    source: str          # "file" (fp8 weight in the file), "quantize" (high-precision weight, quantize)
    scale_key: str | None = None   # the file's scale key (None: plain fp8 with scale 1, or quantize)


class Fp8Plan:
    """Which Linear layers of a checkpoint load as FP8Linear and how each file tensor becomes a model
    tensor. Built from tensor shapes and dtypes only (keys without the model prefix), so mismatched
    scales are refused before any weight is read."""

    def __init__(self, shapes: dict, fp8: str | None, where: str):
        self.where, self.mode = where, fp8
        kind = granularity(fp8) if fp8 is not None else None
        self.layers: dict[str, Fp8Layer] = {}     # FP8Linear layers of the model
        self.dequant: dict[str, str] = {}          # fp8 weights kept in high precision: layer -> scale key
        nvfp4 = [k for k in shapes if k.endswith(".weight_scale_2")]
        if nvfp4:
            raise ValueError(f"{where}: holds nvfp4 weights (e.g. '{nvfp4[0]}'); only fp8 e4m3fn/e5m2 "
                             f"files are supported")
        scales = {k[: -len(s)]: k for k in shapes for s in SCALE_KEYS if k.endswith(s)}
        self.prequantized = bool(scales) or any(_is_fp8(d) for _, d in shapes.values())
        for layer, key in scales.items():
            self._check_scale(shapes, layer, key)
        for key, (shape, dtype) in shapes.items():
            if not key.endswith(".weight") or len(shape) != 2:
                continue
            layer = key[: -len(".weight")]
            fp8_in_file = _is_fp8(dtype) or (_is_u8(dtype) and layer in scales)
            if fp8_in_file and layer not in scales and scales:
                raise ValueError(f"{where}: '{key}' is fp8 but has no scale ('{layer}.scale_weight'), "
                                 f"while other layers have one: scales do not match the weights")
            if fp8_in_file:
                scale = tuple(shapes[scales[layer]][0]) if layer in scales else ()
                if not is_target(layer):
                    if layer in scales:
                        self.dequant[layer] = scales[layer]
                    continue
                self.layers[layer] = Fp8Layer(tuple(scale) if scale != (1,) else (), FP8 if _is_u8(dtype)
                                              else _fp8_dtype(dtype), "file", scales.get(layer))
            elif kind is not None and is_target(layer):
                self.layers[layer] = Fp8Layer(scale_shape_for(shape, kind), FP8, "quantize")

    def _check_scale(self, shapes: dict, layer: str, key: str) -> None:
        weight = shapes.get(layer + ".weight")
        if weight is None:
            raise ValueError(f"{self.where}: scale '{key}' has no weight '{layer}.weight'")
        (wshape, wdtype), (sshape, sdtype) = weight, shapes[key]
        if not (_is_fp8(wdtype) or _is_u8(wdtype)):
            raise ValueError(f"{self.where}: '{key}' scales '{layer}.weight', which is {wdtype}, not fp8")
        if len(wshape) != 2 or scale_kind(sshape, wshape) is None:
            raise ValueError(f"{self.where}: scale '{key}' has shape {tuple(sshape)}, which fits no "
                             f"scaling of weight {tuple(wshape)} (expected (), (1,), ({wshape[0]}, 1) "
                             f"or ({wshape[0]}, blocks, 1))")
        if _is_fp8(sdtype) or _is_u8(sdtype):
            raise ValueError(f"{self.where}: scale '{key}' is {sdtype}; block-fp8 scales (nvfp4, mxfp8) "
                             f"are not supported, only float scales of fp8 e4m3fn/e5m2 weights")

    def apply(self, model: nn.Module) -> None:
        """Swap the planned nn.Linear modules of a (meta) model for empty FP8Linear ones."""
        for name, spec in self.layers.items():
            old = model.get_submodule(name)
            set_module(model, name, FP8Linear(old.in_features, old.out_features, old.bias is not None,
                                              spec.scale_shape, spec.fp8_dtype, device=old.weight.device,
                                              dtype=old.weight.dtype))

    def convert(self, tensors, dtype=None, device="cpu"):
        """Turn (key, tensor) pairs of the file into the model's (key, tensor) pairs: quantize planned
        weights, rename scales to `scale_weight`, dequantize fp8 layers kept in high precision, drop
        markers and input scales, cast the rest to `dtype` (fp8 leftovers to dtype or bf16)."""
        high = dtype or torch.bfloat16
        pending: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors:
            if key == MARKER or key.endswith(DROPPED_SUFFIXES):
                continue
            if key.endswith(COMFY_QUANT):
                self._check_format(key, t)
                continue
            layer, _, leaf = key.rpartition(".")
            spec = self.layers.get(layer)
            if layer in self.dequant and key in (layer + ".weight", self.dequant[layer]):
                part = pending.setdefault(layer, {})
                part["scale" if key != layer + ".weight" else "weight"] = t
                if len(part) == 2:
                    self._check_values(self.dequant[layer], part["scale"])
                    w = part["weight"].view(FP8) if part["weight"].dtype == torch.uint8 else part["weight"]
                    yield layer + ".weight", dequantize(w, _as_scale(part["scale"]), high).to(device)
                    del pending[layer]
            elif spec is not None and leaf == "weight":
                yield from self._fp8_weight(layer, spec, t, device)
            elif spec is not None and key == spec.scale_key:
                self._check_values(key, t)
                yield layer + ".scale_weight", t.float().reshape(spec.scale_shape).to(device)
            elif t.dtype in FP8_DTYPES:
                yield key, t.to(high).to(device)
            else:
                yield key, (t.to(dtype) if dtype is not None and t.is_floating_point() else t).to(device)
        if pending:
            raise ValueError(f"{self.where}: fp8 weights without their scale tensors: {sorted(pending)}")

    def _fp8_weight(self, layer: str, spec: Fp8Layer, t: torch.Tensor, device):
        if spec.source == "quantize":
            on = device if torch.device(device).type == "cuda" else "cpu"   # quantize on the GPU if there
            q, scale = quantize(t.to(on), MODES[self.mode])
            yield layer + ".weight", q.to(device)
            yield layer + ".scale_weight", scale.to(device)
            return
        yield layer + ".weight", (t.view(spec.fp8_dtype) if t.dtype == torch.uint8 else t).to(device)
        if spec.scale_key is None:                  # plain fp8 file: scale 1
            yield layer + ".scale_weight", torch.ones((), device=device)

    def _check_format(self, key: str, t: torch.Tensor) -> None:
        try:
            fmt = json.loads(bytes(t.to(torch.uint8).tolist())).get("format")
        except (ValueError, AttributeError):
            fmt = "unreadable"
        if fmt not in ("float8_e4m3fn", "float8_e5m2"):
            raise ValueError(f"{self.where}: '{key}' says format {fmt!r}; only float8_e4m3fn/e5m2 are supported")

    def _check_values(self, key: str, scale: torch.Tensor) -> None:
        s = scale.float()
        if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
            raise ValueError(f"{self.where}: scale '{key}' holds values that are not finite and positive "
                             f"(min {s.min().item():.3g}, max {s.max().item():.3g})")
