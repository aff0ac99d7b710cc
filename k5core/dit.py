"""The Kandinsky 5 diffusion transformer (CrossDiT), batched, with the official parameter names.

Text tokens pass through encoder blocks (self-attention + FF, 1D RoPE); visual tokens pass through
decoder blocks (self-attention with 3D RoPE, cross-attention to the text, FF). Every sub-layer is a
non-affine LayerNorm modulated by the time embedding (x * (1 + scale) + shift) and a gated residual.
Module and parameter names equal the keys of the official checkpoints (kandinsky/models/dit.py).
Norms, modulation and rotary run in fp32 and cast back, as the official code does under autocast.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention, nabla_attention, resolve_backend, sta_mask
from .tasks import Attention, DiTParams

NABLA_TILE = 8  # NABLA blocks are 1 x 8 x 8 patches of the token grid (NABLA_BLOCK = 64 tokens)


def sinusoid_freqs(dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """exp(-log(max_period) * i / dim) for i < dim: the frequencies of time and RoPE embeddings."""
    return torch.exp(-math.log(max_period) * torch.arange(dim, dtype=torch.float32) / dim)


def rope_rotations(angles: torch.Tensor) -> torch.Tensor:
    """2x2 rotation matrices [[cos, -sin], [sin, cos]] for each angle: (..., n) -> (..., n, 2, 2)."""
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2))


def apply_rotary(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of x (B, S, heads, D) by rope (B|1, S, 1, D/2, 2, 2), in fp32.
    Written out per matrix entry so no (..., D/2, 2, 2) product is materialised (4x less memory)."""
    pairs = x.float().unflatten(-1, (-1, 2))         # (B, S, heads, D/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out0 = rope[..., 0, 0] * x0 + rope[..., 0, 1] * x1
    out1 = rope[..., 1, 0] * x0 + rope[..., 1, 1] * x1
    return torch.stack([out0, out1], dim=-1).flatten(-2).type_as(x)


def linear_fp32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """layer(x) computed in fp32 with the weights upcast on the fly, as the official code runs the time
    embedding and modulation under fp32 autocast; bf16 weights stay bf16 in memory."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


def modulate(norm: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """norm(x) * (1 + scale) + shift in fp32, cast back to x's dtype."""
    return (norm(x.float()) * (scale.float() + 1.0) + shift.float()).type_as(x)


def gated_residual(x: torch.Tensor, out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + gate * out in fp32, cast back to x's dtype."""
    return (x.float() + gate.float() * out.float()).type_as(x)


class TimeEmbeddings(nn.Module):
    """Sinusoid of t*1000 (cos, sin) -> Linear -> SiLU -> Linear."""

    def __init__(self, model_dim: int, time_dim: int, max_period: float = 10000.0):
        super().__init__()
        self.half_dim, self.max_period = model_dim // 2, max_period
        self.in_layer = nn.Linear(model_dim, time_dim)
        self.activation = nn.SiLU()
        self.out_layer = nn.Linear(time_dim, time_dim)

    def forward(self, time: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, time_dim)
        args = torch.outer(time.float(), sinusoid_freqs(self.half_dim, self.max_period).to(time.device))
        emb = torch.cat([args.cos(), args.sin()], dim=-1)
        return linear_fp32(self.out_layer, self.activation(linear_fp32(self.in_layer, emb)))  # fp32


class TextEmbeddings(nn.Module):
    """Linear projection plus affine LayerNorm (used for Qwen tokens and for the pooled CLIP vector)."""

    def __init__(self, text_dim: int, model_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(text_dim, model_dim)
        self.norm = nn.LayerNorm(model_dim, elementwise_affine=True)

    def forward(self, text_embed: torch.Tensor) -> torch.Tensor:
        x = self.in_layer(text_embed)
        return self.norm(x).type_as(x)


class VisualEmbeddings(nn.Module):
    """Patchify (pt, ph, pw) channels-last, then a Linear to model_dim."""

    def __init__(self, visual_dim: int, model_dim: int, patch_size: tuple[int, int, int]):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.in_layer = nn.Linear(math.prod(patch_size) * visual_dim, model_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H, W, C) -> (B, T/pt, H/ph, W/pw, D)
        b, t, h, w, c = x.shape
        pt, ph, pw = self.patch_size
        x = x.view(b, t // pt, pt, h // ph, ph, w // pw, pw, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
        return self.in_layer(x.flatten(4, 7))


class RoPE1D(nn.Module):
    """Rotary angles for text positions 0..L-1 over the whole head dim."""

    def __init__(self, dim: int, max_pos: int = 1024, max_period: float = 10000.0):
        super().__init__()
        self.dim, self.max_pos, self.max_period = dim, max_pos, max_period

    def forward(self, length: int, device=None) -> torch.Tensor:  # -> (1, L, 1, D/2, 2, 2)
        if length > self.max_pos:
            raise ValueError(f"text has {length} tokens; the text RoPE covers {self.max_pos}")
        freqs = sinusoid_freqs(self.dim // 2, self.max_period).to(device)
        args = torch.outer(torch.arange(length, device=device).float(), freqs)
        return rope_rotations(args)[None, :, None]


class RoPE3D(nn.Module):
    """Rotary angles for (t, h, w) token positions; each axis owns a slice of the head dim and its
    positions are divided by the task's scale_factor."""

    def __init__(self, axes_dims, max_pos=(128, 128, 128), max_period: float = 10000.0):
        super().__init__()
        self.axes_dims, self.max_pos, self.max_period = tuple(axes_dims), tuple(max_pos), max_period

    def axis_angles(self, axis: int, n: int, scale: float, device) -> torch.Tensor:
        """Angles of positions 0..n-1 on one axis, divided by the axis' scale factor: (n, dim/2)."""
        if n > self.max_pos[axis]:
            raise ValueError(f"{n} latent positions on axis {axis}; the RoPE covers {self.max_pos[axis]}")
        freqs = sinusoid_freqs(self.axes_dims[axis] // 2, self.max_period).to(device)
        return torch.outer(torch.arange(n, device=device).float(), freqs) / scale

    def forward(self, shape, scale_factor=(1.0, 1.0, 1.0), device=None):  # -> (1, T, H, W, 1, D/2, 2, 2)
        t, h, w = shape
        at, ah, aw = (self.axis_angles(i, n, s, device) for i, (n, s) in enumerate(zip(shape, scale_factor)))
        args = torch.cat([at[:, None, None].expand(t, h, w, -1), ah[None, :, None].expand(t, h, w, -1),
                          aw[None, None, :].expand(t, h, w, -1)], dim=-1)
        return rope_rotations(args)[None, :, :, :, None]


class Modulation(nn.Module):
    """SiLU -> Linear(time_dim, n * model_dim), zero-initialised; computed in fp32."""

    def __init__(self, time_dim: int, model_dim: int, num_params: int):
        super().__init__()
        self.activation = nn.SiLU()
        self.out_layer = nn.Linear(time_dim, num_params * model_dim)
        nn.init.zeros_(self.out_layer.weight)
        nn.init.zeros_(self.out_layer.bias)

    def forward(self, time_embed: torch.Tensor) -> torch.Tensor:  # (B, time_dim) -> (B, 1, n * D) fp32
        return linear_fp32(self.out_layer, self.activation(time_embed.float()))[:, None]


class MultiheadAttention(nn.Module):
    """q/k/v projections, per-head RMSNorm on q and k, optional rotary, attention, out projection.
    Self-attention of the text and visual blocks and cross-attention share these names."""

    def __init__(self, num_channels: int, head_dim: int):
        super().__init__()
        self.num_heads = num_channels // head_dim
        self.to_query = nn.Linear(num_channels, num_channels)
        self.to_key = nn.Linear(num_channels, num_channels)
        self.to_value = nn.Linear(num_channels, num_channels)
        self.query_norm = nn.RMSNorm(head_dim)
        self.key_norm = nn.RMSNorm(head_dim)
        self.out_layer = nn.Linear(num_channels, num_channels)
        self.backend = "sdpa"

    def forward(self, x, context=None, rope=None, key_mask=None, nabla=None) -> torch.Tensor:
        context = x if context is None else context
        q = self.to_query(x).unflatten(-1, (self.num_heads, -1))       # (B, S, heads, hd)
        k = self.to_key(context).unflatten(-1, (self.num_heads, -1))
        v = self.to_value(context).unflatten(-1, (self.num_heads, -1))
        q = self.query_norm(q.float()).type_as(q)
        k = self.key_norm(k.float()).type_as(k)
        if rope is not None:
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        if nabla is not None:
            out = nabla_attention(q, k, v, nabla["sta"], nabla["P"])
        else:
            out = attention(q, k, v, key_mask, self.backend)
        return self.out_layer(out.flatten(-2))


class FeedForward(nn.Module):
    """Linear (no bias) -> GELU -> Linear (no bias)."""

    def __init__(self, dim: int, ff_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(dim, ff_dim, bias=False)
        self.activation = nn.GELU()
        self.out_layer = nn.Linear(ff_dim, dim, bias=False)

    def forward(self, x):
        return self.out_layer(self.activation(self.in_layer(x)))


class TransformerEncoderBlock(nn.Module):
    """Text block: modulated self-attention and FF (6 modulation parameters)."""

    def __init__(self, model_dim: int, time_dim: int, ff_dim: int, head_dim: int):
        super().__init__()
        self.text_modulation = Modulation(time_dim, model_dim, 6)
        self.self_attention_norm = nn.LayerNorm(model_dim, elementwise_affine=False)
        self.self_attention = MultiheadAttention(model_dim, head_dim)
        self.feed_forward_norm = nn.LayerNorm(model_dim, elementwise_affine=False)
        self.feed_forward = FeedForward(model_dim, ff_dim)

    def forward(self, x, time_embed, rope, text_mask=None):
        shift, scale, gate, ff_shift, ff_scale, ff_gate = self.text_modulation(time_embed).chunk(6, -1)
        out = self.self_attention(modulate(self.self_attention_norm, x, shift, scale), rope=rope,
                                  key_mask=text_mask)
        x = gated_residual(x, out, gate)
        out = self.feed_forward(modulate(self.feed_forward_norm, x, ff_shift, ff_scale))
        return gated_residual(x, out, ff_gate)


class TransformerDecoderBlock(nn.Module):
    """Visual block: modulated self-attention, cross-attention to the text, FF (9 parameters)."""

    def __init__(self, model_dim: int, time_dim: int, ff_dim: int, head_dim: int):
        super().__init__()
        self.visual_modulation = Modulation(time_dim, model_dim, 9)
        self.self_attention_norm = nn.LayerNorm(model_dim, elementwise_affine=False)
        self.self_attention = MultiheadAttention(model_dim, head_dim)
        self.cross_attention_norm = nn.LayerNorm(model_dim, elementwise_affine=False)
        self.cross_attention = MultiheadAttention(model_dim, head_dim)
        self.feed_forward_norm = nn.LayerNorm(model_dim, elementwise_affine=False)
        self.feed_forward = FeedForward(model_dim, ff_dim)

    def forward(self, x, text_embed, time_embed, rope, text_mask=None, nabla=None):
        params = self.visual_modulation(time_embed).chunk(9, -1)
        shift, scale, gate = params[0:3]
        out = self.self_attention(modulate(self.self_attention_norm, x, shift, scale), rope=rope,
                                  nabla=nabla)
        x = gated_residual(x, out, gate)
        shift, scale, gate = params[3:6]
        out = self.cross_attention(modulate(self.cross_attention_norm, x, shift, scale),
                                   context=text_embed, key_mask=text_mask)
        x = gated_residual(x, out, gate)
        shift, scale, gate = params[6:9]
        out = self.feed_forward(modulate(self.feed_forward_norm, x, shift, scale))
        return gated_residual(x, out, gate)


class OutLayer(nn.Module):
    """Modulated (shift, scale) non-affine LayerNorm, Linear to patch*channels, unpatchify."""

    def __init__(self, model_dim: int, time_dim: int, visual_dim: int, patch_size):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.modulation = Modulation(time_dim, model_dim, 2)
        self.norm = nn.LayerNorm(model_dim, elementwise_affine=False)
        self.out_layer = nn.Linear(model_dim, math.prod(patch_size) * visual_dim)

    def forward(self, x, time_embed):  # x (B, T, H, W, D) -> (B, C, T*pt, H*ph, W*pw)
        shift, scale = self.modulation(time_embed)[:, :, None, None].chunk(2, -1)
        x = self.out_layer(modulate(self.norm, x, shift, scale))
        b, t, h, w, _ = x.shape
        pt, ph, pw = self.patch_size
        x = x.view(b, t, h, w, -1, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(b, -1, t * pt, h * ph, w * pw)


class K5DiT(nn.Module):
    """Kandinsky 5 DiT. forward(x (B, C_in, T, H, W), timestep (B,) in [0, 1000], text_embed (B, L, Dt),
    pooled_text_embed (B, Dp), text_mask (B, L) bool) -> velocity (B, 16, T, H, W)."""

    def __init__(self, params: DiTParams, attention: Attention | None = None, backend: str = "sdpa"):
        super().__init__()
        self.params = params
        self.attention = attention or Attention()
        p, head_dim = params, params.head_dim
        self.time_embeddings = TimeEmbeddings(p.model_dim, p.time_dim)
        self.text_embeddings = TextEmbeddings(p.in_text_dim, p.model_dim)
        self.pooled_text_embeddings = TextEmbeddings(p.in_text_dim2, p.time_dim)
        self.visual_embeddings = VisualEmbeddings(p.visual_embed_dim, p.model_dim, p.patch_size)
        self.text_rope_embeddings = RoPE1D(head_dim)
        self.text_transformer_blocks = nn.ModuleList(
            TransformerEncoderBlock(p.model_dim, p.time_dim, p.ff_dim, head_dim)
            for _ in range(p.num_text_blocks))
        self.visual_rope_embeddings = RoPE3D(p.axes_dims)
        self.visual_transformer_blocks = nn.ModuleList(
            TransformerDecoderBlock(p.model_dim, p.time_dim, p.ff_dim, head_dim)
            for _ in range(p.num_visual_blocks))
        self.out_layer = OutLayer(p.model_dim, p.time_dim, p.out_visual_dim, p.patch_size)
        self.set_attention_backend(backend)

    def set_attention_backend(self, backend: str) -> None:
        """Choose the dense attention kernel of every block (checked for availability)."""
        backend = resolve_backend(backend)
        for m in self.modules():
            if isinstance(m, MultiheadAttention):
                m.backend = backend

    def compile_blocks(self, enabled: bool = True, backend: str = "inductor", mode: str | None = None) -> None:
        """torch.compile every transformer block in place (regional compilation: the same block code
        compiles once and serves all blocks; fuses the fp32 norm/modulation math and fp8 dequant).
        Hooks added later (LoRA) and block swap keep working; `enabled=False` restores eager blocks."""
        for block in (*self.text_transformer_blocks, *self.visual_transformer_blocks):
            if enabled:
                block.compile(backend=backend, mode=mode)
            else:
                block._compiled_call_impl = None  # what nn.Module.compile set

    def forward(self, x, timestep, text_embed, pooled_text_embed, text_mask=None,
                scale_factor=(1.0, 1.0, 1.0), sparse: Attention | None = None):
        self._check_input(x)
        if text_mask is not None and bool(text_mask.all()):
            text_mask = None  # nothing padded: the unmasked (fast-kernel) path, one sync per forward
        text, time_embed, text_rope = self.embed_text_and_time(text_embed, pooled_text_embed, timestep)
        for block in self.text_transformer_blocks:
            text = block(text, time_embed, text_rope, text_mask)
        visual = self.visual_embeddings(x.permute(0, 2, 3, 4, 1))      # (B, T, H, W, D)
        shape = visual.shape[1:4]
        rope = self.visual_rope_embeddings(shape, scale_factor, x.device)
        nabla = self.nabla_params(shape, sparse or self.attention, x.device)
        visual, rope = to_token_order(visual, rope, nabla is not None)
        visual = self.run_visual_blocks(visual, text, time_embed, rope, text_mask, nabla)
        visual = from_token_order(visual, shape, nabla is not None)
        return self.out_layer(visual, time_embed)

    def embed_text_and_time(self, text_embed, pooled_text_embed, timestep):
        """Project text tokens, build the time embedding (+ pooled CLIP) and the text RoPE."""
        text = self.text_embeddings(text_embed)
        time_embed = self.time_embeddings(timestep) + self.pooled_text_embeddings(pooled_text_embed)
        return text, time_embed, self.text_rope_embeddings(text.shape[1], text.device)

    block_runner = None  # k5core.offload's BlockRunner (block swap, gradient checkpointing) when set

    def run_visual_blocks(self, visual, text, time_embed, rope, text_mask, nabla):
        """Run the decoder blocks in order; memory managers (k5core.offload) wrap this loop."""
        if self.block_runner is not None:
            return self.block_runner(self.visual_transformer_blocks, visual, text, time_embed, rope,
                                     text_mask, nabla)
        for block in self.visual_transformer_blocks:
            visual = block(visual, text, time_embed, rope, text_mask, nabla)
        return visual

    def nabla_params(self, shape, attn: Attention, device):
        """STA mask and P for NABLA self-attention, or None for dense attention."""
        if attn.type != "nabla":
            return None
        t, h, w = shape
        if h % NABLA_TILE or w % NABLA_TILE:
            raise ValueError(f"NABLA attention needs the token grid's height and width divisible by "
                             f"{NABLA_TILE} (got {h}x{w} tokens: use sizes divisible by "
                             f"{NABLA_TILE * 16} pixels)")
        sta = sta_mask(t, h // NABLA_TILE, w // NABLA_TILE, attn.wT, attn.wH, attn.wW, torch.device(device))
        return {"sta": sta if attn.add_sta else None, "P": attn.P}

    def _check_input(self, x):
        expected = self.params.visual_embed_dim
        if x.ndim != 5 or x.shape[1] != expected:
            raise ValueError(f"DiT input must be (B, {expected}, T, H, W); got {tuple(x.shape)}")
        pt, ph, pw = self.params.patch_size
        if x.shape[2] % pt or x.shape[3] % ph or x.shape[4] % pw:
            raise ValueError(f"latent T, H, W must be divisible by the patch size {self.params.patch_size}; "
                             f"got {tuple(x.shape[2:])}")


def to_token_order(visual, rope, fractal: bool):
    """Flatten (B, T, H, W, D) tokens to (B, S, D): row-major, or NABLA's fractal order where each
    run of 64 tokens is one 1 x 8 x 8 tile. The RoPE (1, T, H, W, 1, ...) is ordered the same way."""
    if not fractal:
        return visual.flatten(1, 3), rope.flatten(1, 3)
    return _tiles(visual), _tiles(rope)


def from_token_order(visual, shape, fractal: bool):
    """Inverse of to_token_order for the visual tokens: (B, S, D) -> (B, T, H, W, D)."""
    t, h, w = shape
    if not fractal:
        return visual.unflatten(1, (t, h, w))
    n = NABLA_TILE
    x = visual.unflatten(1, (t, h // n, w // n, n, n))        # (B, T, h', w', 8, 8, D)
    return x.permute(0, 1, 2, 4, 3, 5, 6).reshape(visual.shape[0], t, h, w, -1)


def _tiles(x):
    b, t, h, w = x.shape[:4]
    n = NABLA_TILE
    x = x.reshape(b, t, h // n, n, w // n, n, *x.shape[4:]).transpose(3, 4)  # (B, T, h', w', 8, 8, ...)
    return x.flatten(1, 5)

