"""Training settings: the flags of musubi-tuner's Kandinsky 5 training command, and a TOML `--config`
that holds the same settings (keys = flag names without the dashes).

Precedence: defaults < TOML < command line. Every problem is collected and reported at once
(`ConfigError.problems`), each naming where the value came from (`--flag` or `file.toml: key`)
and what was expected. Nothing is written while reading a config except the writability probe of
the output folder, which leaves nothing behind.
"""
from __future__ import annotations

import argparse
import difflib
import math
import os
import random
import tempfile
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
TIMESTEP_SAMPLINGS = ("uniform", "sigmoid", "shift", "logsnr")
WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "cosmap")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
ATTENTION_FLAGS = {"sdpa": "sdpa", "flash_attn": "flash2", "flash3": "flash3", "sage_attn": "sage",
                   "xformers": "xformers"}
NETWORK_MODULES = ("networks.lora_kandinsky", "networks.lora", "k5core.lora")
SAMPLE_FILE_KEYS = ("vae", "text_encoder_qwen", "text_encoder_clip")


class ConfigError(ValueError):
    """Settings that cannot be used; `problems` has one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid training settings:\n  " + "\n  ".join(self.problems))


def opt(default=None, help: str = "", choices=None, flags=(), kind=None):
    """A setting: its default, help text, allowed values, extra flag spellings and value type."""
    return field(default=default, metadata={"help": help, "choices": choices, "flags": tuple(flags),
                                            "kind": kind})


@dataclass
class TrainConfig:
    """Every setting of a run. Field names are the flag names (`--network_dim`) and TOML keys."""
    # --- what to train
    task: str = opt(None, "Kandinsky 5 task, e.g. k5-lite-t2v-5s-sd or k5-lite-i2v-5s-sd (I2V needs I2V caches)", kind=str)
    dit: str = opt(None, "DiT checkpoint (.safetensors file or diffusers folder)", kind=str)
    dataset_config: str = opt(None, "dataset TOML whose latent and text caches are built", kind=str)
    output_dir: str = opt(None, "folder for the LoRA files, states and samples", kind=str)
    output_name: str = opt("k5_lora", "file name stem of the LoRA files", kind=str)
    # --- model and memory
    mixed_precision: str = opt(None, "autocast dtype; default: accelerate's setting, else bf16 on CUDA and no on CPU",
                               choices=MIXED_PRECISIONS, kind=str)
    attention: str = opt("sdpa", "attention kernel (also --sdpa / --flash_attn / --flash3 / --sage_attn / --xformers)",
                         choices=tuple(ATTENTION_FLAGS.values()), kind=str)
    fp8_base: bool = opt(False, "store the DiT's block Linear weights in fp8 (e4m3fn)", kind=bool)
    fp8_scaled: bool = opt(True, "with --fp8_base: per-channel scaled fp8 (better quality)", kind=bool)
    blocks_to_swap: int = opt(0, "visual blocks kept in CPU memory and streamed to the GPU (CUDA only)", kind=int)
    gradient_checkpointing: bool = opt(False, "recompute block activations in backward", kind=bool)
    gradient_checkpointing_cpu_offload: bool = opt(False, "keep checkpointed activations in CPU memory", kind=bool)
    # --- network
    network_module: str = opt("networks.lora_kandinsky", "LoRA implementation (musubi's name is accepted)",
                              choices=NETWORK_MODULES, kind=str)
    network_dim: int = opt(32, "LoRA rank", kind=int)
    network_alpha: float = opt(1.0, "LoRA alpha (scale = alpha / dim), musubi's default 1", kind=float)
    network_dropout: float = opt(0.0, "dropout on the LoRA down projection's output", kind=float)
    network_args: list = opt(None, "extra LoRA settings key=value (e.g. include_patterns, exclude_patterns)",
                             kind=list)
    network_weights: str = opt(None, "start from the weights of an existing LoRA file", kind=str)
    # --- optimisation
    optimizer_type: str = opt("adamw8bit", "optimizer", choices=OPTIMIZERS, kind=str)
    optimizer_args: list = opt(None, "extra optimizer arguments key=value (e.g. weight_decay=0.01 betas=0.9,0.99)",
                               kind=list)
    learning_rate: float = opt(1e-4, "peak learning rate", kind=float)
    max_grad_norm: float = opt(1.0, "clip the gradient norm to this (0 = no clipping)", kind=float)
    lr_scheduler: str = opt("constant", "learning-rate schedule after warmup", choices=SCHEDULERS, kind=str)
    lr_warmup_steps: float = opt(0, "linear warmup steps (a value below 1 is a fraction of all steps)", kind=float)
    lr_scheduler_min_lr_ratio: float = opt(0.0, "cosine/linear decay ends at this fraction of the peak rate",
                                           kind=float)
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step", kind=int)
    max_train_steps: int = opt(1600, "optimizer steps to train (ignored when max_train_epochs is set)", kind=int)
    max_train_epochs: int = opt(None, "epochs to train (overrides max_train_steps)", kind=int)
    seed: int = opt(None, "random seed of data order, noise and timesteps (default: random, recorded)", kind=int)
    # --- flow matching
    timestep_sampling: str = opt("shift", "how training times t are drawn", choices=TIMESTEP_SAMPLINGS, kind=str)
    discrete_flow_shift: float = opt(3.0, "shift of the 'shift' sampling: t' = s t / (1 + (s - 1) t)", kind=float)
    sigmoid_scale: float = opt(1.0, "scale of the normal draw of 'sigmoid' and 'shift'", kind=float)
    logit_mean: float = opt(0.0, "mean of log-SNR for 'logsnr'", kind=float)
    logit_std: float = opt(1.0, "std of log-SNR for 'logsnr'", kind=float)
    min_timestep: float = opt(0.0, "t is rescaled into [min_timestep, max_timestep] / 1000", kind=float)
    max_timestep: float = opt(1000.0, "upper end of the timestep range (at most 1000)", kind=float)
    weighting_scheme: str = opt("none", "loss weight per sample from its t", choices=WEIGHTING_SCHEMES, kind=str)
    # --- data
    max_data_loader_n_workers: int = opt(2, "worker processes reading cache files", kind=int)
    persistent_data_loader_workers: bool = opt(False, "accepted for musubi-tuner commands: one loader and its workers "
                                                      "serve the whole run anyway", kind=bool)
    # --- saving
    save_every_n_epochs: int = opt(None, "save a LoRA every N epochs", kind=int)
    save_every_n_steps: int = opt(None, "save a LoRA every N steps", kind=int)
    save_state: bool = opt(False, "save optimizer/scheduler/RNG/data position with every LoRA (for --resume)",
                           kind=bool)
    resume: str = opt(None, "continue from a state folder, or 'latest' for the newest one of this output_name",
                      kind=str)
    # --- sampling during training
    vae: str = opt(None, "VAE for samples", kind=str)
    text_encoder_qwen: str = opt(None, "Qwen2.5-VL text encoder for sample prompts", flags=("--text_encoder1",),
                                 kind=str)
    text_encoder_clip: str = opt(None, "CLIP-L text encoder for sample prompts", flags=("--text_encoder2",),
                                 kind=str)
    qwen_tokenizer: str = opt(None, "Qwen tokenizer folder (default: next to the model or in the ComfyUI install)",
                              kind=str)
    clip_tokenizer: str = opt(None, "CLIP tokenizer folder (default: next to the model or in the ComfyUI install)",
                              kind=str)
    comfy_root: str = opt(None, "ComfyUI folder whose tokenizer folders to use", kind=str)
    sample_prompts: str = opt(None, "prompt file: one prompt a line, options --w --h --f --d --s --g --fs --n --i",
                              kind=str)
    sample_every_n_steps: int = opt(None, "sample every N steps", kind=int)
    sample_every_n_epochs: int = opt(None, "sample every N epochs", kind=int)
    sample_at_first: bool = opt(False, "sample before the first step", kind=bool)
    # --- control and reporting
    events: str = opt(None, "write the JSON-lines event stream to this file instead of stdout", kind=str)
    stop_file: str = opt(None, "stop (saving the state) when this file appears; default output_dir/<name>.stop",
                         kind=str)
    config: str = opt(None, "TOML file with any of these settings (keys = flag names)",
                      flags=("--config_file",), kind=str)

    # --------------------------------------------------------------------- derived values
    @property
    def stop_path(self) -> Path:
        return Path(self.stop_file) if self.stop_file else Path(self.output_dir) / f"{self.output_name}.stop"

    @property
    def lora_path(self) -> Path:
        """The final LoRA file."""
        return Path(self.output_dir) / f"{self.output_name}.safetensors"

    def summary(self) -> dict:
        """The settings as plain JSON values (the `start` event's config)."""
        return {k: v for k, v in asdict(self).items() if v is not None and k not in ("config",)}


REQUIRED = ("task", "dit", "dataset_config", "output_dir")
FIELDS = {f.name: f for f in fields(TrainConfig)}


# ------------------------------------------------------------------------------------- parsing
def build_parser() -> argparse.ArgumentParser:
    """The command line: one flag per TrainConfig field; defaults are None so TOML values survive."""
    p = argparse.ArgumentParser(prog="python -m trainer", argument_default=None,
                                description="Train a Kandinsky 5 LoRA on cached latents and text embeddings.")
    for f in fields(TrainConfig):
        meta = f.metadata
        flags = [f"--{f.name}", *meta["flags"]]
        help_text = meta["help"] + (f"; one of {', '.join(meta['choices'])}" if meta["choices"] else "") \
            + (f" (default {f.default})" if f.default not in (None, False, "") else "")
        if meta["kind"] is bool:
            p.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        elif meta["kind"] is list:
            p.add_argument(*flags, dest=f.name, nargs="*", help=help_text)
        else:
            p.add_argument(*flags, dest=f.name, type=str, metavar=f.name.upper(), help=help_text)
    for flag, backend in ATTENTION_FLAGS.items():
        p.add_argument(f"--{flag}", dest="attention_flag", action="append_const", const=backend,
                       help=f"use the {backend} attention kernel")
    return p


def load_config(argv: list[str] | None = None) -> TrainConfig:
    """Parse flags and the optional TOML, fill defaults and check everything (ConfigError)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    problems = [f"unknown flag {u}{_suggest(u.lstrip('-').split('=')[0], FIELDS, '--')}"
                for u in unknown if u.startswith("-")]
    problems += [f"unexpected argument {u!r} (flags take the form --name value)"
                 for u in unknown if not u.startswith("-")]
    values: dict = {}
    if args.config:
        values.update(read_toml(args.config, problems))
    cli = {k: v for k, v in vars(args).items() if v is not None and k in FIELDS}
    for name, value in cli.items():
        values[name] = (value, f"--{name}")
    if args.attention_flag:
        if len(set(args.attention_flag)) > 1:
            problems.append(f"several attention flags given ({', '.join(sorted(set(args.attention_flag)))}); "
                            f"choose one")
        values["attention"] = (args.attention_flag[-1], f"--{args.attention_flag[-1]}")
    cfg = TrainConfig()
    for name, (value, where) in values.items():
        try:
            setattr(cfg, name, convert(name, value))
        except ValueError as e:
            problems.append(f"{where}: {e}")
    problems += validate(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def read_toml(path: str, problems: list[str]) -> dict:
    """TOML keys -> {name: (value, 'file: key')}; unknown keys and tables are problems."""
    p = Path(path)
    if not p.is_file():
        problems.append(f"--config {path}: file not found")
        return {}
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        problems.append(f"{path}: not valid TOML ({e})")
        return {}
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            problems.append(f"{path}: table [{key}] is not allowed; write the settings as plain keys at the top")
        elif key not in FIELDS or key == "config":
            problems.append(f"{path}: unknown key {key!r}{_suggest(key, FIELDS)}")
        else:
            out[key] = (value, f"{path}: {key}")
    return out


def _suggest(key: str, known, prefix: str = "") -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def convert(name: str, value):
    """Turn a flag string or TOML value into the field's type; ValueError says what was expected."""
    meta = FIELDS[name].metadata
    kind, choices = meta["kind"], meta["choices"]
    if kind is bool:
        value = _bool(value)
    elif kind is list:
        value = _list(value)
    elif kind is int:
        value = _int(value)
    elif kind is float:
        value = _float(value)
    elif not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    if choices and value is not None:
        value = value.lower()
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
    return value


def _bool(v):
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "1", "yes", "false", "0", "no"):
        return v.lower() in ("true", "1", "yes")
    raise ValueError(f"expected true or false, got {v!r}")


def _int(v):
    if isinstance(v, bool):
        raise ValueError(f"expected an integer, got {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"expected an integer, got {v!r}") from None
    if not f.is_integer():
        raise ValueError(f"expected an integer, got {v!r}")
    return int(f)


def _float(v):
    if isinstance(v, bool):
        raise ValueError(f"expected a number, got {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {v!r}") from None
    if not math.isfinite(f):
        raise ValueError(f"expected a finite number, got {v!r}")
    return f


def _list(v):
    if isinstance(v, str):
        return v.split()
    if isinstance(v, list) and all(isinstance(x, (str, int, float)) for x in v):
        return [str(x) for x in v]
    raise ValueError(f"expected a list of key=value strings, got {v!r}")


def parse_key_values(items: list[str] | None, where: str) -> dict:
    """["a=1", "b=x,y"] -> {"a": 1, "b": ("x", "y")}: numbers and booleans converted, commas make tuples."""
    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError([f"{where}: {item!r} is not key=value"])
        parts = [_literal(x) for x in raw.split(",")] if "," in raw else None
        out[key.strip()] = tuple(parts) if parts is not None else _literal(raw)
    return out


def _literal(s: str):
    s = s.strip()
    if s.lower() in ("true", "false"):
        return s.lower() == "true"
    if s.lower() in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    return s


# ---------------------------------------------------------------------------------- validation
def validate(cfg: TrainConfig) -> list[str]:
    """Every problem of a filled-in config, as readable lines (empty when it is usable)."""
    problems = [f"--{k} is required (flag or config key)" for k in REQUIRED if not getattr(cfg, k)]
    if cfg.task:
        from k5core.tasks import TASKS
        if cfg.task not in TASKS:
            problems.append(f"--task: unknown task {cfg.task!r}{_suggest(cfg.task, TASKS)}")
        elif not TASKS[cfg.task].is_video:
            problems.append(f"--task: {cfg.task} is an image task; this trainer trains the video tasks (t2v, i2v)")
    for key in ("dit", "dataset_config", "network_weights", "sample_prompts", *SAMPLE_FILE_KEYS):
        value = getattr(cfg, key)
        if value and not Path(value).exists():
            problems.append(f"--{key}: {value} does not exist")
    problems += _check_numbers(cfg)
    problems += _check_sampling(cfg)
    if cfg.output_name and (os.sep in cfg.output_name or "/" in cfg.output_name or cfg.output_name in (".", "..")):
        problems.append(f"--output_name: {cfg.output_name!r} must be a plain file name stem, not a path")
    if cfg.output_dir:
        problem = writable_dir_problem(Path(cfg.output_dir))
        if problem:
            problems.append(f"--output_dir: {problem}")
    if cfg.resume and cfg.resume != "latest" and not Path(cfg.resume).is_dir():
        problems.append(f"--resume: {cfg.resume} is not a state folder (or use 'latest')")
    try:
        parse_key_values(cfg.optimizer_args, "--optimizer_args")
        parse_key_values(cfg.network_args, "--network_args")
    except ConfigError as e:
        problems += e.problems
    return problems


def _check_numbers(cfg: TrainConfig) -> list[str]:
    checks = [
        ("network_dim", cfg.network_dim >= 1, "at least 1"),
        ("network_alpha", cfg.network_alpha > 0, "above 0"),
        ("network_dropout", 0 <= cfg.network_dropout < 1, "in [0, 1)"),
        ("learning_rate", cfg.learning_rate > 0, "above 0"),
        ("max_grad_norm", cfg.max_grad_norm >= 0, "0 (off) or more"),
        ("lr_warmup_steps", cfg.lr_warmup_steps >= 0, "0 or more"),
        ("lr_scheduler_min_lr_ratio", 0 <= cfg.lr_scheduler_min_lr_ratio <= 1, "in [0, 1]"),
        ("gradient_accumulation_steps", cfg.gradient_accumulation_steps >= 1, "at least 1"),
        ("max_train_steps", cfg.max_train_steps >= 1, "at least 1"),
        ("max_train_epochs", cfg.max_train_epochs is None or cfg.max_train_epochs >= 1, "at least 1"),
        ("blocks_to_swap", cfg.blocks_to_swap >= 0, "0 or more"),
        ("discrete_flow_shift", cfg.discrete_flow_shift > 0, "above 0"),
        ("sigmoid_scale", cfg.sigmoid_scale > 0, "above 0"),
        ("logit_std", cfg.logit_std > 0, "above 0"),
        ("min_timestep", 0 <= cfg.min_timestep < 1000, "in [0, 1000)"),
        ("max_timestep", 0 < cfg.max_timestep <= 1000, "in (0, 1000]"),
        ("max_data_loader_n_workers", cfg.max_data_loader_n_workers >= 0, "0 or more"),
        ("seed", cfg.seed is None or 0 <= cfg.seed < 2**63, "in [0, 2^63)"),
    ]
    problems = [f"--{name}: {getattr(cfg, name)} must be {what}" for name, ok, what in checks if not ok]
    if cfg.min_timestep >= cfg.max_timestep:
        problems.append(f"--min_timestep {cfg.min_timestep} must be below --max_timestep {cfg.max_timestep}")
    for name in ("save_every_n_epochs", "save_every_n_steps", "sample_every_n_steps", "sample_every_n_epochs"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            problems.append(f"--{name}: {value} must be at least 1 (leave it out to turn it off)")
    return problems


def _check_sampling(cfg: TrainConfig) -> list[str]:
    wants = cfg.sample_every_n_steps or cfg.sample_every_n_epochs or cfg.sample_at_first
    if not wants:
        return []
    missing = [f"--{k}" for k in ("sample_prompts", *SAMPLE_FILE_KEYS) if not getattr(cfg, k)]
    return [f"sampling during training needs {', '.join(missing)}"] if missing else []


def writable_dir_problem(path: Path) -> str | None:
    """Why files cannot be written in `path` (None when they can). A folder that does not exist yet
    is checked through its nearest existing parent; nothing is created or left behind."""
    probe_dir = path
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            return f"cannot create folder {path}"
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        return f"cannot create folder {path}: {probe_dir} is a file"
    try:
        fd, probe = tempfile.mkstemp(prefix=".k5-write-test-", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        where = "folder" if probe_dir == path else f"folder {path}: its parent"
        return f"{where} {probe_dir} is not writable ({e.strerror or e})"
    return None


def resolve_seed(cfg: TrainConfig) -> int:
    """The run's seed: the given one, or a fresh random one that gets recorded in the state."""
    if cfg.seed is None:
        cfg.seed = random.SystemRandom().randrange(2**31)
    return cfg.seed
