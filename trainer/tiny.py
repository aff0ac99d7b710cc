"""A complete tiny training setup on disk – random DiT, VAE and text encoders, a dataset of moving
shapes with its latent and text caches, a sample prompt file – for the tests, the benchmark and a
smoke run of the trainer without downloading anything:

    python -m trainer.tiny DIR [--task k5-tiny-i2v]   # prints the `python -m trainer` flags to use
"""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from k5core.files import atomic_write_text
from k5core.tasks import get_task


def make_tiny_setup(root, task: str = "k5-tiny-t2v", n_videos: int = 1, n_images: int = 0, frames: int = 9,
                    seed: int = 0) -> dict[str, Path]:
    """Write everything a tiny training run needs under `root`; returns the paths:
    dit, dataset_config, vae, text_encoder_qwen, text_encoder_clip, sample_prompts, image (I2V first frame)."""
    from k5core.cache import cache_latents, cache_text_encoder_outputs
    from k5core.data import load_dataset_config
    from k5core.media import write_image
    from k5core.text import TextEncoder
    from k5core.tiny.dataset import COLORS, make_tiny_dataset, shape_frame
    from k5core.tiny.dit import write_tiny_dit
    from k5core.tiny.text import make_tiny_text_encoders
    from k5core.tiny.vae import make_tiny_hunyuan_vae
    from k5core.vae import load_vae

    root = Path(root)
    t = get_task(task)
    paths = {"dataset_config": make_tiny_dataset(root / "data", n_videos=n_videos, n_images=n_images, frames=frames),
             "dit": write_tiny_dit(root / "models", task, seed=seed),
             "vae": make_tiny_hunyuan_vae(root / "models" / "vae", seed=seed)["comfy"]}
    te = make_tiny_text_encoders(root / "comfy", seed=seed)
    paths["text_encoder_qwen"], paths["text_encoder_clip"] = te["qwen_file"], te["clip_file"]
    config = load_dataset_config(paths["dataset_config"])
    report = cache_latents(config, load_vae(paths["vae"]), i2v=t.mode == "i2v", task=task)
    encoder = TextEncoder.load(te["qwen_file"], te["clip_file"], text_dim=t.dit.in_text_dim,
                               pooled_dim=t.dit.in_text_dim2)
    text_report = cache_text_encoder_outputs(config, encoder, content=t.content, task=task)
    if report.failed or text_report.failed:
        raise RuntimeError(f"tiny caches failed: {report.failed + text_report.failed}")
    paths["image"] = write_image(shape_frame((64, 64), 0.0, COLORS["red"]), root / "first_frame.png")
    image = f" --i {paths['image'].name}" if t.mode == "i2v" else ""
    paths["sample_prompts"] = atomic_write_text(
        root / "prompts.txt", f"# tiny sample prompt\na red square moving right --w 64 --h 64 --f 5 --s 2 --d 1{image}\n")
    return paths


def flags(paths: dict[str, Path], task: str, output_dir, **extra) -> list[str]:
    """`python -m trainer` arguments for a tiny setup; extra settings as name=value (True -> bare flag)."""
    argv = ["--task", task, "--dit", str(paths["dit"]), "--dataset_config", str(paths["dataset_config"]),
            "--output_dir", str(output_dir)]
    for name, value in extra.items():
        if value is True:
            argv.append(f"--{name}")
        elif value is False:
            argv.append(f"--no-{name}")
        elif value is not None:
            argv += [f"--{name}", str(value)]
    return argv


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m trainer.tiny", description=__doc__.split("\n\n")[0])
    p.add_argument("root")
    p.add_argument("--task", default="k5-tiny-t2v", choices=("k5-tiny-t2v", "k5-tiny-i2v"))
    args = p.parse_args()
    paths = make_tiny_setup(args.root, args.task)
    print(shlex.join(["python", "-m", "trainer", *flags(paths, args.task, Path(args.root) / "out")]))


if __name__ == "__main__":
    main()
