"""One attention dispatch for the DiT: SDPA by default, flash-attn 2/3, sage or xformers when
installed and asked for, and NABLA block-sparse self-attention on flex_attention.

Every function takes q, k, v as (B, S, heads, head_dim) – the layout the DiT produces after its
per-head reshape – and returns (B, S, heads, head_dim).
"""
from __future__ import annotations

import functools
import importlib
import math
import warnings

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "flash2", "flash3", "sage", "xformers")
_ALIASES = {"torch": "sdpa", "flash": "flash2", "flash_attn": "flash2", "flash_attn3": "flash3",
            "sageattn": "sage"}
_MODULES = {"flash2": "flash_attn", "flash3": "flash_attn_interface", "sage": "sageattention",
            "xformers": "xformers.ops"}
NABLA_BLOCK = 64  # tokens per NABLA block: a 1 x 8 x 8 patch of the latent grid


def resolve_backend(name: str | None) -> str:
    """Normalise a backend name and check its package is importable (clear error if not)."""
    name = _ALIASES.get(name or "sdpa", name or "sdpa")
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name != "sdpa" and not _available(name):
        raise ImportError(
            f"attention backend {name!r} was asked for but the package {_MODULES[name]!r} is not "
            f"installed; install it or use 'sdpa' (works everywhere, no extra install)")
    return name


@functools.cache
def _available(name: str) -> bool:
    try:
        importlib.import_module(_MODULES[name])
        return True
    except Exception:
        return False


def attention(q, k, v, key_mask: torch.Tensor | None = None, backend: str = "sdpa"):
    """Dense attention; `key_mask` (B, Sk) bool marks real keys (padded text is False). Callers pass
    None when nothing is padded (K5DiT checks once per forward, not once per layer)."""
    if backend == "sdpa" or key_mask is not None or q.device.type != "cuda":
        return _sdpa(q, k, v, key_mask)  # the optional kernels take no padding mask here
    return _KERNELS[backend](q, k, v)


def _sdpa(q, k, v, key_mask):
    mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, Sk)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask)
    return out.transpose(1, 2)


def _flash2(q, k, v):
    from flash_attn import flash_attn_func
    return flash_attn_func(q, k, v)


def _flash3(q, k, v):
    from flash_attn_interface import flash_attn_func
    out = flash_attn_func(q, k, v)
    return out[0] if isinstance(out, tuple) else out


def _sage(q, k, v):
    import sageattention
    return sageattention.sageattn(q, k, v, tensor_layout="NHD", is_causal=False)


def _xformers(q, k, v):
    import xformers.ops
    return xformers.ops.memory_efficient_attention(q, k, v)


_KERNELS = {"flash2": _flash2, "flash3": _flash3, "sage": _sage, "xformers": _xformers}


# ----------------------------------------------------------------------------- NABLA
@functools.lru_cache(maxsize=8)
def sta_mask(t: int, h: int, w: int, wT: int, wH: int, wW: int, device=None) -> torch.Tensor:
    """Sliding-tile mask over NABLA blocks: block i sees block j when |dt|, |dh|, |dw| are within
    half the window. Blocks are ordered (t, h, w); returns (t*h*w, t*h*w) bool. Cached: every step
    and every block of a generation asks for the same one."""
    grid = torch.stack(torch.meshgrid(torch.arange(t, device=device), torch.arange(h, device=device),
                                      torch.arange(w, device=device), indexing="ij"), -1).reshape(-1, 3)
    dist = (grid[:, None, :] - grid[None, :, :]).abs()  # (N, N, 3)
    half = torch.tensor([wT // 2, wH // 2, wW // 2], device=device)
    return (dist <= half).all(-1)


def nabla_block_mask(q, k, sta: torch.Tensor | None, P: float) -> torch.Tensor:
    """Top-CDF block selection: average q and k over each 64-token block, softmax the block map,
    keep the smallest set of key blocks holding mass P per query block, OR the STA mask.
    q, k: (B, heads, S, D) in fractal order -> (B, heads, S/64, S/64) bool."""
    b, n, s, d = q.shape
    qa = q.reshape(b, n, s // NABLA_BLOCK, NABLA_BLOCK, d).float().mean(-2)
    ka = k.reshape(b, n, s // NABLA_BLOCK, NABLA_BLOCK, d).float().mean(-2)
    probs = torch.softmax(qa @ ka.transpose(-1, -2) / math.sqrt(d), dim=-1)
    sorted_p, order = probs.sort(-1)
    keep_sorted = sorted_p.cumsum(-1) >= 1 - P  # drop the low tail holding 1 - P of the mass
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep | sta if sta is not None else keep


def nabla_attention(q, k, v, sta: torch.Tensor | None, P: float):
    """NABLA self-attention on flex_attention; q, k, v (B, S, heads, D) in fractal order, S % 64 == 0."""
    from torch.nn.attention.flex_attention import BlockMask
    q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    keep = nabla_block_mask(q, k, sta, P)
    counts = keep.sum(-1).to(torch.int32)
    indices = keep.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
    def mask_mod(b, h, q_idx, kv_idx):  # the same selection token by token; the eager (CPU)
        return keep[b, h, q_idx // NABLA_BLOCK, kv_idx // NABLA_BLOCK]  # path reads only this

    # every selected block is "full", so compiled kernels skip mask_mod and just skip blocks
    block_mask = BlockMask.from_kv_blocks(torch.zeros_like(counts), indices, counts, indices,
                                          BLOCK_SIZE=NABLA_BLOCK, mask_mod=mask_mod)
    out = _flex(q.device.type)(q, k, v, block_mask=block_mask)
    return out.transpose(1, 2)


@functools.cache
def _flex(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention
    if device_type == "cuda":
        return torch.compile(flex_attention, dynamic=False)
    return _quiet(flex_attention)


def _quiet(fn):
    """flex_attention warns on every eager (CPU) call that it is unfused; that is expected here."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
            return fn(*args, **kwargs)
    return call
