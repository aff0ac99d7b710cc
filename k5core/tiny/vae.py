"""Tiny random VAEs written in every layout users have, all holding the same weights.

The tiny networks keep the real structure (4 levels, 2 resnets per encoder level, mid attention), so
their files carry exactly the parameter names of the real files; only the widths are small
(8/8/16/16), so encoding and decoding a 9-frame 64x64 clip takes milliseconds on a CPU.
Every parameter, norms included, is random: a layout bug that swaps two tensors changes the output.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from k5core.files import atomic_path, atomic_write_text, save_safetensors
from k5core.tiny import LATENT_CHANNELS
from k5core.vae import FLUX_CONFIG_SHIFT_FACTOR, FLUX_SCALING_FACTOR, HUNYUAN_SCALING_FACTOR, \
    diffusers_to_comfy_key

TINY_WIDTHS = (8, 8, 16, 16)
TINY_GROUPS = 8            # = gcd(32, widths): what load_vae assumes for files without config.json
TINY_LAYERS = 2            # as the real VAEs, so the key sets match the real files
RESIDUAL_SCALE = 0.2       # residual branches end small, as in trained networks, so outputs are not chaotic


def _randomize(network: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter a random value at a scale that keeps activations in a sane range."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(network.named_parameters()):
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                branch_end = name.endswith(("conv2.conv.weight", "conv2.weight", "to_out.0.weight"))
                scale = RESIDUAL_SCALE if branch_end else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * scale / fan_in ** 0.5)
    return network.eval()


def tiny_hunyuan_network(seed: int = 0):
    """A random diffusers AutoencoderKLHunyuanVideo with the real structure and tiny widths."""
    from diffusers import AutoencoderKLHunyuanVideo
    return _randomize(AutoencoderKLHunyuanVideo(
        latent_channels=LATENT_CHANNELS, block_out_channels=TINY_WIDTHS, layers_per_block=TINY_LAYERS,
        norm_num_groups=TINY_GROUPS, scaling_factor=HUNYUAN_SCALING_FACTOR), seed)


def tiny_flux_network(seed: int = 0):
    """A random diffusers AutoencoderKL configured as the Flux VAE (no quant convs), tiny widths."""
    from diffusers import AutoencoderKL
    n = len(TINY_WIDTHS)
    return _randomize(AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=TINY_WIDTHS, layers_per_block=TINY_LAYERS, latent_channels=LATENT_CHANNELS,
        norm_num_groups=TINY_GROUPS, scaling_factor=FLUX_SCALING_FACTOR,
        shift_factor=FLUX_CONFIG_SHIFT_FACTOR, use_quant_conv=False, use_post_quant_conv=False), seed)


def comfy_state_dict(state: dict[str, torch.Tensor], conv_dims: int) -> dict[str, torch.Tensor]:
    """Diffusers VAE parameters -> ComfyUI/LDM names, mid attention as 1x1 convs of `conv_dims` dims."""
    n_levels = len({k.split(".")[2] for k in state if k.startswith("decoder.up_blocks.")})
    out = {}
    for key, value in state.items():
        new = diffusers_to_comfy_key(key, n_levels)
        if ".mid.attn_1." in new and new.endswith("weight") and value.ndim == 2:
            value = value.reshape(*value.shape, *([1] * conv_dims))
        out[new] = value.contiguous()
    return out


def _original_config() -> dict:
    """config.json as tencent/HunyuanVideo ships it next to pytorch_model.pt (class AutoencoderKLCausal3D)."""
    n = len(TINY_WIDTHS)
    return {"_class_name": "AutoencoderKLCausal3D", "act_fn": "silu", "in_channels": 3, "out_channels": 3,
            "block_out_channels": list(TINY_WIDTHS), "layers_per_block": TINY_LAYERS,
            "latent_channels": LATENT_CHANNELS, "norm_num_groups": TINY_GROUPS,
            "down_block_types": ["DownEncoderBlockCausal3D"] * n, "up_block_types": ["UpDecoderBlockCausal3D"] * n,
            "sample_size": 256, "sample_tsize": 64, "scaling_factor": HUNYUAN_SCALING_FACTOR,
            "time_compression_ratio": 4, "mid_block_add_attention": True}


def make_tiny_hunyuan_vae(directory: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write one tiny HunyuanVideo VAE three ways; returns {"original", "comfy", "diffusers"} paths.

    original:  <dir>/hunyuan_original/pytorch_model.pt, {"state_dict": {...}} with the original names,
               beside the original config.json
    comfy:     <dir>/hunyuan_video_vae_tiny.safetensors, ComfyUI's LDM names
    diffusers: <dir>/hunyuan_diffusers/ (config.json + diffusion_pytorch_model.safetensors)
    """
    directory = Path(directory)
    network = tiny_hunyuan_network(seed)
    state = {k: v.contiguous() for k, v in network.state_dict().items()}

    original = directory / "hunyuan_original" / "pytorch_model.pt"
    with atomic_path(original) as tmp:
        torch.save({"state_dict": state}, tmp)
    atomic_write_text(original.parent / "config.json", json.dumps(_original_config(), indent=2))

    comfy = save_safetensors(comfy_state_dict(state, conv_dims=3),
                             directory / "hunyuan_video_vae_tiny.safetensors")
    folder = directory / "hunyuan_diffusers"
    network.save_pretrained(folder, safe_serialization=True)
    return {"original": original, "comfy": comfy, "diffusers": folder}


def make_tiny_flux_vae(directory: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write one tiny Flux VAE two ways; returns {"comfy", "diffusers"} paths.

    comfy:     <dir>/ae_tiny.safetensors, the BFL/ComfyUI `ae.safetensors` names
    diffusers: <dir>/flux_vae_diffusers/ (config.json + diffusion_pytorch_model.safetensors)
    """
    directory = Path(directory)
    network = tiny_flux_network(seed)
    state = {k: v.contiguous() for k, v in network.state_dict().items()}
    comfy = save_safetensors(comfy_state_dict(state, conv_dims=2), directory / "ae_tiny.safetensors")
    folder = directory / "flux_vae_diffusers"
    network.save_pretrained(folder, safe_serialization=True)
    return {"comfy": comfy, "diffusers": folder}
