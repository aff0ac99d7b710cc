"""The trainer's event stream: one JSON object per line, read by the ComfyUI Train node, the web widget
and the tests; plus a plain readable progress line per event on stderr for people at a terminal.

Events and their fields (the web widget relies on exactly these):
    start       total, run, config, step (0, or the step a resumed run continues from)
    step        step, total, epoch, loss, avg_loss, lr, it_s, eta_s, peak_mem (bytes)
    epoch       epoch, step, avg_loss
    sample      step, paths, prompts
    checkpoint  path, step (and state: the state folder, when one was saved)
    log         message (level "info" | "warning")
    error       message
    done        lora_path, lora_name, step, stopped (true when a stop request ended the run)
Non-finite numbers are written as null (JSON has no NaN), so every line parses everywhere.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import IO

EVENTS = ("start", "step", "epoch", "sample", "checkpoint", "log", "error", "done")


def _clean(value):
    """JSON-safe copy: NaN/inf -> None, paths -> str, tuples -> lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def encode_event(event: str, **fields) -> str:
    """One event as a JSON line (without the newline)."""
    if event not in EVENTS:
        raise ValueError(f"unknown event {event!r}; events are {', '.join(EVENTS)}")
    return json.dumps({"event": event, **_clean(fields)}, allow_nan=False, ensure_ascii=False)


class EventWriter:
    """Writes events as JSON lines to `stream` (stdout) or to the file `path`, and a readable line
    to `human` (stderr). `enabled=False` (non-main processes) drops everything but errors' text."""

    def __init__(self, path: str | None = None, stream: IO | None = None, human: IO | None = None,
                 enabled: bool = True):
        self.enabled = enabled
        self.human = human if human is not None else sys.stderr
        self._file = None
        if enabled and path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8", buffering=1)
        self.stream = self._file or (stream if stream is not None else sys.stdout)
        self.started = time.time()

    def emit(self, event: str, **fields) -> None:
        line = encode_event(event, **fields)
        if self.enabled:
            self.stream.write(line + "\n")
            self.stream.flush()
        if self.enabled or event == "error":
            self._say(event, fields)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    # ------------------------------------------------------------------ readable progress
    def _say(self, event: str, f: dict) -> None:
        text = human_line(event, f)
        if text:
            try:
                self.human.write(text + "\n")
                self.human.flush()
            except (OSError, ValueError):
                pass  # a closed stderr must never stop the training


def human_line(event: str, f: dict) -> str:
    """A short line for people: `step 12/100 ep 1 loss 0.1234 avg 0.1301 lr 1.00e-04 2.1 it/s eta 0:42`."""
    if event == "step":
        speed = f.get("it_s") or 0
        speed_text = f"{speed:.2f} it/s" if speed >= 1 else (f"{1 / speed:.2f} s/it" if speed > 0 else "-")
        return (f"step {f['step']}/{f['total']} ep {f['epoch']} loss {_num(f.get('loss'))} "
                f"avg {_num(f.get('avg_loss'))} lr {f.get('lr', 0):.2e} {speed_text} "
                f"eta {_duration(f.get('eta_s'))} mem {_bytes(f.get('peak_mem'))}")
    if event == "start":
        resumed = f" (resuming at step {f['step']})" if f.get("step") else ""
        return f"training {f.get('run')}: {f.get('total')} steps{resumed}"
    if event == "epoch":
        return f"epoch {f['epoch']} done at step {f.get('step')} avg loss {_num(f.get('avg_loss'))}"
    if event == "sample":
        return f"samples at step {f.get('step')}: " + ", ".join(str(p) for p in f.get("paths", []))
    if event == "checkpoint":
        return f"saved {f.get('path')}" + (f" and state {f['state']}" if f.get("state") else "")
    if event == "log":
        return ("warning: " if f.get("level") == "warning" else "") + str(f.get("message", ""))
    if event == "error":
        return f"error: {f.get('message')}"
    if event == "done":
        how = "stopped" if f.get("stopped") else "done"
        return f"{how} at step {f.get('step')}: {f.get('lora_path') or 'no LoRA saved'}"
    return ""


def _num(x) -> str:
    return "nan" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.4f}"


def _duration(s) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    s = int(round(s))
    h, m = divmod(s, 3600)
    m, sec = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _bytes(b) -> str:
    if not b:
        return "-"
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def read_events(path_or_text) -> list[dict]:
    """Parse an event stream (a file path or the text itself); raises ValueError on a bad line."""
    text = Path(path_or_text).read_text(encoding="utf-8") if isinstance(path_or_text, Path) else path_or_text
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            ev = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"event line {n} is not JSON ({e}): {line[:200]!r}") from None
        if not isinstance(ev, dict) or ev.get("event") not in EVENTS:
            raise ValueError(f"event line {n} has no known 'event': {line[:200]!r}")
        out.append(ev)
    return out
