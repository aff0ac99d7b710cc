"""Latent and text-encoder caches: one safetensors file per item, named and keyed like
musubi-tuner's Kandinsky 5 caches, so either tool can read the other's files.

Latent cache `{stem}[_{start:05d}-{count:03d}]_{W:04d}x{H:04d}_kandinsky5.safetensors`
(W x H is the *source* size, as musubi; the window part only for videos):
    latents_{T}x{h}x{w}_{dtype}         (16, T, h, w)  VAE latent, already scaled
    latents_image_{1}x{h}x{w}_{dtype}   (16, 1, h, w)  I2V first-frame condition (i2v caches only)
    vae_scaling_factor                  ()
Text cache `{stem}_kandinsky5_te.safetensors` (shared by all windows of a video):
    text_embeds_{dtype}   (L, D)   Qwen embeddings of the real tokens only (padding dropped)
    attention_mask        (L,)     bool, all True (kept for musubi)
    pooled_embed_{dtype}  (Dp,)    CLIP pooled embedding
Metadata: musubi's `architecture`, `format_version`, `width`, `height`, `frame_count`, `caption1`
plus `k5_*` keys (task, VAE kind, dims, bucket, source size/mtime, content template) that let
`--skip_existing` spot stale files and the trainer refuse caches built for another task.

Where this differs from musubi: musubi's `latents_image` holds the first *and last* latent frame
of the clip and is written for every video; here it is the first frame encoded alone (what the
official I2V pipeline conditions on), written when caching for an I2V task. Reading a musubi
cache takes its first frame. NaN latents are failures here (musubi replaces them with zeros).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from k5core import data
from k5core.data import DatasetConfig, Item
from k5core.files import atomic_write_text, read_safetensors_header, save_safetensors
from k5core.media import MediaError

ARCHITECTURE = "kandinsky5"
FORMAT_VERSION = "1.0.1"
LATENT_CHANNELS = 16
FAILURES_FILE = "kandinsky5_cache_failures.json"   # sources the last latent run could not use

Progress = Callable[[int, int, str], None]       # (done, total, "cached: path [start:+count]")


class CacheError(RuntimeError):
    """Caches that are missing or do not fit the task; the message names the files."""


@dataclass
class CacheReport:
    cached: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)   # (source path, reason)
    stopped: bool = False                                        # should_stop() ended the run early

    @property
    def usable(self) -> int:
        """Items with a valid cache after the run."""
        return self.cached + self.skipped

    def summary(self) -> str:
        return (f"cached {self.cached}, skipped {self.skipped} (already cached), failed {len(self.failed)}"
                + (" - stopped early" if self.stopped else ""))


# ---------------------------------------------------------------------------------------------
# Names

def latent_cache_path(item: Item) -> Path:
    """musubi's latent cache name: stem, frame window (videos), source size, architecture."""
    w, h = item.original_size
    window = f"_{item.window[0]:05d}-{item.window[1]:03d}" if item.kind == "video" else ""
    return item.cache_directory / f"{item.stem}{window}_{w:04d}x{h:04d}_{ARCHITECTURE}.safetensors"


def text_cache_path(item: Item) -> Path:
    """musubi's text-encoder cache name: one per source file."""
    return item.cache_directory / f"{item.stem}_{ARCHITECTURE}_te.safetensors"


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------
# File I/O

def save_latent_cache(path: str | os.PathLike, latent: torch.Tensor, *, image_latent: torch.Tensor | None = None,
                      scaling_factor: float | None = None, metadata: dict | None = None) -> Path:
    """Write latent (16, T, h, w) [+ image_latent (16, 1, h, w)] atomically, musubi keys."""
    path = Path(path)
    if latent.dim() != 4:
        raise ValueError(f"{path}: latent must be (C, T, h, w), got {tuple(latent.shape)}")
    tensors = {}
    for name, t in (("latents", latent), ("latents_image", image_latent)):
        if t is None:
            continue
        if not torch.isfinite(t).all():
            raise ValueError(f"{path}: {name} has NaN/inf values; the VAE output is broken")
        c, f, h, w = t.shape
        tensors[f"{name}_{f}x{h}x{w}_{_dtype_name(t)}"] = t
    if scaling_factor is not None:
        tensors["vae_scaling_factor"] = torch.tensor(float(scaling_factor))
    meta = {"architecture": ARCHITECTURE, "format_version": FORMAT_VERSION, **(metadata or {})}
    return save_safetensors(tensors, path, meta)


def load_latent_cache(path: str | os.PathLike) -> dict:
    """Read a latent cache -> dict(latent, image_latent (or None), scaling_factor (or None), metadata)."""
    path = Path(path)
    _, meta = read_safetensors_header(path)
    tensors = load_file(str(path))
    out = {"latent": None, "image_latent": None, "scaling_factor": None, "metadata": meta}
    for key, t in tensors.items():
        if key.startswith("latents_image_"):
            out["image_latent"] = t
        elif key.startswith("latents_control_"):
            continue
        elif key.startswith("latents_"):
            out["latent"] = t
        elif key == "vae_scaling_factor":
            out["scaling_factor"] = float(t)
    if out["latent"] is None:
        raise CacheError(f"{path}: no latents_* tensor in this latent cache (keys: {sorted(tensors)})")
    return out


def save_text_cache(path: str | os.PathLike, text_embed: torch.Tensor, text_mask: torch.Tensor,
                    pooled: torch.Tensor, *, caption: str, metadata: dict | None = None) -> Path:
    """Write one caption's embeddings atomically; only the real tokens (text_mask) are stored."""
    path = Path(path)
    if text_embed.dim() != 2 or text_mask.shape != text_embed.shape[:1] or pooled.dim() != 1:
        raise ValueError(f"{path}: expected text_embed (L, D), text_mask (L,), pooled (Dp,); got "
                         f"{tuple(text_embed.shape)}, {tuple(text_mask.shape)}, {tuple(pooled.shape)}")
    embeds = text_embed[text_mask.bool()]                                    # (L_real, D)
    for name, t in (("text_embed", embeds), ("pooled", pooled)):
        if not torch.isfinite(t.float()).all():
            raise ValueError(f"{path}: {name} has NaN/inf values; the text encoder output is broken")
    tensors = {f"text_embeds_{_dtype_name(embeds)}": embeds,
               f"pooled_embed_{_dtype_name(pooled)}": pooled,
               "attention_mask": torch.ones(embeds.shape[0], dtype=torch.bool)}
    meta = {"architecture": ARCHITECTURE, "format_version": FORMAT_VERSION, "caption1": caption,
            "k5_text_dim": embeds.shape[1], "k5_pooled_dim": pooled.shape[0], **(metadata or {})}
    return save_safetensors(tensors, path, meta)


def load_text_cache(path: str | os.PathLike) -> dict:
    """Read a text cache -> dict(text_embed (L, D), text_mask (L,) bool, pooled (Dp,), caption, metadata).
    A padded mask (musubi files written by other encoders) is applied, so text_mask is all True."""
    path = Path(path)
    _, meta = read_safetensors_header(path)
    tensors = load_file(str(path))
    embed = next((t for k, t in tensors.items() if k.startswith("text_embeds_")), None)
    pooled = next((t for k, t in tensors.items() if k.startswith("pooled_embed_")), None)
    if embed is None or pooled is None:
        raise CacheError(f"{path}: not a Kandinsky 5 text cache (keys: {sorted(tensors)}; "
                         f"expected text_embeds_* and pooled_embed_*)")
    mask = tensors.get("attention_mask")
    if mask is not None:
        mask = mask.bool().flatten()
        if mask.shape[0] == embed.shape[0] and not mask.all():
            embed = embed[mask]
    return {"text_embed": embed, "text_mask": torch.ones(embed.shape[0], dtype=torch.bool),
            "pooled": pooled.flatten(), "caption": meta.get("caption1"), "metadata": meta}


# ---------------------------------------------------------------------------------------------
# Validity (for --skip_existing and for the trainer)

def _source_stamp(path: Path) -> dict:
    """Size and mtime of a source file; a cache built from another version of it is stale."""
    st = path.stat()
    return {"k5_source_size": st.st_size, "k5_source_mtime_ns": st.st_mtime_ns}


def _expected_latent_shape(item: Item, vae_kind: str = "hunyuan") -> tuple[int, int, int, int]:
    w, h = item.bucket
    t = 1 if vae_kind == "flux" else (item.frames - 1) // 4 + 1
    return (LATENT_CHANNELS, t, h // 8, w // 8)


def _shapes(header: dict, prefix: str) -> list[tuple]:
    return [tuple(v["shape"]) for k, v in header.items()
            if k.startswith(prefix) and not (prefix == "latents_" and k.startswith(("latents_image_", "latents_control_")))]


def _read_cache(path: Path) -> tuple[dict, dict, str | None]:
    """(tensor table, metadata, None) of one of our cache files, or the reason it is unusable."""
    if not path.exists():
        return {}, {}, f"{path}: missing"
    try:
        header, meta = read_safetensors_header(path)
    except ValueError as e:
        return {}, {}, str(e)
    if meta.get("architecture") != ARCHITECTURE:
        return header, meta, f"{path}: architecture {meta.get('architecture')!r}, expected {ARCHITECTURE!r}"
    return header, meta, None


def latent_cache_problem(item: Item, *, vae_kind: str | None = None, i2v: bool = False) -> str | None:
    """Why the item's latent cache cannot be used as is (None when it can): missing, truncated,
    another architecture, a latent of another size, no I2V condition, or an older source file."""
    path = latent_cache_path(item)
    header, meta, problem = _read_cache(path)
    if problem:
        return problem
    if vae_kind and meta.get("k5_vae_kind", vae_kind) != vae_kind:
        return f"{path}: built with the {meta['k5_vae_kind']} VAE, this task uses the {vae_kind} VAE"
    want = _expected_latent_shape(item, vae_kind or meta.get("k5_vae_kind", "hunyuan"))
    if _shapes(header, "latents_") != [want]:
        return f"{path}: latent shape {_shapes(header, 'latents_')}, expected {list(want)} for bucket {item.bucket}"
    if i2v and not _shapes(header, "latents_image_"):
        return f"{path}: no latents_image (I2V first-frame condition); rebuild with an I2V task"
    stamp = _source_stamp(item.path) if item.path.is_file() else {}
    if any(k in meta and meta[k] != str(v) for k, v in stamp.items()):
        return f"{path}: built from an older version of {item.path.name}"
    return None


def text_cache_problem(item: Item, *, content: str | None = None, text_dim: int | None = None,
                       pooled_dim: int | None = None) -> str | None:
    """Why the item's text cache cannot be used as is (None when it can): missing, truncated,
    another architecture, another caption, another prompt template, or other embedding widths."""
    path = text_cache_path(item)
    header, meta, problem = _read_cache(path)
    if problem:
        return problem
    if item.caption is not None and meta.get("caption1") != item.caption:
        return f"{path}: made for another caption ({meta.get('caption1')!r})"
    if content and meta.get("k5_content", content) != content:
        return f"{path}: encoded with the {meta['k5_content']!r} prompt template, expected {content!r}"
    embeds, pooled = _shapes(header, "text_embeds_"), _shapes(header, "pooled_embed_")
    if len(embeds) != 1 or len(pooled) != 1:
        return f"{path}: needs one text_embeds_* and one pooled_embed_* tensor"
    if text_dim and embeds[0][-1] != text_dim:
        return f"{path}: text embedding width {embeds[0][-1]}, this task needs {text_dim}"
    if pooled_dim and pooled[0][-1] != pooled_dim:
        return f"{path}: pooled embedding width {pooled[0][-1]}, this task needs {pooled_dim}"
    return None


# ---------------------------------------------------------------------------------------------
# Building caches

def all_items(config: DatasetConfig) -> list[Item]:
    """The items of every dataset of a config, failed ones included."""
    return [item for spec in config.datasets for item in data.collect_items(spec)]


def _batches(items: list[Item], batch_size: int) -> list[list[Item]]:
    """Items of one shape together (bucket and frame count), in first-seen order, `batch_size` each."""
    groups: dict[tuple, list[Item]] = {}
    for item in items:
        groups.setdefault((item.bucket, item.frames), []).append(item)
    return [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), max(1, batch_size))]


def _vae_kind(vae) -> str:
    return getattr(vae, "kind", "hunyuan")


def _tell(progress: Progress | None, done: int, total: int, item: Item, status: str, window: bool = True) -> None:
    if progress is not None:
        label = str(item.path) + (f" [{item.window[0]}:+{item.window[1]}]" if item.window and window else "")
        progress(done, total, f"{status}: {label}")


def _fail(report: CacheReport, failures: dict, item: Item, reason: str) -> None:
    report.failed.append((str(item.path), reason))
    failures.setdefault(item.dataset, []).append({"path": str(item.path), "reason": reason})


def cache_latents(config: DatasetConfig, vae, *, skip_existing: bool = False, i2v: bool = False,
                  batch_size: int = 1, progress: Progress | None = None,
                  should_stop: Callable[[], bool] | None = None, task=None) -> CacheReport:
    """Encode every item of `config` with `vae` into latent caches (`task`, a Task or name, is
    recorded in the metadata).

    Unreadable items are listed in report.failed and the run goes on. With skip_existing, a valid
    cache is kept and a stale or broken one rebuilt. i2v also stores the first frame encoded alone.
    progress(done, total, "cached|skipped|failed: path") follows every item; should_stop() is asked
    between batches and between VAE tiles (report.stopped tells).
    """
    report, failures, kind = CacheReport(), {}, _vae_kind(vae)
    task = _resolve_task(task)
    items = all_items(config)
    for item in (i for i in items if not i.ok):
        _fail(report, failures, item, item.error)
    usable = [i for i in items if i.ok]
    todo, done = [], 0
    for item in usable:
        if kind == "flux" and item.frames > 1:
            _fail(report, failures, item, f"{item.path}: the flux VAE of image tasks encodes single frames; "
                                          f"set target_frames = [1] for this dataset")
            status = "failed"
        elif skip_existing and latent_cache_problem(item, vae_kind=kind, i2v=i2v) is None:
            report.skipped += 1
            status = "skipped"
        else:
            todo.append(item)
            continue
        done += 1
        _tell(progress, done, len(usable), item, status)
    for batch in _batches(todo, batch_size):
        if should_stop is not None and should_stop():
            report.stopped = True
            break
        try:
            for item, status in _encode_batch(batch, vae, i2v, task, report, failures, should_stop):
                done += 1
                _tell(progress, done, len(usable), item, status)
        except InterruptedError:                                         # should_stop() inside the VAE
            report.stopped = True
            break
    if not report.stopped:
        _write_failures(config, failures)
    return report


def _encode_batch(batch: list[Item], vae, i2v: bool, task, report: CacheReport, failures: dict, should_stop=None):
    """Decode, encode and save one batch; yields (item, "cached" | "failed"). The VAE checks
    should_stop between its tiles and raises InterruptedError, so a long clip stops quickly too."""
    loaded = []
    for item in batch:
        try:
            loaded.append((item, data.load_item_pixels(item)))          # (3, F, H, W)
        except (MediaError, ValueError, OSError) as e:
            _fail(report, failures, item, str(e))
            yield item, "failed"
    if not loaded:
        return
    pixels = torch.stack([p for _, p in loaded])                         # (B, 3, F, H, W)
    with torch.inference_mode():
        latents = vae.encode(pixels, should_stop=should_stop)           # (B, 16, T, H/8, W/8)
        cond = vae.encode(pixels[:, :, :1], should_stop=should_stop) if i2v else None  # (B, 16, 1, h, w)
    for b, (item, _) in enumerate(loaded):
        try:
            save_latent_cache(latent_cache_path(item), latents[b].float(),
                              image_latent=None if cond is None else cond[b].float(),
                              scaling_factor=getattr(vae, "scaling_factor", None),
                              metadata=_latent_metadata(item, vae, task, i2v))
        except ValueError as e:
            _fail(report, failures, item, str(e))
            yield item, "failed"
            continue
        report.cached += 1
        yield item, "cached"


def _latent_metadata(item: Item, vae, task, i2v: bool) -> dict:
    """musubi's width/height/frame_count plus what the trainer and --skip_existing check."""
    meta = {"width": item.original_size[0], "height": item.original_size[1],
            "k5_bucket": f"{item.bucket[0]}x{item.bucket[1]}", "k5_vae_kind": _vae_kind(vae),
            "k5_latent_channels": LATENT_CHANNELS, "k5_i2v": str(bool(i2v)).lower(), "k5_source": item.path.name}
    if item.path.is_file():
        meta.update(_source_stamp(item.path))
    if item.kind == "video":
        meta.update(frame_count=item.frames, k5_frame_start=item.window[0])
    if task is not None:
        meta["k5_task"] = task.name
    return meta


def _write_failures(config: DatasetConfig, failures: dict[int, list]) -> None:
    """Record, per cache directory, the sources the latent run could not use, so that
    list_cached_items skips them instead of asking for their caches."""
    for spec in config.datasets:
        rows = failures.get(spec.index, [])
        path = spec.cache_directory / FAILURES_FILE
        if rows or path.exists():
            atomic_write_text(path, json.dumps(rows, indent=1))


def cache_text_encoder_outputs(config: DatasetConfig, encoder, *, content: str = "video",
                               skip_existing: bool = False, batch_size: int = 8,
                               progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
                               task=None) -> CacheReport:
    """Encode the caption of every source of `config` (once per video, not per window) with the
    `content` prompt template into text caches; same reporting, skip and stop rules as cache_latents.

    `task` (a Task or its name) adds its text widths to the --skip_existing check, its Qwen
    max_length to the encode, and its name to the metadata.
    """
    task = _resolve_task(task)
    report, failures = CacheReport(), {}
    units: dict[Path, Item] = {}
    for item in all_items(config):
        if not item.ok:
            _fail(report, failures, item, item.error)
        else:
            units.setdefault(text_cache_path(item), item)
    dims = {} if task is None else {"text_dim": task.dit.in_text_dim, "pooled_dim": task.dit.in_text_dim2}
    todo, done, total = [], 0, len(units)
    for item in units.values():
        if skip_existing and text_cache_problem(item, content=content, **dims) is None:
            report.skipped += 1
            done += 1
            _tell(progress, done, total, item, "skipped", window=False)
        else:
            todo.append(item)
    meta = {"k5_content": content, **({"k5_task": task.name} if task else {})}
    encode_args = {} if task is None else {"max_length": task.text_max_length}
    for start in range(0, len(todo), max(1, batch_size)):
        if should_stop is not None and should_stop():
            report.stopped = True
            break
        batch = todo[start:start + max(1, batch_size)]
        with torch.inference_mode():
            out = encoder.encode([i.caption for i in batch], content=content, **encode_args)
        for b, item in enumerate(batch):
            try:
                save_text_cache(text_cache_path(item), out.text_embed[b].cpu(), out.text_mask[b].cpu(),
                                out.pooled[b].cpu(), caption=item.caption, metadata=meta)
                report.cached += 1
                status = "cached"
            except ValueError as e:
                _fail(report, failures, item, str(e))
                status = "failed"
            done += 1
            _tell(progress, done, total, item, status, window=False)
    return report


# ---------------------------------------------------------------------------------------------
# Reading caches for training

@dataclass
class CachedItem:
    """One cached training sample; the trainer repeats it num_repeats times and batches items
    with the same bucket_key in groups of batch_size."""
    latent_path: Path
    text_path: Path
    source: Path
    dataset: int
    bucket: tuple[int, int]            # (w, h) in pixels
    frames: int                        # pixel frames (1 for images)
    caption: str
    num_repeats: int = 1
    batch_size: int = 1

    @property
    def bucket_key(self) -> tuple[int, int, int]:
        return (*self.bucket, self.frames)


def _resolve_task(task):
    if task is None or not isinstance(task, str):
        return task
    from k5core.tasks import get_task
    return get_task(task)


def _known_failures(spec: data.DatasetSpec) -> set[str]:
    path = spec.cache_directory / FAILURES_FILE
    if not path.is_file():
        return set()
    try:
        return {row["path"] for row in json.loads(path.read_text(encoding="utf-8"))}
    except (json.JSONDecodeError, KeyError, TypeError):
        return set()


def list_cached_items(config: DatasetConfig, *, task=None) -> list[CachedItem]:
    """Pair the latent and text cache of every usable item of `config`.

    Items that failed when caching (corrupt files, missing captions, too short) are left out.
    Raises CacheError naming every missing or unfit cache file; with a `task` (Task or name) the
    caches must also fit it: VAE kind, text/pooled widths, I2V condition, prompt template.
    """
    task = _resolve_task(task)
    expect_latent = {} if task is None else {"vae_kind": task.vae, "i2v": task.needs_image and task.is_video}
    expect_text = {} if task is None else {"content": task.content, "text_dim": task.dit.in_text_dim,
                                           "pooled_dim": task.dit.in_text_dim2}
    out, problems, missing = [], [], {"latent": False, "text": False}
    for spec in config.datasets:
        failed = _known_failures(spec)
        for item in data.collect_items(spec):
            if not item.ok or str(item.path) in failed:
                continue
            for which, problem in (("latent", latent_cache_problem(item, **expect_latent)),
                                   ("text", text_cache_problem(item, **expect_text))):
                if problem:
                    problems.append(f"{problem} (for {item.path})")
                    missing[which] = True
            out.append(CachedItem(latent_path=latent_cache_path(item), text_path=text_cache_path(item),
                                  source=item.path, dataset=spec.index, bucket=item.bucket, frames=item.frames,
                                  caption=item.caption, num_repeats=spec.num_repeats, batch_size=spec.batch_size))
    if problems:
        raise CacheError(_problem_message(config, problems, missing))
    if not out:
        raise CacheError(f"{config.source}: no usable items in any dataset; nothing to train on")
    return out


def _problem_message(config: DatasetConfig, problems: list[str], missing: dict) -> str:
    shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
    fixes = [cmd for which, cmd in (("latent", "python -m k5core.cache_latents"),
                                     ("text", "python -m k5core.cache_text_encoder_outputs")) if missing[which]]
    return (f"{config.source}: {len(problems)} cache file(s) missing or not fit for this task:\n  "
            + "\n  ".join(shown) + f"\nrun {' and '.join(fixes)} --dataset_config {config.source} "
            f"(with --task and --skip_existing) to build them")


def load_cached_item(item: CachedItem) -> dict:
    """Tensors of one sample: latent (16, T, h, w), text_embed (L, D), text_mask (L,), pooled (Dp,)
    and, when cached, image_latent (16, 1, h, w) the I2V first-frame condition."""
    lat, txt = load_latent_cache(item.latent_path), load_text_cache(item.text_path)
    out = {"latent": lat["latent"], "text_embed": txt["text_embed"], "text_mask": txt["text_mask"],
           "pooled": txt["pooled"]}
    if lat["image_latent"] is not None:
        out["image_latent"] = lat["image_latent"][:, :1]                # musubi stores first+last
    return out


def collate_cached(samples: list[dict]) -> dict:
    """Batch load_cached_item results of one bucket: latents stacked (B, 16, T, h, w), text padded
    to the longest caption (B, L, D) with text_mask (B, L) False on padding, pooled (B, Dp)."""
    length = max(s["text_embed"].shape[0] for s in samples)
    dim = samples[0]["text_embed"].shape[1]
    embeds = samples[0]["text_embed"].new_zeros(len(samples), length, dim)
    mask = torch.zeros(len(samples), length, dtype=torch.bool)
    for b, s in enumerate(samples):
        n = s["text_embed"].shape[0]
        embeds[b, :n], mask[b, :n] = s["text_embed"], s["text_mask"]
    out = {"latent": torch.stack([s["latent"] for s in samples]), "text_embed": embeds, "text_mask": mask,
           "pooled": torch.stack([s["pooled"] for s in samples])}
    if all("image_latent" in s for s in samples):
        out["image_latent"] = torch.stack([s["image_latent"] for s in samples])
    return out
