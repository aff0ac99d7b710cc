"""A tiny training dataset written to disk: short clips of moving shapes, png images, captions and
a dataset TOML. Used by the tests and the demo; takes well under a second."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from k5core.files import atomic_write_text
from k5core.media import write_image, write_video

COLORS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (240, 220, 40),
          "white": (245, 245, 245)}


def shape_frame(size: tuple[int, int], t: float, color, shape: str = "square", direction: int = 1) -> np.ndarray:
    """One uint8 (H, W, 3) frame: a shape of `color` at horizontal position t in [0, 1] on a dark
    vertical gradient."""
    w, h = size
    ys, xs = np.mgrid[0:h, 0:w]
    frame = np.empty((h, w, 3), np.uint8)
    frame[...] = (20 + 40 * ys / max(h - 1, 1))[..., None].astype(np.uint8)
    r = max(2, min(w, h) // 6)
    cx = int(r + (w - 2 * r) * (t if direction > 0 else 1 - t))
    cy = h // 2
    if shape == "circle":
        inside = (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    else:
        inside = (abs(xs - cx) <= r) & (abs(ys - cy) <= r)
    frame[inside] = color
    return frame


def make_tiny_dataset(dir: str | os.PathLike, n_videos: int = 3, n_images: int = 2, frames: int = 9,
                      size: tuple[int, int] = (64, 64), corrupt: bool = False) -> Path:
    """Write clips (`frames` frames, `size` = (w, h)), images and .txt captions under `dir`, and
    `dir/dataset.toml` with one video and one image dataset (caches in `dir/cache/...`).

    corrupt=True adds two broken videos with captions: `broken.mp4` (random bytes) and
    `empty.mp4` (0 bytes); caching lists them as failed and goes on.
    """
    root = Path(dir)
    names = list(COLORS)
    tables = ['[general]', f'resolution = [{size[0]}, {size[1]}]', 'caption_extension = ".txt"',
              'batch_size = 1', 'enable_bucket = false', 'architecture = "kandinsky5"', '']
    if n_videos or corrupt:
        videos = root / "videos"
        videos.mkdir(parents=True, exist_ok=True)
        for i in range(n_videos):
            color, shape, direction = names[i % len(names)], ("square", "circle")[i % 2], (1, -1)[(i // 2) % 2]
            clip = np.stack([shape_frame(size, k / max(frames - 1, 1), COLORS[color], shape, direction)
                             for k in range(frames)])
            write_video(clip, videos / f"clip{i}.mp4", fps=24)
            way = "right" if direction > 0 else "left"
            atomic_write_text(videos / f"clip{i}.txt", f"a {color} {shape} moving {way} on a dark background")
        if corrupt:
            (videos / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(2048))
            (videos / "empty.mp4").write_bytes(b"")
            atomic_write_text(videos / "broken.txt", "a broken video")
            atomic_write_text(videos / "empty.txt", "an empty video")
        tables += ['[[datasets]]', 'video_directory = "videos"', 'cache_directory = "cache/videos"',
                   f'target_frames = [{frames}]', 'frame_extraction = "head"', '']
    if n_images:
        images = root / "images"
        images.mkdir(parents=True, exist_ok=True)
        for i in range(n_images):
            color, shape = names[(i + 2) % len(names)], ("circle", "square")[i % 2]
            write_image(shape_frame(size, 0.5, COLORS[color], shape), images / f"image{i}.png")
            atomic_write_text(images / f"image{i}.txt", f"a {color} {shape} in the middle of a dark picture")
        tables += ['[[datasets]]', 'image_directory = "images"', 'cache_directory = "cache/images"', '']
    return atomic_write_text(root / "dataset.toml", "\n".join(tables))
