"""k5core.vae: loading every layout, parity with diffusers, shapes, tiling bounds and bad inputs.

Tiny random VAEs (k5core.tiny.vae) are written to real files in real layouts and loaded through
load_vae. Oracles nobody here wrote: diffusers' networks and its single-file LDM converter, and the
parameter names quoted from real HunyuanVideo files.
"""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from k5core.files import save_safetensors
from k5core.tiny import LATENT_CHANNELS
from k5core.tiny.vae import TINY_LAYERS, TINY_WIDTHS, make_tiny_flux_vae, make_tiny_hunyuan_vae
from k5core.vae import (FLUX_SCALING_FACTOR, HUNYUAN_SCALING_FACTOR, K5VAE, VAETiling, load_vae,
                        nearest_valid_frames)

UNTILED = VAETiling(enabled=False)



@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same tiny weights in every layout: {"hunyuan": {...}, "flux": {...}}."""
    root = tmp_path_factory.mktemp("vae")
    return {"hunyuan": make_tiny_hunyuan_vae(root / "h"), "flux": make_tiny_flux_vae(root / "f")}


@pytest.fixture(scope="module")
def hunyuan(files):
    return load_vae(files["hunyuan"]["diffusers"])


@pytest.fixture(scope="module")
def flux(files):
    return load_vae(files["flux"]["diffusers"])


def clip(b=1, f=9, h=64, w=64, seed=0):
    """A random video in [-1, 1]: (B, 3, F, H, W)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, f, h, w, generator=g) * 2 - 1


# ------------------------------------------------------------------------------------------------
# Loading every layout
# ------------------------------------------------------------------------------------------------
def test_hunyuan_layouts_load_to_identical_outputs(files, tmp_path):
    """Original .pt (wrapped, plain, "vae."-prefixed), ComfyUI file, diffusers and pipeline folders:
    bitwise equal latents and frames."""
    paths = dict(files["hunyuan"])
    sd = torch.load(paths["original"], weights_only=True)["state_dict"]
    torch.save(sd, tmp_path / "plain.pt")
    torch.save({"state_dict": {f"vae.{k}": v for k, v in sd.items()}}, tmp_path / "prefixed.ckpt")
    pipeline = tmp_path / "pipeline"
    shutil.copytree(paths["diffusers"], pipeline / "vae")
    (pipeline / "model_index.json").write_text("{}")
    paths.update(plain=tmp_path / "plain.pt", prefixed=tmp_path / "prefixed.ckpt", pipeline=pipeline)

    x = clip(f=5, h=32, w=32)
    reference = None
    for name, path in paths.items():
        vae = load_vae(path)
        assert (vae.kind, vae.temporal_ratio, vae.spatial_ratio) == ("hunyuan", 4, 8), name
        z = vae.encode(x, tiling=UNTILED)
        y = vae.decode(z, tiling=UNTILED)
        if reference is None:
            reference = (z, y)
        assert torch.equal(z, reference[0]) and torch.equal(y, reference[1]), name


def test_flux_layouts_load_to_identical_outputs(files):
    """ComfyUI ae.safetensors and the diffusers folder give the same latents and frames."""
    a, b = load_vae(files["flux"]["comfy"]), load_vae(files["flux"]["diffusers"])
    x = clip(f=2, h=32, w=32)
    assert a.kind == b.kind == "flux" and a.temporal_ratio == 1
    za, zb = a.encode(x, tiling=UNTILED), b.encode(x, tiling=UNTILED)
    assert torch.equal(za, zb)
    assert torch.equal(a.decode(za, tiling=UNTILED), b.decode(zb, tiling=UNTILED))


def _comfy_hunyuan_names(widths, layers) -> set[str]:
    """Parameter names of ComfyUI's 3D VAE (comfy/ldm/modules/diffusionmodules/model.py with conv3d),
    enumerated from its Encoder/Decoder definitions, independently of k5core's key mapping."""
    names = set()
    conv = lambda p: names.update({f"{p}.conv.weight", f"{p}.conv.bias"})    # VideoConv3d wraps .conv
    plain = lambda p: names.update({f"{p}.weight", f"{p}.bias"})

    def resnet(p, cin, cout):
        plain(f"{p}.norm1"), conv(f"{p}.conv1"), plain(f"{p}.norm2"), conv(f"{p}.conv2")
        if cin != cout:
            conv(f"{p}.nin_shortcut")

    def mid(p, c):
        resnet(f"{p}.mid.block_1", c, c), resnet(f"{p}.mid.block_2", c, c)
        for part in ("norm", "q", "k", "v", "proj_out"):
            plain(f"{p}.mid.attn_1.{part}")

    n = len(widths)
    conv("encoder.conv_in")
    block_in = widths[0]
    for i in range(n):
        for j in range(layers):
            resnet(f"encoder.down.{i}.block.{j}", block_in, widths[i])
            block_in = widths[i]
        if i != n - 1:
            conv(f"encoder.down.{i}.downsample.conv")
    mid("encoder", widths[-1]), plain("encoder.norm_out"), conv("encoder.conv_out")
    conv("decoder.conv_in"), mid("decoder", widths[-1])
    block_in = widths[-1]
    for i in reversed(range(n)):
        for j in range(layers + 1):
            resnet(f"decoder.up.{i}.block.{j}", block_in, widths[i])
            block_in = widths[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv")
    plain("decoder.norm_out"), conv("decoder.conv_out"), plain("quant_conv"), plain("post_quant_conv")
    return names


def test_written_files_carry_the_real_parameter_names(files):
    """Tiny files have the real files' names: ComfyUI's LDM set, the original names quoted from real
    HunyuanVideo load errors, and Flux's ae.safetensors as diffusers' own single-file converter reads it."""
    from safetensors.torch import load_file
    comfy = load_file(str(files["hunyuan"]["comfy"]))
    assert set(comfy) == _comfy_hunyuan_names(TINY_WIDTHS, TINY_LAYERS)
    assert comfy["decoder.mid.attn_1.q.weight"].shape == (TINY_WIDTHS[-1],) * 2 + (1, 1, 1)

    original = torch.load(files["hunyuan"]["original"], weights_only=True)["state_dict"]
    for name in ("decoder.mid_block.attentions.0.group_norm.weight", "decoder.mid_block.attentions.0.to_q.bias",
                 "decoder.up_blocks.3.resnets.2.conv2.conv.weight", "decoder.mid_block.resnets.1.conv2.conv.bias",
                 "decoder.conv_norm_out.weight"):
        assert name in original, name

    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    ae = load_file(str(files["flux"]["comfy"]))
    n = len(TINY_WIDTHS)
    converted = convert_ldm_vae_checkpoint(ae, {"down_block_types": [0] * n, "up_block_types": [0] * n})
    folder = load_file(str(files["flux"]["diffusers"] / "diffusion_pytorch_model.safetensors"))
    assert set(converted) == set(folder)
    assert all(torch.equal(converted[k], folder[k]) for k in folder)


def test_parity_with_diffusers(hunyuan, flux):
    """Untiled encode/decode equal diffusers' own encode().latent_dist.mode() / decode() with K5's scaling."""
    x = clip(b=2, f=5, h=32, w=48)
    with torch.no_grad():
        expected = hunyuan.network.encode(x).latent_dist.mode() * HUNYUAN_SCALING_FACTOR
        z = hunyuan.encode(x, tiling=UNTILED)
        torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-5)
        frames = hunyuan.network.decode(z / HUNYUAN_SCALING_FACTOR).sample.clamp(-1, 1)
        torch.testing.assert_close(hunyuan.decode(z, tiling=UNTILED), frames, rtol=1e-5, atol=1e-5)

        image = x[:, :, 0]
        expected = flux.network.encode(image).latent_dist.mode() * FLUX_SCALING_FACTOR   # no shift (K5)
        z = flux.encode(image.unsqueeze(2), tiling=UNTILED)
        torch.testing.assert_close(z[:, :, 0], expected, rtol=1e-5, atol=1e-5)
        frames = flux.network.decode(z[:, :, 0] / FLUX_SCALING_FACTOR).sample.clamp(-1, 1)
        torch.testing.assert_close(flux.decode(z, tiling=UNTILED)[:, :, 0], frames, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Shapes and properties
# ------------------------------------------------------------------------------------------------
def test_hunyuan_shapes_and_properties(hunyuan):
    assert hunyuan.scaling_factor == pytest.approx(HUNYUAN_SCALING_FACTOR) and hunyuan.shift_factor == 0
    assert hunyuan.latent_channels == LATENT_CHANNELS == 16
    assert (hunyuan.device.type, hunyuan.dtype) == ("cpu", torch.float32)
    for b, f, h, w in [(1, 9, 64, 64), (2, 5, 16, 40), (1, 1, 32, 32)]:
        z = hunyuan.encode(clip(b, f, h, w))
        assert z.shape == (b, 16, (f - 1) // 4 + 1, h // 8, w // 8) and z.dtype == torch.float32
        y = hunyuan.decode(z)
        assert y.shape == (b, 3, f, h, w) and y.min() >= -1 and y.max() <= 1
    x = clip(f=1, h=32, w=32)
    assert torch.equal(hunyuan.encode(x), hunyuan.encode(x))                      # posterior mean: deterministic
    assert (hunyuan.latent_frames(121), hunyuan.pixel_frames(31)) == (31, 121)


def test_flux_shapes_and_properties(flux):
    assert flux.scaling_factor == pytest.approx(FLUX_SCALING_FACTOR) and flux.shift_factor == 0
    assert flux.network.config.shift_factor == pytest.approx(0.1159)             # in the file, not applied
    for b, f in [(2, 1), (1, 3)]:
        z = flux.encode(clip(b, f, 64, 48))
        assert z.shape == (b, 16, f, 8, 6)
        assert flux.decode(z).shape == (b, 3, f, 64, 48)


def test_dtype_and_device(files):
    vae = load_vae(files["hunyuan"]["comfy"], device="cpu", dtype=torch.bfloat16)
    assert vae.dtype == torch.bfloat16
    z = vae.encode(clip(f=5))
    assert z.dtype == torch.float32 and z.shape == (1, 16, 2, 8, 8)
    assert vae.to("cpu", dtype=torch.float32).dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# Tiling
# ------------------------------------------------------------------------------------------------
class LocalVAE(K5VAE):
    """The tiny VAE with a pixel-local network of the same geometry: causal 4-frame groups, 8x8 cells.
    With no context across tiles, tiled and untiled must agree to rounding: this checks the tiler."""

    def _encode_tile(self, x):
        groups = x[:, :, 1:].unflatten(2, (-1, 4)).mean(3)                      # (B, 3, (F-1)/4, H, W)
        z = F.avg_pool3d(torch.cat([x[:, :, :1], groups], 2), (1, 8, 8))
        return torch.cat([z, z.square(), z.sin(), z.cos(), z.tanh(), -z][:6], 1)[:, :16]

    def _decode_tile(self, z):
        px = z[:, :3].repeat_interleave(8, 3).repeat_interleave(8, 4)
        return torch.tanh(torch.cat([px[:, :, :1], px[:, :, 1:].repeat_interleave(4, 2)], 2))


@pytest.mark.parametrize("tiling", [
    VAETiling(spatial_tile=32, spatial_overlap=16, temporal_chunk=9, temporal_overlap=4),
    VAETiling(spatial_tile=40, spatial_overlap=8, temporal_chunk=5, temporal_overlap=0),
    VAETiling(spatial_tile=48, spatial_overlap=24, temporal_chunk=13, temporal_overlap=8),
])
def test_tiler_is_exact_for_a_local_network(hunyuan, tiling):
    """Bound: |tiled - untiled| <= 1e-5 everywhere (windows, crops and blend weights are exact)."""
    vae = LocalVAE(hunyuan.network, "hunyuan", "local")
    x = clip(f=29, h=72, w=104)
    steps = []
    z = vae.encode(x, tiling=UNTILED)
    torch.testing.assert_close(vae.encode(x, tiling=tiling, progress=lambda *a: steps.append(a)), z,
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(vae.decode(z, tiling=tiling), vae.decode(z, tiling=UNTILED), rtol=0, atol=1e-5)
    assert len(steps) > 3 and steps[-1][0] == steps[-1][1]


def _diffusers_tiled_error(network, z, latent_scale, spatial=None, temporal=None) -> float:
    """Mean |tiled - untiled| of diffusers' own tiled decode at the given geometry (the reference)."""
    net, z = network, z / latent_scale
    with torch.no_grad():
        net.use_tiling, net.use_framewise_decoding = False, False
        full = net.decode(z).sample.clamp(-1, 1)
        if spatial:
            net.enable_tiling(tile_sample_min_height=spatial[0], tile_sample_min_width=spatial[0],
                              tile_sample_stride_height=spatial[0] - spatial[1],
                              tile_sample_stride_width=spatial[0] - spatial[1])
        if temporal:
            net.use_framewise_decoding = True
            net.tile_sample_min_num_frames = temporal[0]
            net.tile_sample_stride_num_frames = temporal[0] - temporal[1]
        tiled = net.decode(z).sample.clamp(-1, 1)
        net.use_tiling, net.use_framewise_decoding = False, False
    return float((tiled - full).abs().mean())


def test_tiled_decode_is_as_close_as_diffusers_tiling(files):
    """Bound: mean |tiled - untiled| <= 1.15 x that of diffusers' tiled decode at the same tile geometry,
    on the same network. (A random network is far more sensitive to tile context than a trained one,
    so an absolute bound would say nothing; the local-network test above pins the tiler exactly.)"""
    vae = load_vae(files["hunyuan"]["diffusers"])
    z = vae.encode(clip(f=5, h=48, w=64), tiling=UNTILED)                       # (1, 16, 2, 6, 8)
    full = vae.decode(z, tiling=UNTILED)
    assert torch.equal(vae.decode(z, tiling=VAETiling(spatial_tile=128, temporal_chunk=9)), full)  # one tile
    ours = vae.decode(z, tiling=VAETiling(spatial_tile=32, spatial_overlap=16))
    ref = _diffusers_tiled_error(vae.network, z, vae.scaling_factor, spatial=(32, 16))
    assert float((ours - full).abs().mean()) <= 1.15 * ref

    z = vae.encode(clip(f=13, h=32, w=32), tiling=UNTILED)                      # (1, 16, 4, 4, 4)
    full = vae.decode(z, tiling=UNTILED)
    ours = vae.decode(z, tiling=VAETiling(temporal_chunk=9, temporal_overlap=4))
    ref = _diffusers_tiled_error(vae.network, z, vae.scaling_factor, temporal=(8, 4))
    assert float((ours - full).abs().mean()) <= 1.15 * ref


def test_tiling_settings_and_stop(hunyuan):
    vae = load_vae(hunyuan.source)
    assert vae.set_tiling(True, spatial_tile=128).spatial_tile == 128 and vae.tiling.spatial_overlap == 64
    bad_settings = [(dict(spatial_tile=100), "spatial_tile"), (dict(spatial_overlap=256), "spatial_overlap"),
                    (dict(temporal_chunk=8), "temporal_chunk"), (dict(temporal_overlap=16), "temporal_overlap")]
    for bad, field in bad_settings:
        with pytest.raises(ValueError, match=field):
            vae.set_tiling(True, **bad)
    with pytest.raises(InterruptedError):
        vae.decode(torch.zeros(1, 16, 3, 8, 8), should_stop=lambda: True)


# ------------------------------------------------------------------------------------------------
# Bad inputs and bad files
# ------------------------------------------------------------------------------------------------
def test_bad_inputs(hunyuan):
    with pytest.raises(ValueError, match=r"4k\+1 frames, got 10; trim to 9"):
        hunyuan.encode(clip(f=10))
    with pytest.raises(ValueError, match="multiples of 8, got 60x64"):
        hunyuan.encode(clip(h=60))
    with pytest.raises(ValueError, match=r"unsqueeze\(2\)"):
        hunyuan.encode(clip()[:, :, 0])
    with pytest.raises(ValueError, match="uint8"):
        hunyuan.encode((clip() * 100).to(torch.uint8))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        hunyuan.encode(clip() * 127 + 128)
    with pytest.raises(ValueError, match=r"expected latent \(B, 16"):
        hunyuan.decode(torch.zeros(1, 4, 3, 8, 8))
    assert [nearest_valid_frames(n) for n in (1, 4, 5, 120, 121)] == [1, 1, 5, 117, 121]


def test_bad_files(files, tmp_path):
    good = files["hunyuan"]["comfy"]
    cases = {
        "dit.safetensors": ({"visual_transformer_blocks.0.self_attention.to_query.weight": torch.zeros(4, 4),
                             "text_embeddings.in_layer.weight": torch.zeros(4, 4)}, "Kandinsky 5 DiT"),
        "qwen.safetensors": ({"model.embed_tokens.weight": torch.zeros(4, 4)}, "text encoder"),
        "sd_vae.safetensors": ({"decoder.conv_in.weight": torch.zeros(512, 4, 3, 3)}, "4 latent channels"),
    }
    for name, (tensors, message) in cases.items():
        save_safetensors(tensors, tmp_path / name)
        with pytest.raises(ValueError, match=message):
            load_vae(tmp_path / name)

    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_vae(tmp_path / "cut.safetensors")
    data = files["hunyuan"]["original"].read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.pt: cannot read as a torch checkpoint"):
        load_vae(tmp_path / "cut.pt")

    with pytest.raises(FileNotFoundError, match="not found"):
        load_vae(tmp_path / "missing.safetensors")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        load_vae(tmp_path / "empty_dir")
    from safetensors.torch import load_file
    sd = load_file(str(good))
    del sd["decoder.up.0.block.2.conv2.conv.weight"]
    save_safetensors(sd, tmp_path / "incomplete.safetensors")
    with pytest.raises(ValueError, match=r"missing \['decoder.up_blocks.3.resnets.2.conv2.conv.weight'\]"):
        load_vae(tmp_path / "incomplete.safetensors")
