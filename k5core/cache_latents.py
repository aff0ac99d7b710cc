"""`python -m k5core.cache_latents`: encode a dataset's images and video windows into latent caches.

    python -m k5core.cache_latents --dataset_config dataset.toml --vae hunyuan_video_vae_bf16.safetensors \
        [--task k5-lite-t2v-5s-sd] [--batch_size 1] [--device cuda] [--vae_dtype bfloat16] [--skip_existing] \
        [--vae_tiling] [--vae_spatial_tile_sample_min_size 256] [--vae_chunk_size 17]

Flags follow musubi-tuner's cache_latents scripts. A progress line goes to stderr, the counts
(cached, skipped, failed, with a reason per failed file) to stdout. Exit status 1 only when no
item has a usable cache; 2 for a bad config or flags.
"""
from __future__ import annotations

import argparse
import shutil
import sys


from k5core.cache import CacheReport, cache_latents
from k5core.data import DatasetConfigError, load_dataset_config, snap_frames
from k5core.devices import pick_device, pick_dtype
from k5core.tasks import get_task

DEFAULT_TASK = "k5-lite-t2v-5s-sd"


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Flags both cache commands share."""
    parser.add_argument("--dataset_config", required=True, help="dataset TOML (musubi-tuner schema)")
    parser.add_argument("--task", default=DEFAULT_TASK,
                        help=f"task the caches are for (prompt template, I2V, dims); default {DEFAULT_TASK}")
    parser.add_argument("--batch_size", type=int, default=None, help="items encoded at once")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda if available)")
    parser.add_argument("--skip_existing", action="store_true",
                        help="keep valid existing caches; stale or broken ones are rebuilt")


class ProgressLine:
    """One self-overwriting status line on stderr: `[label] 12/40 cached: clip3.mp4 [0:+49]`."""

    def __init__(self, label: str, stream=None):
        self.label, self.stream, self.shown = label, stream or sys.stderr, False

    def __call__(self, done: int, total: int, info: str) -> None:
        width = shutil.get_terminal_size((100, 20)).columns - 1
        line = f"[{self.label}] {done}/{total} {info}"
        self.stream.write("\r" + line[:width].ljust(width) if self.stream.isatty() else line + "\n")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown and self.stream.isatty():
            self.stream.write("\n")
            self.stream.flush()


def common_setup(parser: argparse.ArgumentParser, args):
    """(task, dataset config, device) from the shared flags; bad values exit 2 with the reason."""
    try:
        task = get_task(args.task)
    except KeyError as e:
        parser.error(str(e.args[0]))
    return task, load_config_or_exit(args.dataset_config), pick_device(args.device)


def load_config_or_exit(path: str):
    """The dataset config, or exit 2 with every problem listed; config warnings go to stderr."""
    try:
        config = load_dataset_config(path)
    except DatasetConfigError as e:
        print(f"error: dataset config has problems:\n{e}", file=sys.stderr)
        raise SystemExit(2) from None
    for w in config.warnings:
        print(f"warning: {w}", file=sys.stderr)
    return config


def finish(report: CacheReport, what: str) -> int:
    """Print the counts and the failed files; exit status 1 when nothing is usable."""
    print(f"{what}: {report.summary()}")
    for path, reason in report.failed:
        print(f"  failed: {path}: {reason.removeprefix(path + ': ')}")
    if report.usable == 0:
        print(f"error: no usable {what}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m k5core.cache_latents", description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--vae", required=True, help="HunyuanVideo VAE (any layout), or the Flux VAE for image tasks")
    parser.add_argument("--vae_dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on GPU)")
    parser.add_argument("--vae_tiling", action="store_true",
                        help="tile the VAE spatially (on by default in this engine; tiles cost nothing on small inputs)")
    parser.add_argument("--vae_spatial_tile_sample_min_size", type=int, default=None,
                        help="spatial tile side in pixels (multiple of 8, default 256); implies --vae_tiling")
    parser.add_argument("--vae_chunk_size", type=int, default=None,
                        help="pixel frames per temporal VAE chunk, rounded down to 4k+1 (default 17)")
    args = parser.parse_args(argv)

    task, config, device = common_setup(parser, args)

    from k5core.vae import load_vae
    try:
        vae = load_vae(args.vae, device=device, dtype=pick_dtype(args.vae_dtype, device))
    except (OSError, ValueError) as e:
        parser.error(f"cannot load the VAE: {e}")
    if vae.kind != task.vae:
        parser.error(f"task {task.name} uses the {task.vae} VAE, but {args.vae} is a {vae.kind} VAE")
    tiling = {}
    if args.vae_spatial_tile_sample_min_size is not None:          # overlap 1/4 of a tile, as HunyuanVideo's
        tiling["spatial_tile"] = args.vae_spatial_tile_sample_min_size
        tiling["spatial_overlap"] = args.vae_spatial_tile_sample_min_size // 32 * 8
    if args.vae_chunk_size is not None:
        tiling["temporal_chunk"] = max(9, snap_frames(args.vae_chunk_size))
    if tiling or args.vae_tiling:
        try:
            vae.set_tiling(True, **tiling)
        except ValueError as e:
            parser.error(str(e))

    line = ProgressLine("cache latents")
    try:
        report = cache_latents(config, vae, skip_existing=args.skip_existing, i2v=task.mode == "i2v",
                               batch_size=args.batch_size or 1, progress=line, task=task.name)
    finally:
        line.close()
    return finish(report, "latent caches")


if __name__ == "__main__":
    sys.exit(main())
