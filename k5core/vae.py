"""The VAEs of Kandinsky 5: HunyuanVideo's causal 3D VAE (video models) and Flux's 2D VAE (Lite T2I/I2I).

One interface for both, `K5VAE`, made by `load_vae(path)` from any file users have:

| file                                             | layout    | kind    |
| ------------------------------------------------ | --------- | ------- |
| tencent/HunyuanVideo `vae/pytorch_model.pt`      | original  | hunyuan |
| ComfyUI `hunyuan_video_vae_bf16.safetensors`     | comfy     | hunyuan |
| diffusers `AutoencoderKLHunyuanVideo` folder     | diffusers | hunyuan |
| diffusers `AutoencoderKL` (Flux) folder          | diffusers | flux    |
| ComfyUI / BFL `ae.safetensors`                   | comfy     | flux    |

The original HunyuanVideo checkpoint already uses diffusers' parameter names (diffusers' own conversion
script renames nothing), so "original" and "diffusers" differ only in wrapping ({"state_dict": ...},
"vae." prefixes) and container (.pt vs folder). ComfyUI files use the LDM names (`decoder.up.3.block.0`,
`mid.attn_1.q`); `comfy_to_diffusers_key` maps them.

The runtime network is diffusers' `AutoencoderKLHunyuanVideo` / `AutoencoderKL` (well kept, and the
parity oracle of this project). k5core owns format conversion, latent scaling and tiling: the tiler
below calls the networks' encoder/decoder on tiles and blends the results; diffusers' own tiling is
not used.

Latent conventions (as the official Kandinsky 5 pipelines), `mean` being the posterior mean:
    hunyuan: latent = mean * 0.476986;  (B, 3, F, H, W), F = 4k+1 -> (B, 16, (F-1)/4+1, H/8, W/8)
    flux:    latent = mean * 0.3611;    (B, 3, F, H, W) -> (B, 16, F, H/8, W/8), each frame an image
The Flux config's shift_factor (0.1159) is not applied: kandinsky-5's generation_utils scales by
`vae.config.scaling_factor` only, and the Lite T2I/I2I DiT was trained on those latents.
"""
from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from k5core.files import read_safetensors_header

HUNYUAN_SCALING_FACTOR = 0.476986
FLUX_SCALING_FACTOR = 0.3611
FLUX_CONFIG_SHIFT_FACTOR = 0.1159  # in Flux's config; Kandinsky 5 does not apply it (see module doc)
LATENT_CHANNELS = 16
SPATIAL_RATIO = 8

ProgressFn = Callable[[int, int, str], None]


# ----------------------------------------------------------------------------------------------
# Tiling settings
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VAETiling:
    """How encode/decode split their work; all sizes in pixels / pixel frames.

    Defaults (diffusers' tile geometry) are sized for 12 GB cards, from CPU measurements (no GPU was
    at hand): the real decoder peaks at 6.6-8 KB per decoded pixel-frame in fp32 (full width, 5-9 frames
    at 64-128 px) and the bench's width/4 copy at 1.5 KB (x4 = 6 KB), so ~3-4 KB in bf16. One default
    tile is 17 x 256 x 256 = 1.1 M pixel-frames: ~4.5 GB of activations, plus 0.2 GB for the mid
    attention's N x N mask (N = 5 x 32 x 32 tokens) and 0.5 GB of bf16 weights. Untiled, a 5 s
    512x768 clip would need ~190 GB of activations and a 254 GB mask, on any card. With 24 GB or more,
    spatial_tile=512 (two tiles at 512x768, ~21 GB) cuts the compute overhead from ~2.8x to ~1.9x.
    Inputs no larger than one tile run in one piece.
    """
    enabled: bool = True
    spatial_tile: int = 256      # side of a square tile, multiple of 8
    spatial_overlap: int = 64    # pixels shared by neighbouring tiles, multiple of 8
    temporal_chunk: int = 17     # pixel frames per chunk (4k+1); for Flux: frames per batch
    temporal_overlap: int = 4    # pixel frames blended between chunks, multiple of 4 (Flux: unused)

    def check(self) -> "VAETiling":
        """Raise ValueError naming the field when a setting cannot work."""
        def need(ok: bool, field: str, what: str, value):
            if not ok:
                raise ValueError(f"VAETiling.{field}: expected {what}, got {value!r}")
        need(self.spatial_tile >= 32 and self.spatial_tile % SPATIAL_RATIO == 0,
             "spatial_tile", "a multiple of 8 >= 32", self.spatial_tile)
        need(0 <= self.spatial_overlap < self.spatial_tile and self.spatial_overlap % SPATIAL_RATIO == 0,
             "spatial_overlap", "a multiple of 8 in [0, spatial_tile)", self.spatial_overlap)
        need(self.temporal_chunk >= 5 and self.temporal_chunk % 4 == 1,
             "temporal_chunk", "4k+1 frames with k >= 1 (5, 9, 13, 17, ...)", self.temporal_chunk)
        need(self.temporal_overlap >= 0 and self.temporal_overlap % 4 == 0
             and self.temporal_overlap // 4 + 2 <= (self.temporal_chunk - 1) // 4 + 1,
             "temporal_overlap", "a multiple of 4 leaving each chunk at least one new latent frame",
             self.temporal_overlap)
        return self


def nearest_valid_frames(num_frames: int, temporal_ratio: int = 4) -> int:
    """Largest frame count <= num_frames that the causal VAE accepts (4k+1); for trimming clips."""
    if num_frames < 1:
        raise ValueError(f"num_frames: expected >= 1, got {num_frames}")
    return (num_frames - 1) // temporal_ratio * temporal_ratio + 1


# ----------------------------------------------------------------------------------------------
# The VAE object
# ----------------------------------------------------------------------------------------------
class K5VAE:
    """A loaded VAE: scaled encode/decode of (B, C, F, H, W) tensors with tiling.

    Tiling: `set_tiling(...)` sets this object's default (`VAETiling()` at load); pass
    `tiling=VAETiling(...)` to `encode`/`decode` to override it for one call.
    Results come back as float32 on the input's device; only tiles visit the VAE's device.
    """

    def __init__(self, network: torch.nn.Module, kind: str, source: str):
        self.network = network.eval().requires_grad_(False)
        self.kind = kind                                    # "hunyuan" | "flux"
        self.source = source                                # the file or folder it came from
        self.temporal_ratio = 4 if kind == "hunyuan" else 1
        self.spatial_ratio = SPATIAL_RATIO
        self.latent_channels = LATENT_CHANNELS
        self.scaling_factor = float(network.config.scaling_factor)
        self.shift_factor = 0.0                             # Kandinsky 5 uses no shift (module doc)
        self.tiling = VAETiling()

    # -- placement -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.network.parameters()).dtype

    def to(self, device=None, dtype: torch.dtype | None = None) -> "K5VAE":
        """Move (and optionally cast) the network; returns self."""
        self.network.to(device=device, dtype=dtype)
        return self

    def set_tiling(self, enabled: bool = True, spatial_tile: int | None = None,
                   spatial_overlap: int | None = None, temporal_chunk: int | None = None,
                   temporal_overlap: int | None = None) -> VAETiling:
        """Change this VAE's default tiling; unnamed settings keep their value. Returns the new settings."""
        changes = dict(spatial_tile=spatial_tile, spatial_overlap=spatial_overlap,
                       temporal_chunk=temporal_chunk, temporal_overlap=temporal_overlap)
        changes = {k: v for k, v in changes.items() if v is not None}
        self.tiling = replace(self.tiling, enabled=enabled, **changes).check()
        return self.tiling

    # -- frame arithmetic ------------------------------------------------------------------------
    def latent_frames(self, num_frames: int) -> int:
        """T for F pixel frames: (F-1)/4+1 for hunyuan, F for flux."""
        return (num_frames - 1) // self.temporal_ratio + 1

    def pixel_frames(self, latent_frames: int) -> int:
        """F for T latent frames: 4(T-1)+1 for hunyuan, T for flux."""
        return (latent_frames - 1) * self.temporal_ratio + 1

    # -- encode / decode -------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, video: torch.Tensor, progress: ProgressFn | None = None,
               should_stop: Callable[[], bool] | None = None,
               tiling: VAETiling | None = None) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> scaled latent (B, 16, T, H/8, W/8); posterior mean, deterministic."""
        self._check_video(video)
        b, _, f, h, w = video.shape
        t = self.latent_frames(f)
        plan = self._plan(tiling, (t, h // 8, w // 8), decode=False)
        mean = _run_tiles(self._encode_tile, video, (b, LATENT_CHANNELS, t, h // 8, w // 8), plan,
                          self.device, self.dtype, progress, should_stop, "VAE encode")
        return (mean - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, progress: ProgressFn | None = None,
               should_stop: Callable[[], bool] | None = None,
               tiling: VAETiling | None = None) -> torch.Tensor:
        """Scaled latent (B, 16, T, h, w) -> video (B, 3, F, 8h, 8w) clamped to [-1, 1]."""
        self._check_latent(latent)
        b, _, t, h, w = latent.shape
        z = latent.float() / self.scaling_factor + self.shift_factor
        plan = self._plan(tiling, (t, h, w), decode=True)
        video = _run_tiles(self._decode_tile, z, (b, 3, self.pixel_frames(t), h * 8, w * 8), plan,
                           self.device, self.dtype, progress, should_stop, "VAE decode")
        return video.clamp_(-1.0, 1.0)

    # -- one tile through the network ------------------------------------------------------------
    def _encode_tile(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, f, H, W) -> posterior mean (B, 16, t, H/8, W/8), unscaled."""
        net = self.network
        if self.kind == "flux":
            return _framewise(lambda img: _flux_moments(net, img)[:, :LATENT_CHANNELS], x)
        return net.quant_conv(net.encoder(x))[:, :LATENT_CHANNELS]

    def _decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent (B, 16, t, h, w) -> (B, 3, f, 8h, 8w)."""
        net = self.network
        if self.kind == "flux":
            def one(img):
                if net.post_quant_conv is not None:
                    img = net.post_quant_conv(img)
                return net.decoder(img)
            return _framewise(one, z)
        return net.decoder(net.post_quant_conv(z))

    # -- checks and planning ---------------------------------------------------------------------
    def _check_video(self, video: torch.Tensor) -> None:
        """Raise ValueError on a video this VAE cannot encode, saying what to do."""
        if not isinstance(video, torch.Tensor) or video.ndim != 5 or video.shape[1] != 3:
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"encode: expected video (B, 3, F, H, W), got {shape} "
                             "(an image is F = 1: use image.unsqueeze(2))")
        if not video.is_floating_point():
            raise ValueError(f"encode: expected float values in [-1, 1], got dtype {video.dtype} "
                             "(uint8 frames: x.float() / 127.5 - 1)")
        _, _, f, h, w = video.shape
        if f % self.temporal_ratio != 1 and self.temporal_ratio > 1:
            raise ValueError(f"encode: the HunyuanVideo VAE needs 4k+1 frames, got {f}; "
                             f"trim to {nearest_valid_frames(f)} (k5core.vae.nearest_valid_frames)")
        if h % 8 or w % 8 or h == 0 or w == 0:
            raise ValueError(f"encode: height and width must be multiples of 8, got {h}x{w} "
                             "(the Kandinsky 5 DiT further needs multiples of 16)")
        lo, hi = float(video.min()), float(video.max())
        if lo < -1.5 or hi > 1.5:
            raise ValueError(f"encode: expected values in [-1, 1], got [{lo:.3g}, {hi:.3g}]")

    def _check_latent(self, latent: torch.Tensor) -> None:
        """Raise ValueError on a latent of the wrong rank or channel count."""
        if (not isinstance(latent, torch.Tensor) or latent.ndim != 5 or latent.shape[1] != LATENT_CHANNELS
                or min(latent.shape[2:]) < 1):
            shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
            raise ValueError(f"decode: expected latent (B, {LATENT_CHANNELS}, T, h, w), got {shape}")

    def _plan(self, tiling: VAETiling | None, latent_thw: tuple[int, int, int], decode: bool):
        """Windows along (time, height, width) for the given latent size."""
        s = (tiling or self.tiling).check()
        t, h, w = latent_thw
        if not s.enabled:
            return [plan_axis(n, n, 0, r, c, decode) for n, r, c in
                    ((t, self.temporal_ratio, self.kind == "hunyuan"), (h, 8, False), (w, 8, False))]
        tile, overlap = s.spatial_tile // 8, s.spatial_overlap // 8
        if self.kind == "hunyuan":
            time_axis = plan_axis(t, (s.temporal_chunk - 1) // 4 + 1, s.temporal_overlap // 4, 4, True, decode)
        else:  # Flux frames are independent images: chunks are batches, no overlap needed
            time_axis = plan_axis(t, s.temporal_chunk, 0, 1, False, decode)
        return [time_axis, plan_axis(h, tile, overlap, 8, False, decode),
                plan_axis(w, tile, overlap, 8, False, decode)]


def _flux_moments(net, img: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> Flux posterior moments (N, 32, H/8, W/8)."""
    h = net.encoder(img)
    return net.quant_conv(h) if net.quant_conv is not None else h


def _framewise(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D network to every frame: (B, C, F, H, W) -> (B, C', F, H', W')."""
    b, _, f = x.shape[:3]
    y = fn(x.transpose(1, 2).flatten(0, 1))                 # (B*F, C', H', W')
    return y.unflatten(0, (b, f)).transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Tiling: windows along each axis, blend weights, and the tile loop
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """One tile along one axis: what it reads, where it writes, and with which blend weights."""
    src: slice             # input positions read (latent units when decoding, pixels when encoding)
    dst: slice             # output positions written
    crop: slice            # the part of the tile's own output that lands on dst
    weight: torch.Tensor   # (len(dst),) float32; over all windows the weights sum to 1 everywhere


def _pixel_start(v: int, ratio: int, causal: bool) -> int:
    """First pixel position covered by latent position v (causal time: latent 0 is frame 0 alone)."""
    return ratio * v - (ratio - 1) if causal and v > 0 else ratio * v


def _window_starts(n: int, size: int, overlap: int) -> list[int]:
    """Evenly spread starts of equal windows of `size` over n positions, sharing >= overlap."""
    if n <= size:
        return [0]
    count = math.ceil((n - size) / (size - overlap)) + 1
    return [i * (n - size) // (count - 1) for i in range(count)]


def plan_axis(n: int, size: int, overlap: int, ratio: int, causal: bool, decode: bool) -> list[Window]:
    """Windows covering n latent positions along one axis, `size` latent positions each.

    A causal VAE treats the first latent frame of every chunk as a lone first frame, so chunks after
    the first drop it: they overlap the previous chunk by one more latent frame than asked, and their
    valid output starts one latent frame later.
    """
    spans = []
    for s in _window_starts(n, size, overlap + (1 if causal else 0)):
        e = min(s + size, n)
        v = s + 1 if causal and s > 0 else s                # first valid latent position
        chunk_px = ratio * s                                 # pixel position of the tile's first output/input
        end_px = _pixel_start(e, ratio, causal)
        if decode:
            src, dst = slice(s, e), slice(_pixel_start(v, ratio, causal), end_px)
            crop = slice(dst.start - chunk_px, end_px - chunk_px)
        else:
            src, dst, crop = slice(chunk_px, end_px), slice(v, e), slice(v - s, e - s)
        spans.append((src, dst, crop))
    out_len = _pixel_start(n, ratio, causal) if decode else n
    weights = _blend_weights([d for _, d, _ in spans], out_len)
    return [Window(src, dst, crop, w) for (src, dst, crop), w in zip(spans, weights)]


def _blend_weights(dsts: list[slice], out_len: int) -> list[torch.Tensor]:
    """Linear ramps across each overlap with a neighbour, normalised so all windows sum to 1."""
    weights = []
    for i, d in enumerate(dsts):
        w = torch.ones(d.stop - d.start)
        if i > 0 and dsts[i - 1].stop > d.start:
            ov = dsts[i - 1].stop - d.start
            w[:ov] *= (torch.arange(ov) + 0.5) / ov
        if i + 1 < len(dsts) and d.stop > dsts[i + 1].start:
            ov = d.stop - dsts[i + 1].start
            w[-ov:] *= (torch.arange(ov, 0, -1) - 0.5) / ov
        weights.append(w)
    total = torch.zeros(out_len)
    for d, w in zip(dsts, weights):
        total[d] += w
    if not bool((total > 0).all()):
        raise AssertionError(f"tiling left output positions uncovered: {dsts} over {out_len}")
    return [w / total[d] for d, w in zip(dsts, weights)]


def _run_tiles(fn, x: torch.Tensor, out_shape: tuple, plan: list[list[Window]], device, dtype,
               progress: ProgressFn | None, should_stop, label: str) -> torch.Tensor:
    """Run fn on every (time, height, width) tile of x and blend the results into one tensor.

    x: (B, C, ...) on any device; tiles go to (device, dtype); the blended result is float32 on x's device.
    """
    out = torch.zeros(out_shape, dtype=torch.float32, device=x.device)
    tiles = list(itertools.product(*plan))
    for k, (wt, wh, ww) in enumerate(tiles):
        if should_stop is not None and should_stop():
            raise InterruptedError(f"{label} stopped at tile {k + 1}/{len(tiles)}")
        y = fn(x[:, :, wt.src, wh.src, ww.src].to(device=device, dtype=dtype))
        y = y[:, :, wt.crop, wh.crop, ww.crop].float()
        expected = (wt.dst.stop - wt.dst.start, wh.dst.stop - wh.dst.start, ww.dst.stop - ww.dst.start)
        if tuple(y.shape[2:]) != expected:
            raise RuntimeError(f"{label}: tile output {tuple(y.shape[2:])} != expected {expected} "
                               f"for input {tuple(x[:, :, wt.src, wh.src, ww.src].shape)}")
        weight = (wt.weight[:, None, None] * wh.weight[None, :, None] * ww.weight[None, None, :])
        out[:, :, wt.dst, wh.dst, ww.dst] += (y * weight.to(y.device)).to(out.device)
        if progress is not None:
            progress(k + 1, len(tiles), f"{label} tile {k + 1}/{len(tiles)}")
    return out


# ----------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------
TORCH_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin"}
KNOWN_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "pytorch_model.pt")


def load_vae(path: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> K5VAE:
    """Load a HunyuanVideo or Flux VAE from a file or folder in any layout users have (module doc)."""
    weights, config = _resolve(Path(path))
    state = _read_tensors(weights) if _is_torch_file(weights) else None   # a .pt must be read whole
    shapes = _safetensors_shapes(weights) if state is None else {k: tuple(v.shape) for k, v in state.items()}
    kind, layout = detect_vae(shapes, weights)
    _check_config_kind(config, kind, weights)
    state = _read_tensors(weights) if state is None else state
    if layout == "comfy":
        n_levels = _count_levels(state, "decoder.up.")
        state = {comfy_to_diffusers_key(k, n_levels): _attn_to_linear(k, v) for k, v in state.items()}
    if kind == "hunyuan":
        class_name, kwargs = "AutoencoderKLHunyuanVideo", _hunyuan_config(state, config, weights)
    else:
        class_name, kwargs = "AutoencoderKL", _flux_config(state, config, weights)
    network = _build(class_name, kwargs, state, dtype, weights)
    return K5VAE(network.to(device=device), kind, str(path))


def _resolve(path: Path) -> tuple[Path, dict | None]:
    """(weights file, config dict or None) for a file, a VAE folder or a pipeline folder with vae/."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: VAE file or folder not found")
    if path.is_dir():
        if not (path / "config.json").exists() and (path / "vae").is_dir():
            path = path / "vae"                              # a diffusers pipeline root
        for name in KNOWN_WEIGHT_NAMES:
            if (path / name).is_file():
                return path / name, _read_config(path / "config.json")
        raise FileNotFoundError(f"{path}: folder has none of {', '.join(KNOWN_WEIGHT_NAMES)}")
    # a sibling config.json is trusted only next to the canonical file names of a model folder
    config = _read_config(path.parent / "config.json") if path.name in KNOWN_WEIGHT_NAMES else None
    return path, config


def _read_config(path: Path) -> dict | None:
    """A folder's config.json as a dict (None when absent)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: config.json is not valid JSON ({e})") from None


def _is_torch_file(path: Path) -> bool:
    """True for torch.save files (zip archives, or a .pt/.pth/.ckpt/.bin name)."""
    with open(path, "rb") as f:
        magic = f.read(2)
    return magic == b"PK" or path.suffix.lower() in TORCH_SUFFIXES


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape from the header alone, so a 40 GB DiT passed by mistake is not read."""
    header, _ = read_safetensors_header(path)
    return _strip_prefix({k: tuple(v["shape"]) for k, v in header.items()})


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a VAE file, unwrapped from {"state_dict": ...} and "vae." prefixes."""
    if _is_torch_file(path):
        return _strip_prefix(_unwrap(_torch_load(path), path))
    read_safetensors_header(path)                            # clear error when truncated
    from safetensors.torch import load_file
    return _strip_prefix(load_file(str(path)))


def _torch_load(path: Path):
    """torch.load with weights_only=True (memory-mapped when possible), errors naming the file."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a file-format boundary: truncated zips, pickles, foreign data
        raise ValueError(f"{path}: cannot read as a torch checkpoint with weights_only=True "
                         f"(truncated or not a checkpoint?): {type(e).__name__}: {e}") from None


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: plain, or under "state_dict" / "model" / "module"."""
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path}: checkpoint holds no tensors (keys: {list(obj)[:5]})")
    return tensors


def _strip_prefix(sd: dict) -> dict:
    """Drop a "vae." / "first_stage_model." prefix when the VAE sits inside a bigger checkpoint."""
    if any(k.startswith(("encoder.", "decoder.")) for k in sd):
        return sd
    for prefix in ("vae.", "first_stage_model."):
        inner = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if any(k.startswith("decoder.") for k in inner):
            return inner
    return sd


# ----------------------------------------------------------------------------------------------
# Layout detection and key conversion
# ----------------------------------------------------------------------------------------------
def detect_vae(shapes: dict[str, tuple], path: Path | str = "<state dict>") -> tuple[str, str]:
    """(kind, layout) from parameter names and shapes: kind hunyuan|flux, layout diffusers|comfy."""
    key3d, key2d = "decoder.conv_in.conv.weight", "decoder.conv_in.weight"
    if key3d in shapes:
        kind, channels = "hunyuan", shapes[key3d][1]
    elif key2d in shapes and len(shapes[key2d]) == 4:
        kind, channels = "flux", shapes[key2d][1]
    else:
        raise ValueError(f"{path}: not a HunyuanVideo or Flux VAE (no decoder.conv_in weight); "
                         f"{_guess_what(shapes)}")
    if channels != LATENT_CHANNELS:
        hint = {4: " (an SD1.x/SDXL VAE)", 32: " (a HunyuanVideo 1.5 / Flux 2 VAE)"}.get(channels, "")
        raise ValueError(f"{path}: decoder.conv_in expects {channels} latent channels{hint}; "
                         f"Kandinsky 5 needs a {LATENT_CHANNELS}-channel HunyuanVideo or Flux VAE")
    if any(k.startswith("decoder.up_blocks.") for k in shapes):
        return kind, "diffusers"
    if any(k.startswith("decoder.up.") for k in shapes):
        return kind, "comfy"
    raise ValueError(f"{path}: decoder has neither up_blocks (diffusers) nor up (ComfyUI) parameters")


def _guess_what(shapes: dict) -> str:
    """A phrase saying what a non-VAE file looks like, for error messages."""
    keys = list(shapes)
    signs = [("visual_transformer_blocks", "it looks like a Kandinsky 5 DiT: load it as a diffusion model"),
             ("diffusion_model.", "it looks like a diffusion model checkpoint"),
             ("transformer_blocks", "it looks like a diffusion transformer"),
             ("embed_tokens", "it looks like a text encoder (Qwen/LLM): load it as a text encoder"),
             ("text_model.", "it looks like a CLIP text encoder: load it as a text encoder")]
    for needle, phrase in signs:
        if any(needle in k for k in keys):
            return phrase
    return f"first keys: {keys[:3]}"


_COMFY_RULES = [  # (LDM / ComfyUI pattern, diffusers replacement); "{up}" is filled per key
    (r"^(encoder|decoder)\.mid\.block_(\d+)\.", lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}."),
    (r"^(encoder|decoder)\.mid\.attn_1\.norm\.", lambda m: f"{m[1]}.mid_block.attentions.0.group_norm."),
    (r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.", lambda m: f"{m[1]}.mid_block.attentions.0.to_{m[2]}."),
    (r"^(encoder|decoder)\.mid\.attn_1\.proj_out\.", lambda m: f"{m[1]}.mid_block.attentions.0.to_out.0."),
    (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", lambda m: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}."),
    (r"^encoder\.down\.(\d+)\.downsample\.", lambda m: f"encoder.down_blocks.{m[1]}.downsamplers.0."),
    (r"^(encoder|decoder)\.norm_out\.", lambda m: f"{m[1]}.conv_norm_out."),
]


def comfy_to_diffusers_key(key: str, n_levels: int) -> str:
    """Map one ComfyUI/LDM VAE parameter name to diffusers' (decoder levels are numbered in reverse)."""
    for pattern, repl in _COMFY_RULES:
        key = re.sub(pattern, repl, key)
    key = re.sub(r"^decoder\.up\.(\d+)\.block\.(\d+)\.",
                 lambda m: f"decoder.up_blocks.{n_levels - 1 - int(m[1])}.resnets.{m[2]}.", key)
    key = re.sub(r"^decoder\.up\.(\d+)\.upsample\.",
                 lambda m: f"decoder.up_blocks.{n_levels - 1 - int(m[1])}.upsamplers.0.", key)
    return key.replace(".nin_shortcut.", ".conv_shortcut.")


def diffusers_to_comfy_key(key: str, n_levels: int) -> str:
    """Inverse of comfy_to_diffusers_key (used to write ComfyUI-layout files)."""
    rules = [
        (r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", lambda m: f"{m[1]}.mid.attn_1.norm."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_(q|k|v)\.", lambda m: f"{m[1]}.mid.attn_1.{m[2]}."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", lambda m: f"{m[1]}.mid.attn_1.proj_out."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"encoder.down.{m[1]}.block.{m[2]}."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"encoder.down.{m[1]}.downsample."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
         lambda m: f"decoder.up.{n_levels - 1 - int(m[1])}.block.{m[2]}."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
         lambda m: f"decoder.up.{n_levels - 1 - int(m[1])}.upsample."),
        (r"^(encoder|decoder)\.conv_norm_out\.", lambda m: f"{m[1]}.norm_out."),
    ]
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key.replace(".conv_shortcut.", ".nin_shortcut.")


def _attn_to_linear(key: str, value: torch.Tensor) -> torch.Tensor:
    """ComfyUI stores the mid attention q/k/v/proj_out as 1x1 convs (C, C, 1, 1[, 1]); diffusers as Linear."""
    if re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", key) and value.ndim > 2:
        return value.reshape(value.shape[0], value.shape[1])
    return value


def _count_levels(sd: dict, prefix: str) -> int:
    """Number of resolution levels: distinct indices after `prefix` (e.g. decoder.up.N)."""
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


# ----------------------------------------------------------------------------------------------
# Network configs (structure from the weights; only what weights cannot tell from config.json)
# ----------------------------------------------------------------------------------------------
def _structure(sd: dict, conv: str, path: Path) -> dict:
    """Widths, depth and attention of an encoder/decoder pair, read from parameter shapes."""
    n = _count_levels(sd, "encoder.down_blocks.")
    widths = [sd[f"encoder.down_blocks.{i}.resnets.0.{conv}"].shape[0] for i in range(n)]
    layers = _count_levels(sd, "encoder.down_blocks.0.resnets.")
    if n != 4:
        raise ValueError(f"{path}: expected 4 encoder levels (8x spatial compression), found {n}")
    return dict(block_out_channels=tuple(widths), layers_per_block=layers,
                latent_channels=LATENT_CHANNELS, in_channels=3, out_channels=3,
                mid_block_add_attention="encoder.mid_block.attentions.0.to_q.weight" in sd)


def _groups(config: dict | None, widths) -> int:
    """GroupNorm groups: from config.json, else 32 (every released file) or gcd(32, widths) for narrow ones."""
    if config and "norm_num_groups" in config:
        return int(config["norm_num_groups"])
    return math.gcd(32, *widths)


def _hunyuan_config(sd: dict, config: dict | None, path: Path) -> dict:
    """AutoencoderKLHunyuanVideo kwargs; config.json may be diffusers' or the original (AutoencoderKLCausal3D)."""
    out = _structure(sd, "conv1.conv.weight", path)
    config = config or {}
    temporal = config.get("temporal_compression_ratio", config.get("time_compression_ratio", 4))
    if temporal != 4 or config.get("spatial_compression_ratio", 8) != 8:
        raise ValueError(f"{path}: config says temporal/spatial compression {temporal}/"
                         f"{config.get('spatial_compression_ratio')}, expected 4/8")
    out.update(norm_num_groups=_groups(config, out["block_out_channels"]),
               scaling_factor=float(config.get("scaling_factor", HUNYUAN_SCALING_FACTOR)),
               act_fn=config.get("act_fn", "silu"))
    return out


def _flux_config(sd: dict, config: dict | None, path: Path) -> dict:
    """AutoencoderKL kwargs for the Flux VAE (16 channels, no quant convs)."""
    out = _structure(sd, "conv1.weight", path)
    n = len(out["block_out_channels"])
    config = config or {}
    out.update(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
               norm_num_groups=_groups(config, out["block_out_channels"]),
               scaling_factor=float(config.get("scaling_factor", FLUX_SCALING_FACTOR)),
               shift_factor=config.get("shift_factor", FLUX_CONFIG_SHIFT_FACTOR),
               act_fn=config.get("act_fn", "silu"),
               use_quant_conv="quant_conv.weight" in sd, use_post_quant_conv="post_quant_conv.weight" in sd)
    return out


def _check_config_kind(config: dict | None, kind: str, path: Path) -> None:
    """A folder's config.json must name a class of the kind the weights show."""
    name = (config or {}).get("_class_name")
    expected = {"hunyuan": ("AutoencoderKLHunyuanVideo", "AutoencoderKLCausal3D"), "flux": ("AutoencoderKL",)}
    if name is not None and name not in expected[kind]:
        raise ValueError(f"{path}: config.json _class_name is {name!r} but the weights are a {kind} VAE "
                         f"(expected one of {expected[kind]})")


def _build(class_name: str, config: dict, sd: dict, dtype: torch.dtype, path: Path) -> torch.nn.Module:
    """Create the diffusers network without allocating, then adopt the file's tensors."""
    import diffusers  # imported here: importing diffusers takes seconds, and ComfyUI imports k5core at start

    with torch.device("meta"):
        network = getattr(diffusers, class_name)(**config)
    expected = network.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: parameters do not match a {class_name} with {config['block_out_channels']}: "
                         f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                         f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(f"{path}: {k} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}")
    network.load_state_dict({k: sd[k].to(dtype) for k in expected}, strict=True, assign=True)
    return network
