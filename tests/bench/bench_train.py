"""Training step time and peak memory with and without the memory savers, as ratios to a plain run.

    python tests/bench/bench_train.py                       # CPU: tiny task, latent 9x32x32
    python tests/bench/bench_train.py --task k5-lite-t2v-5s-sd --latent 9 64 96 --swap 16   # a GPU

Each configuration runs in a fresh process (peak memory is per process: the CUDA allocator peak on a
GPU, the resident-set peak on the CPU) through the trainer's own step (trainer.loop.Trainer: the DiT
loaded from a random checkpoint written once, LoRA rank 32, AdamW, one batch of random latents and
text). Printed: median step time over the measured steps and peak memory, each also as a ratio to
"plain". On the CPU block swap has nothing to do (the weights are in CPU memory already).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

CONFIGS = {
    "plain": {},
    "checkpointing": {"gradient_checkpointing": True},
    "checkpointing+offload": {"gradient_checkpointing": True, "gradient_checkpointing_cpu_offload": True},
    "fp8": {"fp8_base": True},
    "swap": {"blocks_to_swap": "SWAP"},
    "all": {"gradient_checkpointing": True, "fp8_base": True, "blocks_to_swap": "SWAP"},
}


def write_checkpoint(task: str, folder: Path, dtype: torch.dtype) -> Path:
    """A random DiT of the task's size, written once for every configuration."""
    from k5core.files import save_safetensors
    from k5core.loading import build_dit
    from k5core.tasks import get_task
    from k5core.tiny.dit import randomize_
    model = randomize_(build_dit(get_task(task)), seed=0)
    return save_safetensors({k: v.to(dtype) for k, v in model.state_dict().items()}, folder / f"{task}.safetensors")


def run_one(args) -> dict:
    """Time `args.steps` training steps of one configuration in this process."""
    from trainer.config import TrainConfig
    from trainer.events import EventWriter
    from trainer.loop import Trainer, peak_memory
    from k5core.tasks import get_task

    settings = json.loads(args.one)
    cfg = TrainConfig(task=args.task, dit=args.dit, dataset_config="-", output_dir=tempfile.gettempdir(),
                      optimizer_type="adamw", network_dim=32, seed=0, mixed_precision=args.mixed_precision,
                      **settings)
    trainer = Trainer(cfg, EventWriter(enabled=False))
    trainer.setup_model(args.steps)
    task = get_task(args.task)
    t, h, w = args.latent
    device = trainer.device
    g = torch.Generator().manual_seed(0)
    batch = {"latent": torch.randn(args.batch, 16, t, h, w, generator=g),
             "text_embed": torch.randn(args.batch, 128, task.dit.in_text_dim, generator=g),
             "text_mask": torch.ones(args.batch, 128, dtype=torch.bool),
             "pooled": torch.randn(args.batch, task.dit.in_text_dim2, generator=g)}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        trainer.micro_step(batch, 1.0)
        trainer.optimizer_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - began)
    return {"step_s": statistics.median(times[args.warmup:]), "peak_bytes": peak_memory(device),
            "device": str(device)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    p.add_argument("--task", default="k5-lite-t2v-5s-sd" if cuda else "k5-tiny-t2v")
    p.add_argument("--latent", type=int, nargs=3, metavar=("T", "H", "W"), default=(9, 64, 96) if cuda else (9, 32, 32),
                   help="latent frames, height, width (pixels / 8; 4(T-1)+1 frames)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--swap", type=int, default=None, help="blocks to swap (default: half the visual blocks)")
    p.add_argument("--mixed_precision", default="bf16" if cuda else "no")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--dit", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return

    from k5core.tasks import get_task
    swap = args.swap if args.swap is not None else get_task(args.task).dit.num_visual_blocks // 2
    with tempfile.TemporaryDirectory() as tmp:
        dit = write_checkpoint(args.task, Path(tmp), torch.bfloat16 if cuda else torch.float32)
        rows = {}
        for name in args.configs.split(","):
            settings = {k: (swap if v == "SWAP" else v) for k, v in CONFIGS[name].items()}
            cmd = [sys.executable, __file__, "--one", json.dumps(settings), "--dit", str(dit), "--task", args.task,
                   "--latent", *map(str, args.latent), "--batch", str(args.batch), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--mixed_precision", args.mixed_precision]
            env = os.environ if cuda else {**os.environ, "OMP_NUM_THREADS": "1"}   # tiny CPU matmuls: 1 thread
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
            if out.returncode != 0:
                print(f"{name:24s} failed: {out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode}")
                continue
            rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
    if "plain" not in rows:
        print("no plain run to compare with")
        return
    base = rows["plain"]
    t, h, w = args.latent
    print(f"task {args.task}, latent {t}x{h}x{w} ({t * h * w // 4} tokens), batch {args.batch}, "
          f"{args.mixed_precision}, swap {swap} blocks, on {base['device']}, median of {args.steps} steps")
    print(f"{'config':24s} {'step s':>9s} {'time x':>7s} {'peak MiB':>10s} {'memory x':>9s}")
    for name, r in rows.items():
        print(f"{name:24s} {r['step_s']:9.4f} {r['step_s'] / base['step_s']:7.2f} {r['peak_bytes'] / 2**20:10.0f} "
              f"{r['peak_bytes'] / base['peak_bytes']:9.2f}")


if __name__ == "__main__":
    main()
