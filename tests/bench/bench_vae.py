"""Peak memory and time of tiled vs untiled HunyuanVideo VAE decode, side by side in one run.

    python tests/bench/bench_vae.py [--width-div 4] [--latent 5 24 24] [--tile 96 --overlap 32 --chunk 9]

A random-weight AutoencoderKLHunyuanVideo with the real structure (4 levels, 2 resnets, mid attention)
and the real widths divided by --width-div (default 4: 32/64/128/128, so a CPU finishes in minutes;
--width-div 1 is the real network) is saved as a diffusers folder and loaded with k5core.vae.load_vae.
Each variant decodes the same latent in a fresh process: peak = growth of the process's max RSS during
decode on CPU, or torch.cuda.max_memory_allocated growth on CUDA. Prints both, their ratios, and the
peak per decoded pixel-frame, which (times width-div, halved for bf16) estimates the real network's
activation memory per pixel-frame; the README's 12 GB guidance rests on that figure. Not a test.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from k5core.vae import VAETiling, load_vae  # noqa: E402

REAL_WIDTHS = (128, 256, 512, 512)


def make_network(folder: Path, width_div: int) -> None:
    """Save a random AutoencoderKLHunyuanVideo with the real structure and widths / width_div."""
    from diffusers import AutoencoderKLHunyuanVideo
    torch.manual_seed(0)
    net = AutoencoderKLHunyuanVideo(block_out_channels=tuple(w // width_div for w in REAL_WIDTHS),
                                    norm_num_groups=32 // width_div)
    net.save_pretrained(folder, safe_serialization=True)


def peak_now(device: str) -> int:
    """High-water mark of memory in bytes: CUDA allocator, or the process's max RSS."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(args) -> None:
    """Decode once with one variant and print {"peak": bytes, "seconds": s, "tiles": n} as JSON."""
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    vae = load_vae(args.folder, device=args.device, dtype=dtype)
    t, h, w = args.latent
    z = torch.randn(1, 16, t, h, w, generator=torch.Generator().manual_seed(0)).to(args.device)
    tiling = (VAETiling(spatial_tile=args.tile, spatial_overlap=args.overlap, temporal_chunk=args.chunk,
                        temporal_overlap=args.temporal_overlap) if args.child == "tiled"
              else VAETiling(enabled=False))
    steps = []
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = peak_now(args.device) if args.device == "cuda" else None
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    video = vae.decode(z, tiling=tiling, progress=lambda *a: steps.append(a))
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = peak_now(args.device) - (before if before is not None else base)
    print(json.dumps({"peak": peak, "seconds": seconds, "tiles": len(steps),
                      "pixel_frames": video.shape[2] * video.shape[3] * video.shape[4]}))


def run_variant(name: str, args) -> dict:
    """Run one variant in a fresh interpreter so its peak is its own."""
    cmd = [sys.executable, __file__, "--child", name, "--folder", str(args.folder), "--device", args.device,
           "--latent", *map(str, args.latent), "--tile", str(args.tile), "--overlap", str(args.overlap),
           "--chunk", str(args.chunk), "--temporal-overlap", str(args.temporal_overlap)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width-div", type=int, default=4, help="divide the real widths (1 = real network)")
    p.add_argument("--latent", type=int, nargs=3, default=(5, 24, 24), metavar=("T", "H", "W"))
    p.add_argument("--tile", type=int, default=96)
    p.add_argument("--overlap", type=int, default=32)
    p.add_argument("--chunk", type=int, default=9)
    p.add_argument("--temporal-overlap", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--child", choices=["tiled", "untiled"], help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    with tempfile.TemporaryDirectory() as tmp:
        args.folder = Path(tmp) / "vae"
        make_network(args.folder, args.width_div)
        t, h, w = args.latent
        print(f"HunyuanVideo VAE decode, widths {tuple(x // args.width_div for x in REAL_WIDTHS)}, "
              f"latent (1, 16, {t}, {h}, {w}) -> video {(t - 1) * 4 + 1} x {h * 8} x {w * 8}, "
              f"device {args.device}, torch threads {torch.get_num_threads()}")
        print(f"tiled: tile {args.tile} px, overlap {args.overlap} px, chunk {args.chunk} frames, "
              f"temporal overlap {args.temporal_overlap} frames")
        results = {name: run_variant(name, args) for name in ("untiled", "tiled")}

    print(f"{'':10}{'peak MB':>10}{'seconds':>10}{'tiles':>7}{'peak B / px-frame':>20}")
    for name, r in results.items():
        print(f"{name:10}{r['peak'] / 2**20:10.0f}{r['seconds']:10.1f}{r['tiles']:7d}"
              f"{r['peak'] / r['pixel_frames']:20.0f}")
    u, tl = results["untiled"], results["tiled"]
    print(f"{'tiled/untiled':14}peak x{tl['peak'] / u['peak']:.2f}   time x{tl['seconds'] / u['seconds']:.2f}")
    per_px = u["peak"] / u["pixel_frames"] * args.width_div / (2 if args.device == "cpu" else 1)
    print(f"estimate for the real network in bf16: {per_px:.0f} B per decoded pixel-frame "
          f"(untiled figure x width-div{', / 2 for bf16' if args.device == 'cpu' else ''})")


if __name__ == "__main__":
    main()
