"""Training state folders for `--save_state` / `--resume`: everything a run needs to continue the same
loss curve – LoRA tensors, optimizer, scheduler, random generators of every process, data position.

A state is one folder `<output_dir>/<output_name>-step00000120-state/`:
    network.safetensors   the trainable LoRA tensors, exact (fp32)
    optimizer.pt          optimizer.state_dict()
    scheduler.pt          scheduler.state_dict()
    rng.pt                [per process] Python, NumPy, torch CPU/CUDA generator states and the
                          trainer's own noise/timestep generators
    train_state.json      step, epoch, batch position, seed, recent losses, settings summary
The folder is written under a temporary name and renamed into place only when complete
(train_state.json last), so a crash or kill never leaves a half state that `--resume` would take.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from k5core.files import atomic_path, save_safetensors

STATE_VERSION = 1
STATE_RE = re.compile(r"^(?P<name>.+)-step(?P<step>\d{8})-state$")
MARKER = "train_state.json"


class StateError(ValueError):
    """A state folder that cannot be resumed from; the message names the folder and the file."""


def state_dir(output_dir, output_name: str, step: int) -> Path:
    return Path(output_dir) / f"{output_name}-step{step:08d}-state"


# ------------------------------------------------------------------------------------- RNG
def capture_rng(generators: dict[str, torch.Generator]) -> dict:
    """The random state of this process: global generators plus the named torch.Generators."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"python": [version, list(internal), gauss],
           "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
           "torch": torch.get_rng_state(),
           "generators": {k: g.get_state() for k, g in generators.items()}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: dict, generators: dict[str, torch.Generator]) -> None:
    """Put back what capture_rng took (CUDA states only where CUDA is in use)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in generators.items():
        if name not in state["generators"]:
            raise StateError(f"rng.pt has no state for the {name!r} generator")
        g.set_state(state["generators"][name])


# ------------------------------------------------------------------------------------- save
def save_state(folder: Path, *, network: dict[str, torch.Tensor], optimizer, scheduler, rng: list[dict],
               progress: dict, keep_last: int | None = None) -> Path:
    """Write a complete state folder atomically (temp folder + rename); `rng` has one entry per
    process. With keep_last, older states of the same run beyond the newest keep_last are removed."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        save_safetensors({k: v.float() if v.is_floating_point() else v for k, v in network.items()},
                         tmp / "network.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng, tmp / "rng.pt")
        with atomic_path(tmp / MARKER) as t:
            t.write_text(json.dumps({"version": STATE_VERSION, **progress}, indent=1), encoding="utf-8")
        _swap_into_place(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last:
        prune_states(folder.parent, STATE_RE.match(folder.name)["name"], keep_last)
    return folder


def _swap_into_place(tmp: Path, folder: Path) -> None:
    """Rename tmp to folder; an existing folder of the same name is moved aside first, then removed."""
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prune_states(output_dir: Path, output_name: str, keep_last: int) -> None:
    """Remove all but the newest keep_last complete states of a run."""
    for step, path in list_states(output_dir, output_name)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------- load
def list_states(output_dir, output_name: str) -> list[tuple[int, Path]]:
    """Complete states (with train_state.json) of a run, oldest first."""
    found = []
    for p in Path(output_dir).glob(f"{glob_escape(output_name)}-step*-state"):
        m = STATE_RE.match(p.name)
        if m and m["name"] == output_name and (p / MARKER).is_file():
            found.append((int(m["step"]), p))
    return sorted(found)


def glob_escape(s: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", s)


def latest_state(output_dir, output_name: str) -> Path | None:
    states = list_states(output_dir, output_name)
    return states[-1][1] if states else None


def read_progress(folder: Path) -> dict:
    """train_state.json of a state folder, checked."""
    folder = Path(folder)
    marker = folder / MARKER
    if not marker.is_file():
        raise StateError(f"{folder}: not a complete training state (no {MARKER}); pick another state folder")
    try:
        progress = json.loads(marker.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StateError(f"{marker}: not valid JSON ({e})") from None
    if progress.get("version") != STATE_VERSION:
        raise StateError(f"{marker}: state version {progress.get('version')!r}, this trainer reads {STATE_VERSION}")
    for name in ("network.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt"):
        if not (folder / name).is_file():
            raise StateError(f"{folder}: {name} is missing; the state is incomplete")
    return progress


def load_state(folder: Path) -> dict:
    """Everything of a state folder: progress, network tensors, optimizer/scheduler state dicts, rng list."""
    folder = Path(folder)
    progress = read_progress(folder)
    try:
        return {"progress": progress, "network": load_file(str(folder / "network.safetensors")),
                "optimizer": _torch_load(folder / "optimizer.pt"),
                "scheduler": _torch_load(folder / "scheduler.pt"), "rng": _torch_load(folder / "rng.pt")}
    except StateError:
        raise
    except Exception as e:
        raise StateError(f"{folder}: cannot read the state ({type(e).__name__}: {e})") from None


def _torch_load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)
