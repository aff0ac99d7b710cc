"""Benchmark: our DiT vs diffusers' Kandinsky5Transformer3DModel, and load_dit's peak RSS.

Prints, side by side in one run: forward time of both on the same mid-size config, inputs and
threads (ratio ours/diffusers), and the RSS growth of `load_dit` relative to the checkpoint size
(≈1.0 means one copy of the weights in RAM). Not a test: run `python tests/bench/bench_dit.py`.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from k5core.files import save_safetensors  # noqa: E402
from k5core.loading import build_dit  # noqa: E402
from k5core.tasks import TINY, Task  # noqa: E402
from k5core.tiny.dit import randomize_  # noqa: E402

MID = replace(TINY, model_dim=512, ff_dim=2048, num_text_blocks=2, num_visual_blocks=8,
              axes_dims=(16, 24, 24), time_dim=256, in_text_dim=512, in_text_dim2=128)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def bench_forward(repeats: int) -> None:
    from diffusers import Kandinsky5Transformer3DModel
    ours = randomize_(build_dit(Task("bench", "t2v", MID))).eval()
    p = MID
    ref = Kandinsky5Transformer3DModel(
        in_visual_dim=16, out_visual_dim=16, in_text_dim=p.in_text_dim, in_text_dim2=p.in_text_dim2,
        time_dim=p.time_dim, patch_size=p.patch_size, model_dim=p.model_dim, ff_dim=p.ff_dim,
        num_text_blocks=p.num_text_blocks, num_visual_blocks=p.num_visual_blocks,
        axes_dims=p.axes_dims, visual_cond=True).eval()
    ref.load_state_dict(ours.state_dict())
    T, H, W, L = 5, 32, 32, 64
    x = torch.randn(1, 33, T, H, W)
    t, text, pooled = torch.tensor([500.0]), torch.randn(1, L, p.in_text_dim), torch.randn(1, p.in_text_dim2)
    pos = (torch.arange(T), torch.arange(H // 2), torch.arange(W // 2))
    with torch.no_grad():
        t_ours = timed(lambda: ours(x, t, text, pooled, scale_factor=(1, 2, 2)), repeats)
        xl = x.permute(0, 2, 3, 4, 1)
        t_ref = timed(lambda: ref(xl, text, t, pooled, pos, torch.arange(L), scale_factor=(1, 2, 2),
                                  return_dict=False), repeats)
    tokens = T * H * W // 4
    print(f"forward, model_dim {p.model_dim}, {p.num_visual_blocks} blocks, {tokens} visual tokens, "
          f"{torch.get_num_threads()} threads, fp32 CPU")
    print(f"  ours      {t_ours * 1000:8.1f} ms")
    print(f"  diffusers {t_ref * 1000:8.1f} ms")
    print(f"  ratio ours/diffusers = {t_ours / t_ref:.2f}")


def bench_load_rss() -> None:
    with tempfile.TemporaryDirectory() as d:
        big = replace(MID, num_visual_blocks=24)
        model = build_dit(Task("bench", "t2v", big)).to(torch.bfloat16)
        path = save_safetensors(model.state_dict(), Path(d) / "mid.safetensors")
        del model
        size = path.stat().st_size
        # a fresh process, so the figure is load_dit's own growth; the synthetic size matches no
        # official task, so the Task is given explicitly
        script = f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
from dataclasses import replace
from k5core.loading import load_dit
from k5core.tasks import Task, TINY
def rss():  # resident anonymous and file-backed (mmapped) memory, bytes
    f = dict(l.split(":") for l in open("/proc/self/status"))
    return [int(f[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile")]
big = replace(TINY, model_dim=512, ff_dim=2048, num_text_blocks=2, num_visual_blocks=24,
              axes_dims=(16, 24, 24), time_dim=256, in_text_dim=512, in_text_dim2=128)
before = rss()
m = load_dit({str(path)!r}, task=Task("bench", "t2v", big))
with torch.no_grad():
    touched = sum(float(p.float().sum()) for p in m.parameters())  # fault in every page
after = rss()
print(after[0] - before[0], after[1] - before[1])
"""
        anon, mapped = map(int, subprocess.check_output([sys.executable, "-c", script], text=True).split())
        total = anon + mapped
        print(f"load_dit RSS growth {total / 2**20:.1f} MiB ({anon / 2**20:.1f} anonymous + "
              f"{mapped / 2**20:.1f} mmapped file pages) for a {size / 2**20:.1f} MiB file "
              f"-> ratio {total / size:.2f} (1.0 = one copy of the weights)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    bench_forward(args.repeats)
    bench_load_rss()
