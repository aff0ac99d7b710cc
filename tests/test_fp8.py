"""fp8 weights: quantization error, FP8Linear, which layers, bytes, pre-quantized files and their layouts."""
import copy

import pytest
import torch
from torch import nn

from k5core import fp8
from k5core.dit import K5DiT
from k5core.files import read_safetensors_header, save_safetensors
from k5core.fp8 import FP8, FP8Linear, dequantize, quantize, quantize_model, stored_bytes
from k5core.loading import CheckpointError, load_dit
from k5core.make_fp8 import main as make_fp8_main
from k5core.tasks import get_task
from k5core.tiny.dit import randomize_, tiny_state_dict, write_tiny_dit

PREFIX = "model.diffusion_model."
MODES = ("e4m3fn", "e4m3fn_scaled")


def rel_l2(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def inputs(channels=33, batch=2, T=3, H=8, W=8, L=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, channels, T, H, W, generator=g), torch.tensor([500.0, 930.0][:batch]),
            torch.randn(batch, L, 32, generator=g), torch.randn(batch, 16, generator=g))


def tiny_model(seed=0, task="k5-tiny-t2v"):
    return randomize_(K5DiT(get_task(task).dit), seed).eval()


# ----------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("kind,shape", [("tensor", ()), ("channel", (96, 1)), ("block", (96, 2, 1))])
def test_quantize_roundtrip(kind, shape):
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(0)) * 0.02
    q, scale = quantize(w, kind)
    assert q.dtype == FP8 and q.shape == w.shape and tuple(scale.shape) == shape
    assert scale.dtype == torch.float32
    # e4m3 keeps 3 mantissa bits: rms relative rounding error ~2.6%, never above 2^-4 per weight
    assert rel_l2(dequantize(q, scale, torch.float32), w) < 0.035
    assert (dequantize(q, scale, torch.float32) - w).abs().max() <= w.abs().max() * 2 ** -4 + 1e-9
    assert fp8.scale_kind(scale.shape, w.shape) == kind


def test_per_channel_keeps_small_rows():
    """A row 10^5 times smaller than the rest falls into e4m3's subnormals with one scale per tensor;
    a scale per row keeps it exact to fp8 precision."""
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    w[0] *= 1e-5
    for kind, bound in (("channel", 0.04), ("tensor", None)):
        q, scale = quantize(w, kind)
        err = rel_l2(dequantize(q, scale, torch.float32)[0], w[0])
        assert err < bound if bound else err > 0.3


def test_fp8_linear_forward_backward_and_memory():
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=g) * 0.05)
    layer = FP8Linear.from_linear(lin, "channel")
    assert isinstance(layer, nn.Linear) and layer.weight.dtype == FP8 and not layer.weight.requires_grad
    x = torch.randn(2, 5, 64, generator=g, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert rel_l2(y, lin(x)) < 0.04
    # backward keeps the 1-byte weight, not a dequantized float copy
    assert (FP8, (48, 64)) in saved and not any(s == (48, 64) and d != FP8 for d, s in saved)
    y.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    lin(x_ref).square().sum().backward()
    assert rel_l2(x.grad, x_ref.grad) < 0.08 and layer.weight.grad is None


def test_fp8_linear_survives_module_casts_and_merges():
    """Module.to(dtype) keeps fp8 weights and float32 scales; a LoRA-style merge goes through
    dequantized_weight / assign_weight with the layer's granularity."""
    lin = nn.Linear(64, 32)
    layer = FP8Linear.from_linear(lin, "channel")
    q, scale = layer.weight.detach().clone(), layer.scale_weight.clone()
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == FP8 and torch.equal(layer.weight.view(torch.uint8), q.view(torch.uint8))
    assert layer.scale_weight.dtype == torch.float32 and torch.equal(layer.scale_weight, scale)
    assert layer.bias.dtype == torch.bfloat16
    delta = torch.randn(32, 64) * 0.01
    merged = layer.dequantized_weight() + delta
    layer.assign_weight(merged)
    assert layer.weight.dtype == FP8 and layer.granularity == "channel"
    assert rel_l2(layer.dequantized_weight(), merged) < 0.035
    model = quantize_model(tiny_model(), "e4m3fn")
    assert fp8.use_scaled_mm(model) == 26
    x, t, text, pooled = inputs()
    with torch.no_grad():   # CPU: falls back to the dequantizing forward
        assert torch.equal(model(x, t, text, pooled), fp8.use_scaled_mm(model, False) and model(x, t, text, pooled))


def test_lora_style_training_on_fp8_base():
    """A frozen fp8 base plus a trainable float branch: gradients reach the branch and the input."""
    base = FP8Linear.from_linear(nn.Linear(32, 32), "channel")
    down, up = nn.Linear(32, 4, bias=False), nn.Linear(4, 32, bias=False)
    nn.init.normal_(up.weight, std=0.1)
    x = torch.randn(3, 32, requires_grad=True)
    (base(x) + up(down(x))).square().mean().backward()
    assert down.weight.grad is not None and up.weight.grad.abs().sum() > 0 and x.grad is not None
    assert base.weight.grad is None


def test_scaled_mm_path_matches_dequantized():
    """torch._scaled_mm (used on sm89+ GPUs when enabled) agrees with the dequantizing forward; run
    here on torch's CPU kernel, tensorwise and rowwise."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, 64, generator=g)
    for kind in ("tensor", "channel"):
        q, scale = quantize(torch.randn(32, 64, generator=g) * 0.05, kind)
        bias = torch.randn(32, generator=g) * 0.1
        try:
            fast = fp8.scaled_mm_linear(x, q, scale, bias)
        except (RuntimeError, NotImplementedError) as e:
            pytest.skip(f"torch._scaled_mm has no CPU kernel in this torch: {e}")
        slow = torch.nn.functional.linear(x, dequantize(q, scale, x.dtype), bias)
        assert fast.shape == slow.shape and rel_l2(fast, slow) < 0.05
    assert not fp8.scaled_mm_supported(x, q, scale)  # CPU: the dequantizing forward is used


# ----------------------------------------------------------------------------- models
def test_which_layers_are_fp8():
    model = quantize_model(tiny_model(), "e4m3fn_scaled")
    names = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    p = get_task("k5-tiny-t2v").dit
    assert len(names) == 10 * p.num_visual_blocks + 6 * p.num_text_blocks  # 4 per attention + ff in/out
    assert all(".self_attention." in n or ".cross_attention." in n or ".feed_forward." in n for n in names)
    kept = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert any("modulation" in n for n in kept) and "out_layer.out_layer" in kept
    assert "text_embeddings.in_layer" in kept and "visual_embeddings.in_layer" in kept


@pytest.mark.parametrize("mode", MODES)
def test_tiny_model_output_close_to_full_precision(mode):
    """Here 0.023 (e4m3fn) and 0.025 (e4m3fn_scaled) relative L2; 0.022-0.026 over seeds; bound 0.05."""
    ref = tiny_model(seed=2)
    model = quantize_model(copy.deepcopy(ref), mode)
    x, t, text, pooled = inputs()
    with torch.no_grad():
        assert rel_l2(model(x, t, text, pooled), ref(x, t, text, pooled)) < 0.05


def test_stored_bytes_ratio():
    """Bytes of Lite and Pro in fp8 vs bf16, counted on meta models. The fp8 block Linears (with
    scales) take <= 0.55x their bf16 bytes; whole models ~0.57x because modulation, embeddings and
    the out layer stay bf16 (storing the modulation in fp8 too would give 0.50x)."""
    def as_bf16(module):   # 2 bytes for every weight the bf16 model has (fp8 scales are extra)
        return 2 * sum(t.numel() for n, t in [*module.named_parameters(), *module.named_buffers()]
                       if not n.endswith("scale_weight"))

    for task in ("k5-lite-t2v-5s-sd", "k5-pro-t2v-5s-sd"):
        with torch.device("meta"):
            q = K5DiT(get_task(task).dit).to(torch.bfloat16)
        shapes = {k: (tuple(v.shape), str(v.dtype)) for k, v in q.state_dict().items()}
        fp8.Fp8Plan(shapes, "e4m3fn_scaled", task).apply(q)    # what load_dit does before reading
        target = [q.get_submodule(n) for n, m in q.named_modules() if isinstance(m, FP8Linear)]
        assert sum(map(stored_bytes, target)) <= 0.55 * sum(map(as_bf16, target))
        assert stored_bytes(q) <= 0.58 * as_bf16(q)


# ----------------------------------------------------------------------------- files
@pytest.mark.parametrize("mode", MODES)
def test_make_fp8_roundtrip(tmp_path, mode, capsys):
    src = write_tiny_dit(tmp_path, "k5-tiny-i2v", seed=4, layout="comfy")
    out = tmp_path / "fp8.safetensors"
    assert make_fp8_main(["--input", str(src), "--output", str(out), "--fp8", mode]) == 0
    header, meta = read_safetensors_header(out)
    assert header[PREFIX + "scaled_fp8"]["dtype"] == "F8_E4M3" and meta["k5core.fp8"] == mode
    key = PREFIX + "visual_transformer_blocks.1.feed_forward.in_layer"
    assert header[key + ".weight"]["dtype"] == "F8_E4M3"
    assert header[key + ".scale_weight"]["shape"] == ([] if mode == "e4m3fn" else [128, 1])
    assert header[PREFIX + "visual_transformer_blocks.1.visual_modulation.out_layer.weight"]["dtype"] == "BF16"
    assert out.stat().st_size < 0.45 * src.stat().st_size  # fp32 tiny file -> fp8 + bf16
    pre = load_dit(out, dtype=torch.float32)
    fresh = load_dit(src, dtype=torch.float32, fp8=mode)
    assert isinstance(pre.get_submodule(key[len(PREFIX):]), FP8Linear)
    a, b = pre.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    for k in a:   # the pre-quantized file holds exactly the weights quantizing on load gives
        if a[k].dtype == FP8 or k.endswith("scale_weight"):
            assert torch.equal(a[k].float(), b[k].float()), k
    x, t, text, pooled = inputs()
    with torch.no_grad():
        assert rel_l2(pre(x, t, text, pooled), fresh(x, t, text, pooled)) < 0.02  # only the bf16 rounding
    # asking for the other mode still uses the file as it is
    again = load_dit(out, fp8="e4m3fn" if mode != "e4m3fn" else "e4m3fn_scaled")
    assert torch.equal(again.state_dict()[key[len(PREFIX):] + ".scale_weight"], a[key[len(PREFIX):] + ".scale_weight"])
    assert make_fp8_main(["--input", str(out), "--output", str(tmp_path / "twice.safetensors")]) == 1
    assert "already holds fp8" in capsys.readouterr().err


def _comfy_scaled_file(tmp_path, name="comfy-fp8.safetensors", extra=None, drop=None, layout="old"):
    """A ComfyUI-style scaled fp8 repack of the tiny DiT: `model.diffusion_model.` prefix, fp8 weights
    with float32 scalar scales, `scale_input` ones, the `scaled_fp8` marker (old layout) or
    `weight_scale` + `comfy_quant` + uint8 weights (mixed-precision layout)."""
    sd = tiny_state_dict("k5-tiny-t2v", seed=5)
    out = {}
    for k, v in sd.items():
        layer = k[: -len(".weight")]
        if k.endswith(".weight") and fp8.is_target(layer):
            q, s = quantize(v, "tensor")
            if layout == "old":
                out[PREFIX + k], out[PREFIX + layer + ".scale_weight"] = q, s
                out[PREFIX + layer + ".scale_input"] = torch.ones(())
            else:
                out[PREFIX + k], out[PREFIX + layer + ".weight_scale"] = q.view(torch.uint8), s
                out[PREFIX + layer + ".comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'),
                                                                    dtype=torch.uint8)
        else:
            out[PREFIX + k] = v.to(torch.bfloat16)
    if layout == "old":
        out[PREFIX + "scaled_fp8"] = torch.empty(0, dtype=FP8)
    out.update(extra or {})
    for k in drop or ():
        del out[k]
    return save_safetensors(out, tmp_path / name), sd


@pytest.mark.parametrize("layout", ["old", "mixed"])
def test_comfy_scaled_fp8_repack_loads(tmp_path, layout):
    path, sd = _comfy_scaled_file(tmp_path, layout=layout)
    model = load_dit(path, dtype=torch.float32)
    layer = model.visual_transformer_blocks[0].self_attention.to_query
    assert isinstance(layer, FP8Linear) and layer.scale_weight.shape == ()
    ref = K5DiT(get_task("k5-tiny-t2v").dit)
    ref.load_state_dict(sd)
    x, t, text, pooled = inputs()
    with torch.no_grad():
        assert rel_l2(model(x, t, text, pooled), ref.eval()(x, t, text, pooled)) < 0.05


def test_musubi_block_scales_and_fp8_modulation(tmp_path):
    """musubi-tuner layout: no marker, bf16 scales shaped (out, blocks, 1) and fp8 modulation /
    out layer weights, which load dequantized (they stay high precision here)."""
    sd = tiny_state_dict("k5-tiny-t2v", seed=6)
    out = {}
    for k, v in sd.items():
        if v.ndim == 2 and ("transformer_blocks" in k or k.startswith("out_layer.")):   # musubi's targets
            q, s = quantize(v, "block" if v.shape[1] % 64 == 0 else "channel")
            out[k], out[k[: -len("weight")] + "scale_weight"] = q, s.to(torch.bfloat16)
        else:
            out[k] = v
    path = save_safetensors(out, tmp_path / "musubi.safetensors")
    model = load_dit(path, dtype=torch.float32)
    ff = model.visual_transformer_blocks[0].feed_forward
    assert isinstance(ff.in_layer, FP8Linear) and ff.in_layer.granularity == "block"
    assert ff.out_layer.granularity == "block" and tuple(ff.out_layer.scale_weight.shape) == (64, 2, 1)
    mod = model.visual_transformer_blocks[0].visual_modulation.out_layer
    assert type(mod) is nn.Linear and mod.weight.dtype == torch.float32
    assert rel_l2(mod.weight, sd["visual_transformer_blocks.0.visual_modulation.out_layer.weight"]) < 0.04


def test_plain_fp8_file_loads_with_unit_scales(tmp_path):
    sd = tiny_state_dict("k5-tiny-t2v", seed=7)
    path = save_safetensors({k: v.to(FP8) for k, v in sd.items()}, tmp_path / "plain-fp8.safetensors")
    model = load_dit(path)
    assert isinstance(model.text_transformer_blocks[0].feed_forward.in_layer, FP8Linear)
    assert model.text_transformer_blocks[0].feed_forward.in_layer.scale_weight.item() == 1.0
    assert model.out_layer.out_layer.weight.dtype == torch.bfloat16  # fp8 leftovers: bf16 when dtype=None


KEY = PREFIX + "visual_transformer_blocks.0.self_attention.to_key"


@pytest.mark.parametrize("change,message", [
    ({"extra": {KEY + ".scale_weight": torch.ones(3, 1)}}, "fits no scaling"),
    ({"drop": [KEY + ".scale_weight"]}, "has no scale"),
    ({"extra": {KEY + ".scale_weight": torch.tensor(float("nan"))}}, "not finite and positive"),
    ({"extra": {KEY + ".scale_weight": torch.tensor(-1.0)}}, "not finite and positive"),
    ({"extra": {PREFIX + "visual_transformer_blocks.0.self_attention.key_norm.scale_weight": torch.ones(())}},
     "has no weight|not fp8"),
    ({"extra": {PREFIX + "text_embeddings.in_layer.scale_weight": torch.ones(())}}, "not fp8"),
    ({"extra": {KEY + ".scale_weight": torch.ones(64, 1).to(FP8)}}, "not supported"),
    ({"extra": {KEY + ".weight_scale_2": torch.ones(())}}, "nvfp4"),
    ({"extra": {KEY + ".comfy_quant": torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)}}, "nvfp4"),
])
def test_refuses_scales_that_do_not_match(tmp_path, change, message):
    path, _ = _comfy_scaled_file(tmp_path, **change)
    with pytest.raises(CheckpointError, match=message) as e:
        load_dit(path)
    assert str(path) in str(e.value)


def test_bad_mode_is_a_clear_error(tmp_path):
    src = write_tiny_dit(tmp_path, "k5-tiny-t2v")
    with pytest.raises(ValueError, match="e4m3fn_scaled"):
        load_dit(src, fp8="fp8")
    with pytest.raises(SystemExit):
        make_fp8_main(["--input", str(src), "--output", str(tmp_path / "o.safetensors"), "--fp8", "e5m2"])
