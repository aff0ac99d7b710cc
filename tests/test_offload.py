"""Block swap and gradient checkpointing: schedule (forward and backward), equal outputs and gradients,
fp8 and LoRA-style children, errors. CUDA checks run only where CUDA is present."""
import copy
import warnings
from dataclasses import replace

import pytest
import torch
from torch import nn

from k5core.dit import K5DiT
from k5core.fp8 import FP8Linear, quantize_model
from k5core.offload import enable_block_swap, enable_gradient_checkpointing
from k5core.tasks import TINY
from k5core.tiny.dit import randomize_

FIVE = replace(TINY, num_visual_blocks=5)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def inputs(batch=2, T=1, H=4, W=4, L=5, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, FIVE.visual_embed_dim, T, H, W, generator=g)
    return [v.to(device) for v in (x, torch.tensor([500.0, 930.0][:batch]),
                                   torch.randn(batch, L, FIVE.in_text_dim, generator=g),
                                   torch.randn(batch, FIVE.in_text_dim2, generator=g))]


class LoraChild(nn.Module):
    """A LoRA-like branch added into a Linear after swap was enabled: trainable down/up and a frozen
    buffer (stands in for anything a later module registers)."""

    def __init__(self, linear: nn.Linear, rank=4, dtype=torch.float32):
        super().__init__()
        self.down = nn.Linear(linear.in_features, rank, bias=False, dtype=dtype)
        self.up = nn.Linear(rank, linear.out_features, bias=False, dtype=dtype)
        nn.init.normal_(self.up.weight, std=0.1)
        self.register_buffer("alpha", torch.tensor(0.5))
        self.base_forward = linear.forward

    def forward(self, x):
        return self.base_forward(x) + self.alpha * self.up(self.down(x))


def add_lora(model: K5DiT, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    for block in model.visual_transformer_blocks:
        for linear in (block.self_attention.to_query, block.feed_forward.out_layer):
            linear.lora = LoraChild(linear, dtype=dtype)
            linear.forward = linear.lora.forward
    return model


def base(fp8=None, seed=0, dtype=torch.float32):
    model = randomize_(K5DiT(FIVE), seed).requires_grad_(False).to(dtype)
    return quantize_model(model, fp8) if fp8 else model  # (Module.to(dtype) would also cast fp8 weights)


def train_step(model, device="cpu"):
    """Forward + backward of a LoRA-style training step; returns output, input grad, LoRA grads."""
    x, t, text, pooled = inputs(device=device)
    dtype = model.visual_embeddings.in_layer.weight.dtype
    x, text, pooled = x.to(dtype).requires_grad_(True), text.to(dtype), pooled.to(dtype)
    y = model(x, t, text, pooled)
    y.square().mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, grads


def swap_cpu(model, n):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return enable_block_swap(model, n, "cpu")


# ----------------------------------------------------------------------------- schedule
def test_swap_schedule_forward_and_backward():
    """Last 3 of 5 blocks swapped: at most the running block and the next one are resident; in
    backward the order reverses, each block is back before its backward and dropped after it."""
    model = add_lora(base())
    swap = swap_cpu(model, 3)
    assert swap.swapped == (2, 3, 4) and swap.resident() == ()
    train_step(model)
    steps = [(event, i, res) for event, i, res in swap.log if event in ("forward", "backward")]
    assert steps == [("forward", 0, (2,)), ("forward", 1, (2,)), ("forward", 2, (2, 3)), ("forward", 3, (3, 4)),
                     ("forward", 4, (4,)),
                     ("backward", 4, (3, 4)), ("backward", 3, (2, 3)), ("backward", 2, (2,)),
                     ("backward", 1, ()), ("backward", 0, ())]
    assert not [e for e in swap.log if e[0] == "late"]       # every use was prefetched
    assert max(len(res) for _, _, res in swap.log) <= 2
    assert swap.resident() == ()                              # all dropped after backward
    assert swap.saved_refs > 0                                # saved weights kept as references

    swap.log.clear()
    with torch.no_grad():
        model(*inputs())
    assert [e for e in swap.log if e[0] == "forward"] == [
        ("forward", 0, (2,)), ("forward", 1, (2,)), ("forward", 2, (2, 3)), ("forward", 3, (3, 4)),
        ("forward", 4, (4,))]
    assert swap.resident() == ()


@pytest.mark.parametrize("fp8", [None, "e4m3fn_scaled"])
@pytest.mark.parametrize("ckpt", ["off", "on", "cpu_offload"])
def test_equal_outputs_and_grads_with_swap(fp8, ckpt):
    plain = add_lora(base(fp8))
    model = copy.deepcopy(plain)
    swap = swap_cpu(model, 4)
    if ckpt != "off":
        enable_gradient_checkpointing(model, cpu_offload=ckpt == "cpu_offload")
    y0, gx0, g0 = train_step(plain)
    y1, gx1, g1 = train_step(model)
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
    assert g0.keys() == g1.keys() and len(g0) == 4 * FIVE.num_visual_blocks
    assert all(torch.equal(g0[k], g1[k]) for k in g0)
    assert not [e for e in swap.log if e[0] == "late"]


def test_swap_moves_every_frozen_tensor_of_the_block():
    """LoRA children added after enabling: their frozen buffer gets a CPU home like the block's own
    weights (fp8 weights and scales included); their trainable weights stay put, unswapped."""
    model = base("e4m3fn_scaled")
    swap = swap_cpu(model, 2)
    add_lora(model)
    train_step(model)
    block = model.visual_transformer_blocks[4]
    homed = {(id(m), name) for m, name in swap.homes[4]}
    for m in block.modules():
        for name, t in [*m._parameters.items(), *m._buffers.items()]:
            if t is None:
                continue
            trainable = isinstance(t, nn.Parameter) and t.requires_grad
            assert ((id(m), name) in homed) != trainable, (type(m).__name__, name)
    q = block.self_attention.to_query
    assert isinstance(q, FP8Linear) and (id(q), "scale_weight") in homed and (id(q.lora), "alpha") in homed


def test_unfrozen_model_swaps_for_inference_and_warns_in_training():
    """load_dit leaves requires_grad on: inference (no_grad / inference_mode) still swaps every weight;
    a training forward keeps trainable weights on the device and says to freeze the base."""
    plain = randomize_(K5DiT(FIVE), 0)
    model = copy.deepcopy(plain)
    swap = swap_cpu(model, 2)
    every = {(id(m), n) for m in model.visual_transformer_blocks[4].modules()
             for n, t in [*m._parameters.items(), *m._buffers.items()] if t is not None}
    with torch.inference_mode():
        y = model(*inputs())
    assert {(id(m), n) for m, n in swap.homes[4]} == every and swap.resident() == ()
    with torch.no_grad():
        assert torch.equal(y, plain(*inputs()))
    with pytest.warns(UserWarning, match="freeze the base model"):
        train_step(model)
    assert swap.homes[4] == {}   # all of block 4 requires grad: kept on the device


def test_checkpointing_gives_equal_gradients():
    plain = add_lora(base())
    for offload in (False, True):
        model = copy.deepcopy(plain)
        enable_gradient_checkpointing(model, cpu_offload=offload)
        assert model.block_runner is not None and model.block_runner.checkpointing
        y0, gx0, g0 = train_step(copy.deepcopy(plain))
        y1, gx1, g1 = train_step(model)
        torch.testing.assert_close(y1, y0, rtol=0, atol=0)
        torch.testing.assert_close(gx1, gx0, rtol=1e-6, atol=1e-7)
        for k in g0:
            torch.testing.assert_close(g1[k], g0[k], rtol=1e-6, atol=1e-7)
    enable_gradient_checkpointing(model, enabled=False)
    assert model.block_runner is None


def test_checkpointing_recomputes_blocks():
    """With checkpointing each visual block runs twice per training step (forward, recompute)."""
    model = add_lora(base())
    calls = []
    for i, block in enumerate(model.visual_transformer_blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
    enable_gradient_checkpointing(model)
    train_step(model)
    assert sorted(calls) == sorted(list(range(5)) * 2)


def test_swap_off_and_errors():
    model = base()
    with pytest.raises(ValueError, match="5 visual blocks"):
        enable_block_swap(model, 6, "cpu")
    with pytest.raises(ValueError, match="0 \\(off\\) to 5"):
        enable_block_swap(model, -1, "cpu")
    with pytest.warns(UserWarning, match="does nothing"):
        enable_block_swap(model, 5, "cpu")
    assert model.block_runner.swap.swapped == (0, 1, 2, 3, 4)
    assert enable_block_swap(model, 0, "cpu") is None and model.block_runner is None
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA"):
            enable_block_swap(model, 2, "cuda")


# ----------------------------------------------------------------------------- CUDA only
@cuda
@pytest.mark.parametrize("fp8", [None, "e4m3fn_scaled"])
def test_cuda_swap_equal_and_resident(fp8):
    plain = add_lora(base(fp8, dtype=torch.bfloat16), dtype=torch.bfloat16)
    model = copy.deepcopy(plain)
    swap = enable_block_swap(model, 3, "cuda")
    plain.cuda()
    for i, block in enumerate(model.visual_transformer_blocks):
        frozen = [t for t in [*block.parameters(), *block.buffers()] if not t.requires_grad]
        assert all(t.device.type == ("cpu" if i >= 2 else "cuda") for t in frozen)
        assert all(t.is_pinned() for t in frozen) or i < 2
    enable_gradient_checkpointing(model, cpu_offload=True)
    y0, gx0, g0 = train_step(plain, "cuda")
    y1, gx1, g1 = train_step(model, "cuda")
    torch.cuda.synchronize()
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    torch.testing.assert_close(gx1, gx0, rtol=1e-2, atol=1e-3)
    assert swap.resident() == () and not [e for e in swap.log if e[0] == "late"]
