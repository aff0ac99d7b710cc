"""Training runs started from ComfyUI: the `python -m trainer` subprocess, its event relay to the
browser, stopping it, and the HTTP routes the training widget calls.

A run lives in `<ComfyUI output>/k5_train/<run name>/` (run.toml, dataset.toml, prompts.txt, the LoRA
files, state folders, samples/), so the sample videos are served by ComfyUI's own `/view` route and
every path a route hands out is inside the output folder. One run trains at a time.

Events: each JSON line the trainer writes to stdout is relayed unchanged to the browser as
`send_sync("k5.train", {**event, "node": <node id>, "run": <run name>})`; `sample` events also get
`urls` (the `/view?...&type=output` address of each sample). The relayed events are kept for
`GET /k5/train/status`, so a reloaded page can replay the run.

Stopping: SIGTERM (POSIX) or the trainer's stop file (Windows, where SIGTERM kills); the trainer
finishes its step, saves the LoRA and its state, reports done(stopped) and exits 0.

Routes (registered on `PromptServer.instance.routes` when this module is imported inside ComfyUI;
ComfyUI mirrors them under /api):
    GET  /k5/train/status  -> {"running", "run", "node", "events", "last"}
    POST /k5/train/stop    <- {"run": name | null}  -> {"ok": true} | {"ok": false, "error": ...}
    GET  /k5/train/runs    -> {"runs": [{"name", "folder", "running", "loras", "final", "states", "modified"}]}
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import quote

from k5core.files import atomic_write_text

from . import comfy

log = logging.getLogger("k5.nodes")

PACK_DIR = Path(__file__).resolve().parents[1]    # holds `trainer` and `k5core`: the subprocess' cwd
RUNS_FOLDER = "k5_train"                           # under ComfyUI's output folder
EVENT = "k5.train"                                 # the websocket message the widget listens to
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
POLL_S = 0.2                   # how often the node looks for ComfyUI's Cancel while the trainer runs
STOP_TIMEOUT_S = 600.0         # a stopped trainer that has not exited by then is killed
STDERR_LINES = 30              # the last stderr lines, shown in the crash message
INTERRUPT = "cancelled in ComfyUI"                 # the stop reason of ComfyUI's Cancel


class RunError(ValueError):
    """A run name or path that cannot be used (outside the output folder, not a plain name)."""


# ----------------------------------------------------------------------------- names and paths
def check_run_name(name) -> str:
    """A run name is one plain folder name: letters, digits, '.', '_' and '-' (no separators, no '..')."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise RunError(f"run name {name!r}: use 1-100 letters, digits, '.', '_' or '-', starting with a "
                       f"letter or digit (it names the run folder and the LoRA file)")
    return name


def _output() -> Path:
    return comfy.output_dir().resolve()


def inside_output(path) -> bool:
    """True when `path` (symlinks resolved) lies inside ComfyUI's output folder."""
    out, p = _output(), Path(path).resolve()
    return p == out or out in p.parents


def runs_root() -> Path:
    return _output() / RUNS_FOLDER


def run_dir(name: str) -> Path:
    """The folder of run `name`; refuses names, and folders (symlinks), that leave the output folder."""
    folder = runs_root() / check_run_name(name)
    if not inside_output(folder) or folder.resolve().parent != runs_root().resolve():
        raise RunError(f"run {name!r}: {folder} resolves outside the output folder {_output()}")
    return folder


def view_url(path) -> str | None:
    """ComfyUI's `/view` address of a file in the output folder (None for files elsewhere)."""
    p = Path(path).resolve()
    if not inside_output(p) or p == _output():
        return None
    subfolder = p.parent.relative_to(_output()).as_posix()
    subfolder = "" if subfolder == "." else subfolder
    return f"/view?filename={quote(p.name)}&subfolder={quote(subfolder)}&type=output"


# ----------------------------------------------------------------------------- one run
@dataclass
class Outcome:
    """How a trainer process ended: exit status, its done and error events, the end of its stderr,
    and why it was asked to stop (None when nobody asked)."""
    returncode: int
    done: dict | None
    error: str | None
    stderr: str
    stop_reason: str | None

    @property
    def finished(self) -> bool:
        return self.returncode == 0 and self.done is not None

    def failure(self) -> str:
        """The message a failed run raises in ComfyUI: the trainer's error event, else its stderr."""
        status = f"exit status {self.returncode}" if self.returncode >= 0 else \
            f"killed by signal {-self.returncode}"
        if self.error:
            traceback = self.returncode == 1 and self.stderr        # exit 1: an unexpected exception
            return f"training failed: {self.error}" + (
                f"\n--- trainer stderr (last lines) ---\n{self.stderr}" if traceback else "")
        return f"the trainer ended without finishing ({status})" + (
            f"; its last output:\n{self.stderr}" if self.stderr else "; it wrote nothing to stderr")


@dataclass
class Job:
    """One trainer process and what it reported."""
    run: str
    node: str
    folder: Path
    process: subprocess.Popen | None = None
    events: list = field(default_factory=list)
    last: dict | None = None
    done: dict | None = None
    error: str | None = None
    stop_reason: str | None = None
    stop_at: float | None = None
    stderr_tail: deque = field(default_factory=lambda: deque(maxlen=STDERR_LINES))
    relay: Callable[[dict], None] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def receive(self, line: str) -> dict | None:
        """One stdout line: an event is stored and relayed; anything else goes to the stderr tail."""
        line = line.strip()
        if not line:
            return None
        try:
            event = json.loads(line, parse_constant=lambda _: None)     # NaN/Infinity -> null
        except json.JSONDecodeError:
            event = None
        if not isinstance(event, dict) or not isinstance(event.get("event"), str):
            self.stderr_tail.append(line)
            return None
        payload = {**event, "node": self.node, "run": self.run}
        if event["event"] == "sample":
            payload["urls"] = [u for u in (view_url(p) for p in event.get("paths") or []) if u]
        elif event["event"] == "done":
            self.done = payload
        elif event["event"] == "error":
            self.error = str(event.get("message") or "unknown error")
        with self._lock:
            self.events.append(payload)
            self.last = payload
        if self.relay is not None:
            try:
                self.relay(payload)
            except Exception:           # the browser not listening must never stop a training
                log.exception("Kandinsky 5: relaying a training event failed")
        return payload

    def request_stop(self, reason: str) -> bool:
        """Ask the trainer to stop after its current step (saving LoRA and state). False when it is
        not running; asking again changes nothing."""
        if not self.running:
            return False
        if self.stop_reason is None:
            self.stop_reason, self.stop_at = reason, time.monotonic()
            log.info("Kandinsky 5: stopping training %s (%s)", self.run, reason)
            if os.name == "posix":
                self.process.send_signal(signal.SIGTERM)
            else:                       # Windows: SIGTERM would kill it at once; the stop file is graceful
                atomic_write_text(self.folder / f"{self.run}.stop", reason)
        return True

    def kill_if_stuck(self) -> None:
        if self.stop_at is not None and self.running and time.monotonic() - self.stop_at > STOP_TIMEOUT_S:
            log.error("Kandinsky 5: trainer %s did not stop within %.0f s; killing it", self.run, STOP_TIMEOUT_S)
            self.process.kill()

    def snapshot(self) -> tuple[list, dict | None]:
        with self._lock:
            return list(self.events), self.last


class Registry:
    """The one running job (and the last finished one, for the status route)."""

    def __init__(self):
        self.job: Job | None = None
        self._lock = threading.Lock()

    def begin(self, run: str, node: str, folder: Path, relay: Callable[[dict], None] | None = None) -> Job:
        """A new job (the only one running); `relay(payload)` gets every event as the browser does."""
        with self._lock:
            if self.job is not None and self.job.running:
                raise RuntimeError(f"training run {self.job.run!r} is still running; stop it first "
                                   f"(one training at a time)")
            self.job = Job(run, node, folder, relay=relay)
            return self.job

    def status(self) -> dict:
        job = self.job
        if job is None:
            return {"running": False, "run": None, "node": None, "events": [], "last": None}
        events, last = job.snapshot()
        return {"running": job.running, "run": job.run, "node": job.node, "events": events, "last": last}

    def stop(self, run) -> dict:
        job = self.job
        if run is not None and not isinstance(run, str):
            return {"ok": False, "error": f"'run' must be a run name or null, got {type(run).__name__}"}
        if job is None or not job.running:
            return {"ok": False, "error": "no training is running"}
        if run is not None and run != job.run:
            return {"ok": False, "error": f"run {run!r} is not running (running: {job.run!r})"}
        job.request_stop("stop requested from the browser")
        return {"ok": True}

    def runs(self) -> list[dict]:
        root = runs_root()
        if not root.is_dir():
            return []
        job = self.job
        out = []
        for folder in sorted(root.iterdir(), key=lambda p: p.name.lower()):
            if not folder.is_dir() or not NAME_RE.match(folder.name) or not inside_output(folder):
                continue
            out.append(describe_run(folder, running=bool(job and job.running and job.run == folder.name)))
        return out


REGISTRY = Registry()


def run_files(folder: Path, run: str) -> tuple[list[Path], list[tuple[int, Path]]]:
    """(LoRA files, states as (step, folder)) of run `run` in `folder`."""
    from trainer.state import list_states
    loras = sorted(p for p in folder.glob("*.safetensors")
                   if p.name == f"{run}.safetensors" or p.name.startswith(f"{run}-"))
    return loras, list_states(folder, run) if folder.is_dir() else []


def describe_run(folder: Path, running: bool = False) -> dict:
    """What the runs route tells about one run folder (paths relative to the output folder)."""
    loras, states = run_files(folder, folder.name)
    rel = lambda p: p.resolve().relative_to(_output()).as_posix()
    return {"name": folder.name, "folder": rel(folder), "running": running,
            "loras": [rel(p) for p in loras], "final": (folder / f"{folder.name}.safetensors").is_file(),
            "states": [step for step, _ in states], "modified": folder.stat().st_mtime}


# ----------------------------------------------------------------------------- the subprocess
def trainer_env(cpu: bool) -> dict:
    """The trainer's environment: ours, unbuffered UTF-8 output, and CPU only when ComfyUI runs on the CPU."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"}
    if cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    return env


def _read_lines(stream, sink: Callable[[str | None], None]) -> None:
    try:
        for line in stream:
            sink(line)
    finally:
        sink(None)


def run_trainer(config: Path, job: Job, *, should_stop: Callable[[], bool] = comfy.should_stop,
                cpu: bool = False) -> Outcome:
    """Start `python -m trainer --config <config>` in the pack folder for `job`, relay its events,
    stop it when should_stop() turns True, and wait for it to end."""
    cmd = [sys.executable, "-m", "trainer", "--config", str(config)]
    log.info("Kandinsky 5: starting training %s: %s", job.run, " ".join(cmd))
    job.process = subprocess.Popen(cmd, cwd=PACK_DIR, env=trainer_env(cpu), stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   encoding="utf-8", errors="replace", bufsize=1)
    lines: queue.Queue = queue.Queue()

    def stderr_line(line):
        if line is not None:
            job.stderr_tail.append(line.rstrip())
            log.info("[k5 trainer] %s", line.rstrip())

    readers = [threading.Thread(target=_read_lines, args=(job.process.stdout, lines.put), daemon=True),
               threading.Thread(target=_read_lines, args=(job.process.stderr, stderr_line), daemon=True)]
    for t in readers:
        t.start()
    try:
        while True:
            try:
                line = lines.get(timeout=POLL_S)
            except queue.Empty:
                line = ""
            if line is None:
                break
            job.receive(line)
            if should_stop():
                job.request_stop(INTERRUPT)
            job.kill_if_stuck()
    except BaseException:                 # this node is going away: the trainer must not train on unseen
        job.request_stop("the Train node failed")
        raise
    returncode = job.process.wait()
    for t in readers:
        t.join(timeout=5)
    stop_file = job.folder / f"{job.run}.stop"
    if stop_file.exists():
        stop_file.unlink()
    return Outcome(returncode, job.done, job.error, "\n".join(job.stderr_tail), job.stop_reason)


def _stop_on_exit() -> None:
    """ComfyUI is quitting: ask a running trainer to save and stop (it would train on unseen)."""
    job = REGISTRY.job
    if job is not None and job.running:
        job.request_stop("ComfyUI is shutting down")


atexit.register(_stop_on_exit)


# ----------------------------------------------------------------------------- routes
def _json(data, status: int = 200):
    from aiohttp import web
    return web.json_response(data, status=status)


async def status_route(request):
    """GET /k5/train/status: the running (or last) run and every event relayed so far."""
    return _json(REGISTRY.status())


async def stop_route(request):
    """POST /k5/train/stop {"run": name | null}: stop the running run (null: whichever runs)."""
    try:
        body = await request.json() if request.can_read_body else {}
    except (ValueError, UnicodeDecodeError) as e:
        return _json({"ok": False, "error": f"body is not JSON ({e})"}, status=400)
    if not isinstance(body, dict):
        return _json({"ok": False, "error": "body must be a JSON object like {\"run\": \"name\"}"}, status=400)
    result = REGISTRY.stop(body.get("run"))
    return _json(result, status=200 if result["ok"] else 409)


async def runs_route(request):
    """GET /k5/train/runs: the run folders under <output>/k5_train."""
    return _json({"runs": REGISTRY.runs()})


ROUTES = (("GET", "/k5/train/status", status_route), ("POST", "/k5/train/stop", stop_route),
          ("GET", "/k5/train/runs", runs_route))
_registered: list = []


def register_routes() -> bool:
    """Add the routes to ComfyUI's server (once). Must run at import time of the pack: ComfyUI adds
    the /api mirror of every route that exists when it sets up its own. False outside ComfyUI."""
    routes = getattr(comfy.prompt_server(), "routes", None)
    if routes is None:
        return False
    if any(r is routes for r in _registered):
        return True
    for method, path, handler in ROUTES:
        routes.route(method, path)(handler)
    _registered.append(routes)
    return True


register_routes()
