"""Sample videos during training from a prompt file, with the model being trained (LoRA attached,
unmerged), so the user sees what the LoRA does while it learns.

Prompt file (musubi-tuner's format): one prompt a line, `#` starts a comment line, options after the
prompt: --w width, --h height, --f frames, --d seed, --s steps, --g / --l guidance (CFG scale),
--fs flow shift, --n negative prompt, --i first-frame image (I2V). Defaults: the generate CLI's size,
25 frames (1 s), seed 42 + line index, 20 steps, the task's guidance and shift and its default
negative prompt. The text encoders run once at the start (their embeddings are kept, the encoders
freed); the VAE waits in CPU memory and visits the GPU to decode.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

from k5core import pipeline, sampling
from k5core.media import read_image, write_image, write_video
from k5core.tasks import Task

DEFAULT_FRAMES = 25
DEFAULT_STEPS = 20
OPTIONS = {"--w": "width", "--h": "height", "--f": "frames", "--d": "seed", "--s": "steps", "--g": "guidance",
           "--l": "guidance", "--fs": "shift", "--n": "negative", "--i": "image"}


class PromptFileError(ValueError):
    """A prompt file line that cannot be used (the message names the file and line)."""


@dataclass
class SamplePrompt:
    prompt: str
    width: int
    height: int
    frames: int
    seed: int
    steps: int = DEFAULT_STEPS
    guidance: float | None = None
    shift: float | None = None
    negative: str | None = None
    image: str | None = None
    line: int = 0


def parse_prompt_file(path, task: Task) -> list[SamplePrompt]:
    """Read a prompt file into SamplePrompts with the task's defaults filled in (sizes checked)."""
    path = Path(path)
    height, width = sampling.default_size(task)
    prompts = []
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{n}"
        text, values = _split_options(line, where)
        if not text:
            raise PromptFileError(f"{where}: the line has options but no prompt")
        p = SamplePrompt(text, width, height, DEFAULT_FRAMES if task.is_video else 1, 42 + len(prompts), line=n)
        for key, value in values.items():
            setattr(p, key, _typed(key, value, where))
        try:
            sampling.check_size(task, p.width, p.height, p.frames)
        except ValueError as e:
            raise PromptFileError(f"{where}: {e}") from None
        if task.mode == "i2v" and not p.image:
            raise PromptFileError(f"{where}: task {task.name} is image-to-video; add --i path/to/first_frame.png")
        if p.image and not Path(p.image).is_file():
            candidate = path.parent / p.image
            if not candidate.is_file():
                raise PromptFileError(f"{where}: image {p.image} not found")
            p.image = str(candidate)
        prompts.append(p)
    if not prompts:
        raise PromptFileError(f"{path}: no prompts (every line is empty or a # comment)")
    return prompts


def _split_options(line: str, where: str) -> tuple[str, dict]:
    """'a cat --w 64 --n blurry, dark' -> ('a cat', {'width': '64', 'negative': 'blurry, dark'})."""
    try:
        words = shlex.split(line, posix=True)
    except ValueError as e:
        raise PromptFileError(f"{where}: cannot split the line ({e})") from None
    text, values, key = [], {}, None
    for w in words:
        if w.startswith("--") and w in OPTIONS:
            key = OPTIONS[w]
            values[key] = []
        elif w.startswith("--") and len(w) <= 4 and w[2:].isalpha():
            raise PromptFileError(f"{where}: unknown option {w} (known: {', '.join(OPTIONS)})")
        elif key is None:
            text.append(w)
        else:
            values[key].append(w)
    return " ".join(text), {k: " ".join(v) for k, v in values.items()}


def _typed(key: str, value: str, where: str):
    casts = {"width": int, "height": int, "frames": int, "seed": int, "steps": int, "guidance": float,
             "shift": float}
    if key not in casts:
        return value
    try:
        return casts[key](value)
    except ValueError:
        raise PromptFileError(f"{where}: {key} must be a {casts[key].__name__}, got {value!r}") from None


class Sampler:
    """Encodes the prompts once (then frees the encoders) and makes sample videos on demand through
    k5core.pipeline, the same path as the generate CLI and the ComfyUI nodes."""

    def __init__(self, cfg, task: Task, device: torch.device, dtype: torch.dtype, log):
        from k5core.text import TextEncoder
        from k5core.vae import load_vae
        self.task, self.device, self.dtype = task, device, dtype
        self.prompts = parse_prompt_file(cfg.sample_prompts, task)
        self.settings = [pipeline.resolve(pipeline.Settings(
            task=task.name, prompt=p.prompt, negative_prompt=p.negative, width=p.width, height=p.height,
            frames=p.frames, steps=p.steps, guidance=p.guidance, shift=p.shift, seed=p.seed)) for p in self.prompts]
        self.out_dir = Path(cfg.output_dir) / "samples"
        self.name = cfg.output_name
        log(f"encoding {len(self.prompts)} sample prompt(s)")
        encoder = TextEncoder.load(cfg.text_encoder_qwen, cfg.text_encoder_clip, device=device,
                                   text_dim=task.dit.in_text_dim, pooled_dim=task.dit.in_text_dim2,
                                   qwen_tokenizer=cfg.qwen_tokenizer, clip_tokenizer=cfg.clip_tokenizer,
                                   comfy_root=cfg.comfy_root)
        with torch.no_grad():
            self.embeds = [tuple(None if e is None else e.to("cpu")
                                 for e in pipeline.encode_prompts(encoder, s, self._edit_source(task, p)))
                           for s, p in zip(self.settings, self.prompts)]
        encoder.unload()
        del encoder
        self.vae = load_vae(cfg.vae, device="cpu")
        if self.vae.kind != task.vae:
            raise ValueError(f"--vae {cfg.vae}: a {self.vae.kind} VAE; task {task.name} needs the {task.vae} VAE")

    @staticmethod
    def _edit_source(task: Task, prompt):
        """I2I prompts are encoded with their source image (Qwen's vision tokens), as in generate."""
        return read_image(prompt.image) if task.mode == "i2i" and prompt.image else None

    def _vae_to(self, device) -> None:
        """Move the VAE only when it is elsewhere (moves are slow and chatty)."""
        if self.vae.device != torch.device(device):
            self.vae.to(device)

    def run(self, model, step: int, should_stop=None) -> tuple[list[Path], list[str]]:
        """Generate every prompt with the model as it is now; returns (paths, prompts).
        Raises sampling.SamplingCancelled when should_stop() turns True."""
        was_training = model.training
        model.eval()
        try:
            paths = [self._one(model, step, i, should_stop) for i in range(len(self.prompts))]
        finally:
            model.train(was_training)
            self._vae_to("cpu")
        return paths, [p.prompt for p in self.prompts]

    def _one(self, model, step: int, i: int, should_stop) -> Path:
        p, settings = self.prompts[i], self.settings[i]
        embeds, negative = self.embeds[i]
        image_latent = None
        if p.image:
            self._vae_to(self.device)
            image_latent = pipeline.encode_image(self.vae, read_image(p.image), settings).to(self.device)
        with torch.no_grad(), torch.autocast(self.device.type, self.dtype, enabled=self.dtype != torch.float32):
            result = pipeline.generate(model, self.vae, settings, embeds.to(self.device),
                                       None if negative is None else negative.to(self.device),
                                       image_latent=image_latent, should_stop=should_stop,
                                       before_decode=lambda: self._vae_to(self.device))
        frames = result.frames[0]                                               # (F, H, W, 3) in [0, 1]
        meta = {"k5_settings": settings.to_metadata(step=step, lora="training")}
        stem = f"{self.name}_step{step:08d}_{i:02d}"
        if p.frames == 1:
            return write_image(frames[0], self.out_dir / f"{stem}.png", meta)
        return write_video(frames, self.out_dir / f"{stem}.mp4", fps=self.task.fps, metadata=meta)
