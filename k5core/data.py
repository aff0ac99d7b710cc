"""Training datasets: the musubi-tuner dataset TOML, items with captions, buckets and frame windows.

A dataset TOML has a `[general]` table and `[[datasets]]` tables (the schema of musubi-tuner's
`docs/dataset_config.md`, so existing configs work). `collect_items` turns one dataset into items,
one per training sample: an image, or one window of frames of a video. `load_item_pixels` decodes
an item and resizes/crops it to its bucket, ready for the VAE.

Differences from musubi-tuner (all additive or stricter in a helpful way):
- `caption_extension` defaults to ".txt" (musubi: none, which fails on the first item).
- An item whose caption file is missing, or whose file is corrupt, or a video shorter than every
  target, becomes a *failed* item (listed with a reason) instead of stopping or silently vanishing.
- Relative paths resolve against the TOML's folder, falling back to the current directory when
  the path exists only there.
- `enable_bucket = false` is honoured for videos too (musubi always buckets videos when caching),
  and bucket sizes are always multiples of 16, also for a `resolution` that is not.
- `architecture` may be set to "kandinsky5" (or "k5"); other architectures are refused.
- FramePack/control keys musubi knows (`control_directory`, `fp_*`, ...) are accepted and
  ignored with a warning; unknown keys are errors that name the line and suggest the closest key.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from k5core import media

try:
    import tomllib                                   # Python >= 3.11
except ModuleNotFoundError:                          # Python 3.10 (older ComfyUI installs)
    import tomli as tomllib

ARCHITECTURE = "kandinsky5"
ARCHITECTURE_ALIASES = ("kandinsky5", "k5", "kandinsky5_full")
FRAME_EXTRACTION_MODES = ("head", "chunk", "slide", "uniform", "full")
TARGET_FPS = 24.0            # Kandinsky 5 video models are trained on 24 fps video
BUCKET_STEP = 16             # VAE stride 8 x DiT patch 2
DEFAULT_RESOLUTION = (960, 544)
DEFAULT_CAPTION_EXTENSION = ".txt"


class DatasetConfigError(ValueError):
    """A dataset config that cannot be used; `problems` lists every problem found, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# ---------------------------------------------------------------------------------------------
# Schema: each key has a converter that returns the clean value or raises _Bad("must be ...").

class _Bad(Exception):
    pass


def _int(v, minimum=1):
    if isinstance(v, bool) or not isinstance(v, int):
        raise _Bad(f"must be an integer, got {_show(v)}")
    if v < minimum:
        raise _Bad(f"must be >= {minimum}, got {v}")
    return v


def _bool(v):
    if not isinstance(v, bool):
        raise _Bad(f"must be true or false, got {_show(v)}")
    return v


def _str(v):
    if not isinstance(v, str):
        raise _Bad(f"must be a string, got {_show(v)}")
    return v


def _float(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
        raise _Bad(f"must be a positive number like 30.0, got {_show(v)}")
    return float(v)


def _resolution(v):
    if isinstance(v, list) and len(v) == 2:
        return (_int(v[0], 16), _int(v[1], 16))
    if isinstance(v, int) and not isinstance(v, bool):
        return (_int(v, 16), v)
    raise _Bad(f"must be [width, height] or one integer, got {_show(v)}")


def _int_list(v):
    if not isinstance(v, list) or not v:
        raise _Bad(f"must be a non-empty list of integers like [1, 25, 45], got {_show(v)}")
    return [_int(x) for x in v]


def _extraction(v):
    if v not in FRAME_EXTRACTION_MODES:
        raise _Bad(f"must be one of {', '.join(FRAME_EXTRACTION_MODES)}, got {_show(v)}")
    return v


def _architecture(v):
    if v not in ARCHITECTURE_ALIASES:
        raise _Bad(f"must be \"kandinsky5\" (this trainer only does Kandinsky 5), got {_show(v)}")
    return ARCHITECTURE


def _show(v) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "table"}
    return f"{kind.get(type(v), type(v).__name__)} {v!r}"


COMMON_KEYS = {"resolution": _resolution, "caption_extension": _str, "batch_size": _int,
               "num_repeats": _int, "enable_bucket": _bool, "bucket_no_upscale": _bool,
               "architecture": _architecture}
IMAGE_KEYS = {"image_directory": _str, "image_jsonl_file": _str, "cache_directory": _str}
VIDEO_KEYS = {"video_directory": _str, "video_jsonl_file": _str, "cache_directory": _str,
              "target_frames": _int_list, "frame_extraction": _extraction, "frame_stride": _int,
              "frame_sample": _int, "max_frames": _int, "source_fps": _float}
# Keys musubi-tuner accepts for other architectures: accepted so shared configs load, then ignored.
IGNORED_KEYS = {"control_directory": "control images are not used by Kandinsky 5 training",
                "multiple_target": "a Qwen-Image-Layered setting", "fp_latent_window_size": "a FramePack setting",
                "fp_1f_clean_indices": "a FramePack setting", "fp_1f_target_index": "a FramePack setting",
                "fp_1f_no_post": "a FramePack setting", "no_resize_control": "a control-image setting",
                "control_resolution": "a control-image setting", "debug_dataset": "a musubi debug option"}
SOURCE_KEYS = ("image_directory", "image_jsonl_file", "video_directory", "video_jsonl_file")


# ---------------------------------------------------------------------------------------------
# Parsed config

@dataclass
class DatasetSpec:
    """One `[[datasets]]` table with [general] and defaults filled in; paths are absolute."""
    index: int                                   # 0-based position in the config
    kind: str                                    # "image" | "video"
    source: Path                                 # the directory or jsonl file
    source_key: str                              # which key named it, e.g. "video_directory"
    cache_directory: Path
    resolution: tuple[int, int] = DEFAULT_RESOLUTION   # (width, height)
    caption_extension: str = DEFAULT_CAPTION_EXTENSION
    batch_size: int = 1
    num_repeats: int = 1
    enable_bucket: bool = False
    bucket_no_upscale: bool = False
    target_frames: tuple[int, ...] = (1,)       # each 4k+1
    frame_extraction: str = "head"
    frame_stride: int = 1
    frame_sample: int = 1
    max_frames: int = 129
    source_fps: float | None = None
    architecture: str = ARCHITECTURE

    @property
    def is_jsonl(self) -> bool:
        return self.source_key.endswith("_jsonl_file")

    @property
    def label(self) -> str:
        """How messages name this dataset: `[[datasets]] #2 (video_directory /data/clips)`."""
        return f"[[datasets]] #{self.index + 1} ({self.source_key} {self.source})"


@dataclass
class DatasetConfig:
    datasets: list[DatasetSpec]
    source: str                                  # the TOML path, or "<node>" etc.
    warnings: list[str] = field(default_factory=list)


def load_dataset_config(path: str | os.PathLike) -> DatasetConfig:
    """Read and check a dataset TOML; raises DatasetConfigError naming the file, line and key."""
    path = Path(path)
    if not path.is_file():
        raise DatasetConfigError([f"{path}: dataset config not found"])
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise DatasetConfigError([f"{path}: not valid TOML ({e})"]) from None
    return _build(data, str(path), path.resolve().parent, _key_lines(text))


def dataset_config_from_dict(d: dict, source: str = "<node>", base_dir: str | os.PathLike | None = None
                             ) -> DatasetConfig:
    """The same checks for a config given as a dict ({"general": {...}, "datasets": [{...}]})."""
    if not isinstance(d, dict):
        raise DatasetConfigError([f"{source}: dataset config must be a table/dict, got {type(d).__name__}"])
    return _build(d, source, Path(base_dir or Path.cwd()).resolve(), {})


def _key_lines(text: str) -> dict[tuple, int]:
    """Map (section, key) -> 1-based line: section is ("general", 0), ("datasets", i) or ("", 0);
    key None is the section header line."""
    lines: dict[tuple, int] = {}
    section, n_datasets = ("", 0), 0
    for lineno, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if m := re.match(r"\[\[\s*([\w\-\"'.]+)\s*\]\]", s):
            name = m.group(1).strip("\"'")
            section = (name, n_datasets) if name == "datasets" else (name, 0)
            n_datasets += name == "datasets"
            lines.setdefault((section, None), lineno)
        elif m := re.match(r"\[\s*([\w\-\"'.]+)\s*\]", s):
            section = (m.group(1).strip("\"'"), 0)
            lines.setdefault((section, None), lineno)
        elif m := re.match(r"([\"']?)([\w\-]+)\1\s*=", s):
            lines.setdefault((section, m.group(2)), lineno)
    return lines


class _Where:
    """Formats the location part of messages: `dataset.toml line 7: [[datasets]] #2`."""

    def __init__(self, source: str, lines: dict):
        self.source, self.lines = source, lines

    def __call__(self, section: tuple, key: str | None = None) -> str:
        line = self.lines.get((section, key)) or self.lines.get((section, None))
        if line is None and section == ("", 0):
            line = self.lines.get(((key, 0), None))                          # a misspelt [table] header
        name = "[general]" if section[0] == "general" else (
            f"[[datasets]] #{section[1] + 1}" if section[0] == "datasets" else "top level")
        return f"{self.source}{f' line {line}' if line else ''}: {name}"


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _build(raw: dict, source: str, base: Path, lines: dict) -> DatasetConfig:
    """Check every table, merge [general] into each dataset, resolve paths."""
    where, problems, warnings = _Where(source, lines), [], []
    for key in raw:
        if key not in ("general", "datasets"):
            problems.append(f"{where(('', 0), key)} '{key}' is unknown (expected [general] and [[datasets]])"
                            f"{_suggest(key, ('general', 'datasets'))}")
    general = raw.get("general", {})
    if not isinstance(general, dict):
        problems.append(f"{where(('', 0), 'general')} 'general' must be a table [general]")
        general = {}
    datasets = raw.get("datasets", [])
    if not isinstance(datasets, list) or not all(isinstance(d, dict) for d in datasets):
        problems.append(f"{where(('', 0), 'datasets')} 'datasets' must be tables [[datasets]]")
        datasets = []
    if not datasets and not problems:
        problems.append(f"{source}: no [[datasets]] table; add one with image_directory or video_directory")

    general_values = _check_table(general, ("general", 0), COMMON_KEYS, where, problems, warnings)
    specs = []
    for i, table in enumerate(datasets):
        spec = _build_spec(i, table, general_values, base, where, problems, warnings)
        if spec is not None:
            specs.append(spec)
    _check_unique_caches(specs, where, problems)
    if problems:
        raise DatasetConfigError(problems)
    return DatasetConfig(datasets=specs, source=source, warnings=warnings)


def _check_table(table: dict, section: tuple, schema: dict, where, problems, warnings,
                 other_kind: dict | None = None, kind: str = "") -> dict:
    """Convert the keys of one table; unknown/ill-typed keys become problems."""
    values = {}
    for key, value in table.items():
        if key in schema:
            try:
                values[key] = schema[key](value)
            except _Bad as e:
                problems.append(f"{where(section, key)} key '{key}' {e}")
        elif key in IGNORED_KEYS:
            warnings.append(f"{where(section, key)} key '{key}' is ignored ({IGNORED_KEYS[key]})")
        elif other_kind and key in other_kind:
            problems.append(f"{where(section, key)} key '{key}' is for {'video' if kind == 'image' else 'image'} "
                            f"datasets, but this is {'an image' if kind == 'image' else 'a video'} dataset")
        elif section[0] == "general" and (key in VIDEO_KEYS or key in IMAGE_KEYS):
            problems.append(f"{where(section, key)} key '{key}' must be set in each [[datasets]] table, "
                            f"not in [general]")
        else:
            known = list(schema) + list(IGNORED_KEYS)
            problems.append(f"{where(section, key)} key '{key}' is unknown{_suggest(key, known)}")
    return values


def _build_spec(i: int, table: dict, general: dict, base: Path, where, problems, warnings) -> DatasetSpec | None:
    """One [[datasets]] table -> DatasetSpec (None when it has problems, which are recorded)."""
    section = ("datasets", i)
    sources = [k for k in SOURCE_KEYS if k in table]
    if len(sources) != 1:
        found = f"it has {', '.join(sources)}" if sources else "it has none"
        problems.append(f"{where(section)} needs exactly one of {', '.join(SOURCE_KEYS)}; {found}")
        return None
    kind = "video" if sources[0].startswith("video") else "image"
    schema, other = (({**COMMON_KEYS, **VIDEO_KEYS}, IMAGE_KEYS) if kind == "video"
                     else ({**COMMON_KEYS, **IMAGE_KEYS}, VIDEO_KEYS))
    n_before = len(problems)
    values = {**general, **_check_table(table, section, schema, where, problems, warnings, other, kind)}
    if len(problems) > n_before:
        return None

    source = _resolve(values[sources[0]], base)
    if not source.exists():
        problems.append(f"{where(section, sources[0])} {sources[0]} '{values[sources[0]]}' does not exist"
                        f" (looked for {source})")
        return None
    if sources[0].endswith("_directory") and not source.is_dir():
        problems.append(f"{where(section, sources[0])} {sources[0]} '{source}' is not a directory")
        return None
    if "cache_directory" in values:
        cache = _resolve(values["cache_directory"], base)
    elif sources[0].endswith("_jsonl_file"):
        problems.append(f"{where(section)} needs cache_directory (required with {sources[0]})")
        return None
    else:
        cache = source                           # musubi's default: caches beside the media

    spec = DatasetSpec(index=i, kind=kind, source=source, source_key=sources[0], cache_directory=cache,
                       **{k: v for k, v in values.items() if k not in SOURCE_KEYS and k != "cache_directory"})
    if kind == "video":
        _normalise_video_spec(spec, section, where, warnings)
    if spec.bucket_no_upscale and not spec.enable_bucket:
        spec.bucket_no_upscale = False           # as musubi: no_upscale only means something with buckets
    return spec


def _normalise_video_spec(spec: DatasetSpec, section, where, warnings) -> None:
    """Snap target_frames to 4k+1 and apply musubi's mode fix-ups, warning about each change."""
    given = sorted(set(spec.target_frames))
    snapped = sorted(set(snap_frames(f) for f in given))
    if snapped != given:
        warnings.append(f"{where(section, 'target_frames')} target_frames {given} rounded down to 4k+1: {snapped}")
    spec.target_frames = tuple(snapped)
    if spec.frame_extraction == "uniform" and spec.frame_sample == 1:
        warnings.append(f"{where(section, 'frame_sample')} frame_sample = 1 with frame_extraction = \"uniform\" "
                        f"is the same as \"head\"; using \"head\"")
        spec.frame_extraction = "head"
    if spec.frame_extraction == "chunk" and 1 in spec.target_frames:
        warnings.append(f"{where(section, 'target_frames')} target_frames contains 1 with frame_extraction = "
                        f"\"chunk\": every single frame becomes an item")


def _check_unique_caches(specs: list[DatasetSpec], where, problems) -> None:
    """Two datasets sharing a cache directory would overwrite each other's caches."""
    seen: dict[Path, DatasetSpec] = {}
    for spec in specs:
        other = seen.setdefault(spec.cache_directory, spec)
        if other is not spec:
            problems.append(f"{where(('datasets', spec.index), 'cache_directory')} cache directory {spec.cache_directory}"
                            f" is also used by [[datasets]] #{other.index + 1}; each dataset needs its own"
                            f" (without cache_directory the image/video directory is used)")


def _resolve(value: str, base: Path) -> Path:
    """Relative paths resolve against the config's folder, or the current directory when the
    path exists only there (configs written for musubi-tuner, run from its folder)."""
    p = Path(os.path.expanduser(value))
    if p.is_absolute():
        return p
    here, cwd = (base / p).resolve(), (Path.cwd() / p).resolve()
    return cwd if not here.exists() and cwd.exists() else here


# ---------------------------------------------------------------------------------------------
# Frames and buckets

def snap_frames(n: int) -> int:
    """Largest 4k+1 <= n (the causal VAE's frame counts: 1, 5, 9, ...)."""
    return (max(int(n), 1) - 1) // 4 * 4 + 1


def frame_windows(n_frames: int, target_frames, mode: str = "head", stride: int = 1, sample: int = 1,
                  max_frames: int = 129) -> list[list[int]]:
    """Frame indices of every training window of an `n_frames` video, musubi's five modes.

    head: the first N frames for each N in target_frames; chunk: back-to-back N-frame chunks;
    slide: N-frame windows every `stride` frames; uniform: `sample` N-frame windows spread evenly;
    full: all frames, capped at max_frames, snapped to 4k+1. Windows longer than the video are dropped.
    """
    if mode not in FRAME_EXTRACTION_MODES:
        raise ValueError(f"frame_extraction must be one of {FRAME_EXTRACTION_MODES}, got {mode!r}")
    if n_frames <= 0:
        return []
    if mode == "full":
        count = snap_frames(min(n_frames, max_frames))
        return [list(range(count))]
    starts: list[tuple[int, int]] = []           # (start, count)
    for count in sorted(set(target_frames)):
        if count > n_frames:
            continue
        if mode == "head":
            starts.append((0, count))
        elif mode == "chunk":
            starts += [(s, count) for s in range(0, n_frames - count + 1, count)]
        elif mode == "slide":
            starts += [(s, count) for s in range(0, n_frames - count + 1, stride)]
        else:                                    # uniform: `sample` starts from 0 to the last fit, floored
            last = n_frames - count
            picks = [0] if sample == 1 else [int(k * last / (sample - 1)) for k in range(sample)]
            starts += [(s, count) for s in dict.fromkeys(picks)]
    return [list(range(s, s + c)) for s, c in starts]


def resample_indices(n_frames: int, source_fps: float, target_fps: float = TARGET_FPS) -> list[int]:
    """Source frame index for each frame of the video played at `target_fps` (drops frames
    when the source is faster, as musubi's `source_fps`; never repeats frames)."""
    step = target_fps / source_fps
    kept, previous = [], -1
    for i in range(n_frames):
        t = int(i * step + 1e-9)
        if t != previous:
            kept.append(i)
            previous = t
    return kept


@lru_cache(maxsize=64)
def bucket_sizes(resolution: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """All (w, h) buckets of about the area of `resolution`, multiples of 16, both orientations."""
    area = resolution[0] * resolution[1]
    side = int(math.sqrt(area))
    smallest = max(BUCKET_STEP, _floor16(side // 2))
    sizes = set()
    for w in range(smallest, side + BUCKET_STEP, BUCKET_STEP):
        h = max(BUCKET_STEP, _floor16(area // w))
        sizes.update({(w, h), (h, w)})
    return tuple(sorted(sizes))


def _floor16(n: int) -> int:
    return n - n % BUCKET_STEP


def select_bucket(width: int, height: int, resolution, enable_bucket: bool = False,
                  bucket_no_upscale: bool = False) -> tuple[int, int]:
    """Training size (w, h), multiples of 16, for a width x height source.

    Without buckets every item gets `resolution`. With buckets, the bucket of the nearest aspect
    ratio; with bucket_no_upscale an item smaller than the bucket area keeps its size (rounded down).
    """
    res = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if not enable_bucket:
        return (max(BUCKET_STEP, _floor16(res[0])), max(BUCKET_STEP, _floor16(res[1])))
    if bucket_no_upscale and width * height <= res[0] * res[1]:
        return (max(BUCKET_STEP, _floor16(width)), max(BUCKET_STEP, _floor16(height)))
    ratio = width / height
    return min(bucket_sizes(res), key=lambda wh: abs(wh[0] / wh[1] - ratio))


# ---------------------------------------------------------------------------------------------
# Items

@dataclass
class Item:
    """One training sample: an image, or one frame window of a video. `error` marks a failed one."""
    dataset: int                                 # index of its DatasetSpec
    kind: str                                    # "image" | "video"
    path: Path                                   # the image/video file (or a folder of frames)
    caption: str | None
    stem: str                                    # file name without extension; names the caches
    cache_directory: Path
    original_size: tuple[int, int] | None = None  # (w, h) of the source
    bucket: tuple[int, int] | None = None         # (w, h) it is trained at
    frame_indices: list[int] | None = None        # source frames of a video window
    window: tuple[int, int] | None = None         # (start, count) in the (fps-converted) frame sequence
    error: str | None = None

    @property
    def frames(self) -> int:
        """Pixel frames of the sample (1 for images)."""
        return len(self.frame_indices) if self.frame_indices else 1

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class _Source:
    path: Path
    caption: str | None
    error: str | None = None


def collect_items(spec: DatasetSpec) -> list[Item]:
    """Every item of one dataset, in file order; unreadable sources come back as failed items.

    Videos are probed (not decoded) for their frame count; images are read for their size only.
    """
    items, stems = [], {}
    for src in _list_sources(spec):
        base = dict(dataset=spec.index, kind=spec.kind, path=src.path, caption=src.caption,
                    stem=src.path.name if src.path.is_dir() else src.path.stem,
                    cache_directory=spec.cache_directory)
        clash = stems.setdefault(base["stem"], src.path)
        if src.error is None and clash != src.path:
            src.error = f"{src.path}: its cache name '{base['stem']}' is also used by {clash.name}; rename one"
        if src.error is not None:
            items.append(Item(**base, error=src.error))
            continue
        try:
            items += _items_of(spec, base)
        except media.MediaError as e:
            items.append(Item(**base, error=str(e)))
    return items


def _items_of(spec: DatasetSpec, base: dict) -> list[Item]:
    """The items of one readable source (a failed item when a video is too short)."""
    path = base["path"]
    if spec.kind == "image":
        w, h = media.image_size(path)
        return [Item(**base, original_size=(w, h),
                     bucket=select_bucket(w, h, spec.resolution, spec.enable_bucket, spec.bucket_no_upscale))]
    n, w, h = _probe_frames(path)
    bucket = select_bucket(w, h, spec.resolution, spec.enable_bucket, spec.bucket_no_upscale)
    timeline = resample_indices(n, spec.source_fps) if spec.source_fps else list(range(n))
    windows = frame_windows(len(timeline), spec.target_frames, spec.frame_extraction, spec.frame_stride,
                            spec.frame_sample, spec.max_frames)
    if not windows:
        after = f" ({len(timeline)} at {TARGET_FPS:g} fps)" if spec.source_fps else ""
        return [Item(**base, original_size=(w, h), error=(
            f"{path}: video has {n} frames{after}, shorter than every target_frames {list(spec.target_frames)}"))]
    return [Item(**base, original_size=(w, h), bucket=bucket, frame_indices=[timeline[i] for i in win],
                 window=(win[0], len(win))) for win in windows]


def _probe_frames(path: Path) -> tuple[int, int, int]:
    """(frames, width, height) of a video file or of a folder of frame images."""
    if path.is_dir():
        frames = _frame_files(path)
        if not frames:
            raise media.MediaError(f"{path}: folder has no frame images")
        w, h = media.image_size(frames[0])
        return len(frames), w, h
    info = media.probe_video(path)
    return info.frames, info.width, info.height


def _frame_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in media.IMAGE_EXTENSIONS)


def _list_sources(spec: DatasetSpec) -> list[_Source]:
    """(media path, caption) pairs of a directory or jsonl dataset."""
    if spec.is_jsonl:
        return _jsonl_sources(spec)
    exts = media.IMAGE_EXTENSIONS if spec.kind == "image" else media.VIDEO_EXTENSIONS
    files = sorted(p for p in spec.source.iterdir() if p.is_file() and p.suffix.lower() in exts)
    return [_with_caption(p, spec.caption_extension) for p in files]


def _with_caption(path: Path, extension: str) -> _Source:
    caption_file = path.with_name(path.stem + extension)
    if not caption_file.is_file():
        return _Source(path, None, f"{path}: caption file {caption_file.name} is missing")
    return _Source(path, caption_file.read_text(encoding="utf-8").strip())


def _jsonl_sources(spec: DatasetSpec) -> list[_Source]:
    """Lines like {"video_path": "...", "caption": "..."}; a bad line becomes a failed source."""
    key = "image_path" if spec.kind == "image" else "video_path"
    out = []
    for n, line in enumerate(spec.source.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{spec.source} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            out.append(_Source(spec.source / f"line{n}", None, f"{where}: not JSON ({e})"))
            continue
        if not isinstance(row, dict) or not isinstance(row.get(key), str):
            out.append(_Source(spec.source / f"line{n}", None, f"{where}: needs a \"{key}\" string"))
            continue
        path = _resolve(row[key], spec.source.parent)
        caption = row.get("caption")
        if not isinstance(caption, str):
            out.append(_Source(path, None, f"{where}: needs a \"caption\" string"))
        elif not path.exists():
            out.append(_Source(path, None, f"{where}: {path} does not exist"))
        else:
            out.append(_Source(path, caption.strip()))
    return out


# ---------------------------------------------------------------------------------------------
# Pixels

def load_item_pixels(item: Item) -> torch.Tensor:
    """Decode an item, resize and center-crop it to its bucket -> float (3, F, H, W) in [-1, 1]."""
    if not item.ok:
        raise ValueError(f"{item.path}: cannot load a failed item ({item.error})")
    if item.kind == "image":
        frames = media.read_image(item.path)[None]                          # (1, H, W, 3)
    elif item.path.is_dir():
        files = _frame_files(item.path)
        frames = torch.stack([media.read_image(files[i]) for i in item.frame_indices])
    else:
        frames = media.read_video_frames(item.path, item.frame_indices)     # (F, H, W, 3)
    pixels = resize_to_bucket(frames, item.bucket)                           # (F, 3, h, w) in [0, 1]
    return pixels.permute(1, 0, 2, 3).mul(2).sub(1).contiguous()


def resize_to_bucket(frames: torch.Tensor, bucket: tuple[int, int], chunk: int = 16) -> torch.Tensor:
    """uint8 (F, H, W, 3) -> float (F, 3, h, w) in [0, 1]: scale to cover the bucket (bicubic with
    antialiasing, like PIL), then crop the center. Works `chunk` frames at a time to bound memory."""
    bw, bh = bucket
    _, H, W, _ = frames.shape
    scale = max(bw / W, bh / H)
    nw, nh = max(bw, int(W * scale + 0.5)), max(bh, int(H * scale + 0.5))
    left, top = (nw - bw) // 2, (nh - bh) // 2
    out = []
    for part in frames.split(chunk):
        x = part.permute(0, 3, 1, 2).float().div(255)                       # (f, 3, H, W)
        if (nw, nh) != (W, H):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        out.append(x[:, :, top:top + bh, left:left + bw])
    return torch.cat(out)
