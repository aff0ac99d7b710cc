"""`python -m trainer ...` (or `accelerate launch [opts] -m trainer ...`): train a Kandinsky 5 LoRA.

Exit status: 0 when the run finished or was stopped (SIGTERM, SIGINT, stop file) after saving;
2 for bad input (settings, dataset, caches, checkpoints, states), reported as an `error` event
before anything is written; 1 for any other failure (error event, traceback on stderr).
"""
from __future__ import annotations

import os
import sys
import traceback

from .config import ConfigError, load_config
from .events import EventWriter

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def bad_input_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the input is wrong" (clear message, no traceback)."""
    from k5core.cache import CacheError
    from k5core.data import DatasetConfigError
    from k5core.loading import CheckpointError
    from k5core.lora import LoRAError

    from .loop import TrainingError
    from .sample import PromptFileError
    from .state import StateError
    return (ConfigError, CacheError, DatasetConfigError, CheckpointError, LoRAError, StateError,
            PromptFileError, TrainingError, FileNotFoundError)


def _events_flag(argv: list[str]) -> str | None:
    """--events FILE from the command line, read before the full parse so that even a settings
    error goes to the right place."""
    for i, a in enumerate(argv):
        if a == "--events" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--events="):
            return a.split("=", 1)[1]
    return None


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def main(argv: list[str] | None = None, stdout=None) -> int:
    """Parse, train, report. `stdout` is where events go when no --events file is given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    events = EventWriter(_events_flag(argv), stream=stdout, enabled=_is_main_process())
    try:
        cfg = load_config(argv)
        if cfg.events and cfg.events != _events_flag(argv):      # --events given in the TOML
            events.close()
            events = EventWriter(cfg.events, stream=stdout, enabled=_is_main_process())
        from .loop import train
        train(cfg, events)
        return EXIT_OK
    except bad_input_errors() as e:
        events.emit("error", message=str(e))
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        events.emit("error", message="interrupted (second Ctrl-C): no state saved for this step")
        return 130
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        events.emit("error", message=f"{type(e).__name__}: {e}")
        return EXIT_FAILED
    finally:
        events.close()


def _events_to_real_stdout():
    """Keep the real stdout for events only: anything else printed to it (libraries, native code)
    goes to stderr, so the event stream stays one JSON object per line."""
    sys.stdout.flush()
    stream = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return stream


if __name__ == "__main__":
    sys.exit(main(stdout=_events_to_real_stdout()))
