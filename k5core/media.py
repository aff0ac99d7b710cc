"""Reading and writing video and image files: PyAV for video, Pillow for png.

Readers return uint8 tensors (frames last-channel, as decoded); writers take uint8 or float
[0, 1] frames and write atomically (temp file + rename), so a crash never leaves half a file.
Every error names the file and says what was wrong with it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from k5core.files import atomic_path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".avif")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".flv", ".wmv", ".m4v", ".mpg", ".mpeg",
                    ".gif")


class MediaError(ValueError):
    """A media file that cannot be read; the message names the file."""


@dataclass(frozen=True)
class VideoInfo:
    frames: int    # number of frames in the first video stream
    fps: float     # average frame rate (0.0 when the container does not say)
    width: int
    height: int


def _check_nonempty(path: Path) -> None:
    """Raise MediaError for a missing or zero-length file (PyAV's own message is cryptic)."""
    if not path.is_file():
        raise MediaError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise MediaError(f"{path}: empty file (0 bytes)")


def _reason(e: Exception) -> str:
    """PyAV's error text without the file name it repeats."""
    return getattr(e, "strerror", None) or str(e)


def _open_video(path: Path):
    """Open a container and its first video stream, or raise MediaError naming the file."""
    _check_nonempty(path)
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise MediaError(f"{path}: cannot open video ({_reason(e)})") from None
    if not container.streams.video:
        container.close()
        raise MediaError(f"{path}: no video stream in the file")
    return container, container.streams.video[0]


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Frame count, fps and size of a video without decoding it (counts packets when the
    container has no frame count, e.g. mkv/webm)."""
    path = Path(path)
    container, stream = _open_video(path)
    try:
        rate = stream.average_rate or stream.guessed_rate
        width, height = stream.codec_context.width, stream.codec_context.height
        frames = stream.frames
        if frames <= 0:
            frames = sum(1 for p in container.demux(stream) if p.size > 0)
    except av.error.FFmpegError as e:
        raise MediaError(f"{path}: cannot read video ({_reason(e)})") from None
    finally:
        container.close()
    if frames <= 0 or width <= 0 or height <= 0:
        raise MediaError(f"{path}: no decodable video frames ({frames} frames, {width}x{height})")
    return VideoInfo(frames=frames, fps=float(rate) if rate else 0.0, width=width, height=height)


def read_video_frames(path: str | os.PathLike, indices: list[int] | None = None) -> torch.Tensor:
    """Decode frames `indices` (all frames when None) in the order given -> uint8 (F, H, W, 3).

    Decoding runs once from the start and stops after the largest index; repeated indices are fine.
    """
    path = Path(path)
    wanted = None if indices is None else sorted(set(int(i) for i in indices))
    if wanted is not None and (not wanted or wanted[0] < 0):
        raise ValueError(f"{path}: frame indices must be non-negative and not empty, got {indices}")
    last = None if wanted is None else wanted[-1]
    wanted_set = None if wanted is None else set(wanted)
    frames: dict[int, np.ndarray] = {}
    decoded = 0
    container, stream = _open_video(path)
    stream.thread_type = "AUTO"                      # frame + slice threads: long clips decode faster
    try:
        for i, frame in enumerate(container.decode(stream)):
            decoded = i + 1
            if wanted_set is None or i in wanted_set:
                frames[i] = frame.to_ndarray(format="rgb24")  # (H, W, 3)
            if last is not None and i >= last:
                break
    except av.error.FFmpegError as e:
        raise MediaError(f"{path}: corrupt video, decoding failed after {decoded} frames ({_reason(e)})") from None
    finally:
        container.close()
    if decoded == 0:
        raise MediaError(f"{path}: no decodable video frames")
    if last is not None and last >= decoded:
        raise MediaError(f"{path}: frame {last} requested but the video has only {decoded} decodable frames")
    order = list(range(decoded)) if indices is None else [int(i) for i in indices]
    return torch.from_numpy(np.stack([frames[i] for i in order]))


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """Read an image as RGB -> uint8 (H, W, 3); alpha is dropped, palette/grey images are expanded."""
    path = Path(path)
    _check_nonempty(path)
    try:
        with Image.open(path) as im:
            rgb = np.array(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise MediaError(f"{path}: cannot read image ({e})") from None
    return torch.from_numpy(rgb)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the image header, without decoding the pixels."""
    path = Path(path)
    _check_nonempty(path)
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise MediaError(f"{path}: cannot read image ({e})") from None


def to_uint8(frames) -> np.ndarray:
    """uint8 array from uint8 or float [0, 1] data (tensor or array), any leading shape."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu()
        if frames.dtype != torch.uint8:
            frames = (frames.float().clamp(0, 1) * 255).round().to(torch.uint8)
        return frames.numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = (np.clip(frames.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    return frames


def video_codec() -> str:
    """The encoder write_video uses: libx264 when this PyAV build has it, else mpeg4."""
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def _even(frames: np.ndarray) -> np.ndarray:
    """Pad (F, H, W, 3) to even H and W by repeating the last row/column (yuv420p needs it)."""
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames


def write_video(frames, path: str | os.PathLike, fps: float = 24, crf: int = 18,
                metadata: dict | None = None) -> Path:
    """Write (F, H, W, 3) frames (uint8, or float in [0, 1]) as an mp4, atomically.

    H.264 (libx264, yuv420p, `crf`) when available, else MPEG-4 Part 2 at high quality.
    Odd sizes are padded by one edge pixel. `metadata` goes into the container tags.
    """
    path = Path(path)
    data = to_uint8(frames)
    if data.ndim != 4 or data.shape[-1] != 3 or data.shape[0] == 0:
        raise ValueError(f"{path}: write_video expects frames (F, H, W, 3) with F >= 1, got {tuple(data.shape)}")
    data = _even(data)
    codec = video_codec()
    with atomic_path(path) as tmp:
        with av.open(str(tmp), "w", format="mp4", options={"movflags": "+use_metadata_tags"}) as out:
            for k, v in (metadata or {}).items():
                out.metadata[str(k)] = str(v)
            options = {"crf": str(crf), "preset": "medium"} if codec == "libx264" else {"qscale": "2"}
            stream = out.add_stream(codec, rate=Fraction(float(fps)).limit_denominator(1001), options=options)
            stream.width, stream.height, stream.pix_fmt = data.shape[2], data.shape[1], "yuv420p"
            for frame in data:
                out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            out.mux(stream.encode())
    return path


def write_image(image, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write an (H, W, 3) image (uint8, or float in [0, 1]) as png with `metadata` as text chunks,
    atomically."""
    path = Path(path)
    data = to_uint8(image)
    if data.ndim != 3 or data.shape[-1] != 3:
        raise ValueError(f"{path}: write_image expects an image (H, W, 3), got {tuple(data.shape)}")
    info = PngImagePlugin.PngInfo()
    for k, v in (metadata or {}).items():
        info.add_text(str(k), str(v))
    with atomic_path(path) as tmp:
        Image.fromarray(data).save(tmp, format="PNG", pnginfo=info)
    return path
