"""Memory of the DiT in bf16, fp8 and fp8 + block swap, measured side by side in one run.

    python tests/bench/bench_memory.py [--blocks-to-swap 4] [--error] [--seeds 4]

1. Stored weight bytes, and the bytes that stay on the GPU with block swap (the swapped blocks' homes
   are in CPU memory; at most two of them are on the GPU at a time), for Lite and Pro (counted on meta
   models) and a mid-size random model (model_dim 512, 8 visual blocks). Ratios against bf16.
2. CPU: resident weights and peak memory of one forward (process RSS, each config in a fresh process),
   bf16 vs fp8. Swap has nothing to save on CPU (its homes live in the same memory) and is not run.
3. CUDA (only where present): peak VRAM and step time of inference and of a training step (LoRA-like
   trainable branch, gradient checkpointing), with and without swap, on a model with Lite's width.
4. --error: fp8 vs fp32 output error per scale granularity (tensor / channel / block) on the tiny
   and a model_dim-512 random model; the numbers behind k5core.fp8.MODES.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from k5core import fp8 as F8  # noqa: E402
from k5core.dit import K5DiT  # noqa: E402
from k5core.offload import BlockSwap, enable_block_swap, enable_gradient_checkpointing  # noqa: E402
from k5core.tasks import LITE, TINY, get_task  # noqa: E402
from k5core.tiny.dit import randomize_  # noqa: E402

MID = replace(TINY, model_dim=512, ff_dim=2048, num_text_blocks=1, num_visual_blocks=8, axes_dims=(16, 24, 24),
              time_dim=128)
MID4 = replace(MID, num_visual_blocks=4)
LITE8 = replace(LITE, num_text_blocks=1, num_visual_blocks=8)   # Lite's width, 8 of its 32 visual blocks


def inputs(p, batch=1, T=2, H=16, W=16, L=32, seed=1, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, p.visual_embed_dim, T, H, W, generator=g)
    out = (x, torch.full((batch,), 500.0), torch.randn(batch, L, p.in_text_dim, generator=g),
           torch.randn(batch, p.in_text_dim2, generator=g))
    return [v.to(device=device, dtype=dtype if v.is_floating_point() and v.ndim > 1 else v.dtype) for v in out]


def build(p, fp8=None, dtype=torch.bfloat16, device="cpu"):
    """A random DiT made directly in `dtype` (no fp32 copy), quantized when asked."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = K5DiT(p).requires_grad_(False).eval()
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for prm in model.parameters():
            prm.normal_(0, 0.02)
    return F8.quantize_model(model, fp8) if fp8 else model


def swapped_bytes(swap: BlockSwap) -> int:
    return sum(t.numel() * t.element_size() for homes in swap.homes.values() for t in homes.values())


def block_bytes(model) -> int:
    return max(F8.stored_bytes(b) for b in model.visual_transformer_blocks)


# ----------------------------------------------------------------------------- 1. bytes
def bytes_table(n_swap: int) -> None:
    print("== stored weight bytes (ratio to bf16); 'on GPU' = resident + 2 streamed blocks with swap")
    for label, p in (("lite", get_task("k5-lite-t2v-5s-sd").dit), ("pro", get_task("k5-pro-t2v-5s-sd").dit),
                     ("mid512x8", MID)):
        meta = label != "mid512x8"
        with torch.device("meta") if meta else torch.device("cpu"):
            bf16 = K5DiT(p).to(torch.bfloat16)
        base = F8.stored_bytes(bf16)
        rows = [("bf16", base)]
        for mode in F8.MODES:
            rows.append((f"fp8 {mode}", F8.stored_bytes(F8.quantize_model(copy.deepcopy(bf16), mode))))
        q = F8.quantize_model(copy.deepcopy(bf16), "e4m3fn_scaled")
        n = min(n_swap, p.num_visual_blocks)
        on_gpu = F8.stored_bytes(q) - n * block_bytes(q) + min(2, n) * block_bytes(q)
        rows.append((f"fp8 + swap {n}/{p.num_visual_blocks} (on GPU)", on_gpu))
        for name, b in rows:
            print(f"  {label:9s} {name:38s} {b / 2**30:8.3f} GiB  {b / base:6.3f}x")
        if not meta:   # the real mechanism agrees with the count above
            swap = enable_block_swap_quiet(q, n)
            assert F8.stored_bytes(q) - swapped_bytes(swap) == F8.stored_bytes(q) - n * block_bytes(q)


def enable_block_swap_quiet(model, n):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return enable_block_swap(model, n, "cpu")


# ----------------------------------------------------------------------------- 2. CPU RSS
def _status() -> dict[str, int]:
    return {k: int(v) * 1024 for k, v in re.findall(r"(Vm\w+):\s+(\d+) kB", Path("/proc/self/status").read_text())}


def child(config: str) -> None:
    """Run in a fresh process: build, measure resident weights, reset the peak, one forward."""
    torch.set_num_threads(2)
    x = inputs(MID, dtype=torch.bfloat16)
    rss0 = _status()["VmRSS"]
    model = build(MID, None if config == "bf16" else config)
    ctypes.CDLL("libc.so.6").malloc_trim(0)           # hand freed build-time memory back to the OS
    rss1 = _status()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")      # VmHWM := VmRSS
    with torch.no_grad():
        model(*x)
    print(json.dumps({"weights": rss1 - rss0, "peak": _status()["VmHWM"] - rss0}))


def cpu_rss() -> None:
    print("== CPU process memory of mid512x8 (fresh process each; one forward, 512 tokens)")
    if not Path("/proc/self/clear_refs").exists():
        print("  skipped: needs Linux /proc")
        return
    res = {}
    for config in ("bf16", "e4m3fn", "e4m3fn_scaled"):
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}   # big tensors: mmap, freed at once
        out = subprocess.run([sys.executable, __file__, "--child", config], capture_output=True, text=True,
                             check=True, env=env).stdout
        res[config] = json.loads(out.strip().splitlines()[-1])
    for config, r in res.items():
        print(f"  {config:14s} weights {r['weights'] / 2**20:7.1f} MiB ({r['weights'] / res['bf16']['weights']:.3f}x)"
              f"   peak {r['peak'] / 2**20:7.1f} MiB ({r['peak'] / res['bf16']['peak']:.3f}x)")
    print("  block swap: not run on CPU (swapped blocks' homes are in the same memory)")


# ----------------------------------------------------------------------------- 3. CUDA
def cuda_table(n_swap: int, steps: int = 5) -> None:
    print(f"== CUDA: LITE-width model with {LITE8.num_visual_blocks} visual blocks, bf16 activations")
    if not torch.cuda.is_available():
        print("  skipped: no CUDA device")
        return
    dev = torch.device("cuda")
    x = inputs(LITE8, T=4, H=64, W=64, L=128, device=dev, dtype=torch.bfloat16)   # 4096 visual tokens
    rows = []
    for fp8 in (None, "e4m3fn_scaled"):
        for n in (0, n_swap):
            for train in (False, True):
                model = build(LITE8, fp8, device="cpu")
                if train:
                    add_trainable(model)
                    enable_gradient_checkpointing(model)
                if n:
                    enable_block_swap(model, n, dev)
                else:
                    model.to(dev)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                times = []
                for i in range(steps + 1):
                    t0 = time.perf_counter()
                    if train:
                        inp = x[0].clone().requires_grad_(True)
                        model(inp, *x[1:]).float().square().mean().backward()
                    else:
                        with torch.no_grad():
                            model(*x)
                    torch.cuda.synchronize()
                    if i:
                        times.append(time.perf_counter() - t0)
                rows.append((fp8 or "bf16", n, "train" if train else "infer",
                             torch.cuda.max_memory_allocated(), statistics.median(times)))
                del model
                torch.cuda.empty_cache()
    base = {(r[2]): r for r in rows if r[0] == "bf16" and r[1] == 0}
    for w, n, kind, peak, t in rows:
        b = base[kind]
        print(f"  {w:14s} swap {n:2d} {kind:5s} peak {peak / 2**30:6.2f} GiB ({peak / b[3]:.3f}x)  "
              f"step {t * 1000:7.1f} ms ({t / b[4]:.2f}x)")


def add_trainable(model) -> None:
    """A trainable rank-16 branch on every visual q projection (what a LoRA adds)."""
    for block in model.visual_transformer_blocks:
        lin = block.self_attention.to_query
        dtype = torch.bfloat16
        lin.down = nn.Linear(lin.in_features, 16, bias=False, dtype=dtype)
        lin.up = nn.Linear(16, lin.out_features, bias=False, dtype=dtype)
        base_forward = lin.forward
        lin.forward = lambda h, lin=lin, f=base_forward: f(h) + lin.up(lin.down(h))


# ----------------------------------------------------------------------------- 4. error
def error_table(seeds: int) -> None:
    print(f"== fp8 vs fp32 output error (relative L2, mean over {seeds} seeds; 768 tokens, batch 2)")
    for label, p in (("tiny", TINY), ("mid512x4", MID4)):
        errs = {}
        for seed in range(seeds):
            model = randomize_(K5DiT(p), seed).eval()
            x = inputs(p, batch=2, T=3, H=8, W=8, L=7, seed=seed + 10)
            with torch.no_grad():
                ref = model(*x)
                for kind in ("tensor", "channel", "block"):
                    q = copy.deepcopy(model)
                    for name, m in list(q.named_modules()):
                        if F8.is_target(name) and type(m) is nn.Linear:
                            F8.set_module(q, name, F8.FP8Linear.from_linear(m, kind))
                    errs.setdefault(kind, []).append(((q(*x) - ref).norm() / ref.norm()).item())
        print("  " + label + "  " + "  ".join(f"{k} {statistics.mean(v):.4f} (max {max(v):.4f})"
                                              for k, v in errs.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks-to-swap", type=int, default=4)
    ap.add_argument("--error", action="store_true", help="also measure fp8 error per granularity (minutes)")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    bytes_table(args.blocks_to_swap)
    cpu_rss()
    cuda_table(args.blocks_to_swap)
    if args.error:
        error_table(args.seeds)


if __name__ == "__main__":
    main()
