"""`python -m k5core.generate`: prompt in, mp4 (video) or png (image) out.

    python -m k5core.generate --task k5-lite-t2v-5s-sd \
        --dit kandinsky5lite_t2v_sft_5s.safetensors --vae hunyuan_video_vae_bf16.safetensors \
        --text_encoder_qwen qwen_2.5_vl_7b.safetensors --text_encoder_clip clip_l.safetensors \
        --prompt "A red fox runs through fresh snow" --output fox.mp4 [--width 768 --height 512 \
        --frames 121 --steps 50 --guidance 5 --seed 42] [--image first_frame.png] \
        [--fp8_base] [--lora_weight my.safetensors --lora_multiplier 1.0] [--attn_mode sdpa]

    python -m k5core.generate --demo --output demo.mp4        # tiny random models, seconds, no downloads

Flags follow musubi-tuner's kandinsky5_generate_video.py. Memory: the prompts are encoded first and
the text encoder is freed before the DiT is loaded; the DiT is freed before the VAE decodes (tiled).
`--demo` writes tiny random models (DiT, VAE, text encoders with tokenizers) into a temporary folder
and then runs exactly the path real files take. The settings go into the output's metadata as JSON
(mp4 `comment` tag, png `Comment` text chunk). Progress goes to stderr, the output path to stdout.
Exit status: 0 written, 1 failed, 2 bad flags, 130 interrupted.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import tempfile
from pathlib import Path

import torch

from .devices import pick_device, pick_dtype
from .pipeline import Settings, encode_image, encode_prompts, generate, resolve
from .sampling import SamplingCancelled, StepInfo
from .tasks import TASKS, Task, get_task

DEMO_PROMPT = "A red fox runs through fresh snow in a quiet forest at dawn."
METADATA_KEY = {"mp4": "comment", "png": "Comment"}
ATTN_FLAGS = {"sdpa": "sdpa", "flash_attn": "flash2", "flash3": "flash3", "sage_attn": "sage",
              "xformers": "xformers"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m k5core.generate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default=None, help="task name (default: inferred from the DiT file; "
                   "k5-tiny-t2v with --demo). Known: " + ", ".join(n for n in TASKS if "tiny" not in n))
    p.add_argument("--dit", help="DiT checkpoint: official/ComfyUI safetensors, diffusers folder or .pt")
    p.add_argument("--vae", help="HunyuanVideo VAE (video tasks) or Flux VAE (image tasks), any layout")
    p.add_argument("--text_encoder_qwen", help="Qwen2.5-VL-7B-Instruct folder or ComfyUI single file")
    p.add_argument("--text_encoder_clip", help="CLIP-L folder or clip_l.safetensors")
    p.add_argument("--comfy_root", default=None, help="ComfyUI folder whose tokenizer folders to use")
    p.add_argument("--prompt", default=None, help="what to generate (required unless --demo)")
    p.add_argument("--negative_prompt", default=None,
                   help="default: the official one (video: 'Static, 2D cartoon, ...'; images: empty)")
    p.add_argument("--output", required=True, help="output file: .mp4 (video) or .png (one frame)")
    p.add_argument("--i", "--image", dest="image", default=None, help="first frame (I2V) or source image (I2I)")
    p.add_argument("--width", type=int, default=None, help="pixels, multiple of 16 (128 for NABLA tasks)")
    p.add_argument("--height", type=int, default=None, help="pixels, multiple of 16 (128 for NABLA tasks)")
    p.add_argument("--frames", type=int, default=None, help="pixel frames, 4k+1 (default: the task's)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None, help="CFG scale; 1 runs one branch")
    p.add_argument("--scheduler_scale", "--shift", dest="shift", type=float, default=None,
                   help="timestep shift (default: the task's)")
    p.add_argument("--seed", type=int, default=None, help="default: random (written to the metadata)")
    p.add_argument("--magcache", action="store_true", help="skip steps with the official MagCache ratios")
    p.add_argument("--fps", type=float, default=None, help="video frame rate (default: the task's, 24)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default=None, help="DiT compute dtype: bfloat16 | float16 | float32 "
                   "(default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--vae_dtype", default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--text_encoder_device", default=None, help="where Qwen/CLIP run (default: --device)")
    p.add_argument("--qwen_quantization", choices=("nf4", "int8"), default=None,
                   help="load Qwen through bitsandbytes (fits smaller GPUs)")
    p.add_argument("--attn_mode", default=None, help="sdpa | flash2 | flash3 | sage | xformers")
    for flag in ATTN_FLAGS:
        p.add_argument(f"--{flag}", action="store_true", help=f"same as --attn_mode {ATTN_FLAGS[flag]}")
    p.add_argument("--fp8_base", action="store_true", help="store the DiT's block weights in fp8 (per tensor)")
    p.add_argument("--fp8_scaled", action="store_true", help="fp8 with per-channel scales (implies --fp8_base)")
    p.add_argument("--fp8_fast", action="store_true", help="fp8 matmuls (torch._scaled_mm, sm89+; implies --fp8_base)")
    p.add_argument("--blocks_to_swap", type=int, default=0, help="DiT blocks kept in CPU memory")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the DiT blocks (faster sampling on GPUs after a one-time compile)")
    p.add_argument("--lora_weight", nargs="*", default=None, help="LoRA file(s)")
    p.add_argument("--lora_multiplier", type=float, nargs="*", default=None, help="one per --lora_weight")
    p.add_argument("--no_batch_cfg", action="store_true", help="run the two guidance branches one by one")
    p.add_argument("--demo", action="store_true", help="tiny random models written to a temp folder")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args, parser)
        with tempfile.TemporaryDirectory(prefix="k5-demo-") if args.demo else contextlib.nullcontext() as tmp:
            if args.demo:
                add_demo_models(args, Path(tmp))
            out = run(args)
    except SamplingCancelled as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


def check_args(args, parser) -> None:
    """Exit 2 (argparse) on flags that cannot work together."""
    if args.demo:
        args.task = args.task or "k5-tiny-t2v"
        if not args.task.startswith("k5-tiny-"):
            parser.error(f"--demo runs tiny random models; use a k5-tiny-* task, not {args.task}")
        if args.prompt is None:
            args.prompt = DEMO_PROMPT
    else:
        missing = [f"--{n}" for n in ("dit", "vae", "text_encoder_qwen", "text_encoder_clip", "prompt")
                   if getattr(args, n) is None]
        if missing:
            parser.error(f"missing {', '.join(missing)} (or --demo for a check with tiny models)")
    if args.task is not None:
        try:
            get_task(args.task)
        except KeyError as e:
            parser.error(e.args[0])
    suffix = Path(args.output).suffix.lower()
    if suffix not in (".mp4", ".png"):
        parser.error(f"--output must end in .mp4 (video) or .png (image), got {args.output!r}")
    chosen = [ATTN_FLAGS[f] for f in ATTN_FLAGS if getattr(args, f)]
    if len(chosen) + (args.attn_mode is not None) > 1:
        parser.error("choose one attention backend (--attn_mode or one of --sdpa/--flash_attn/...)")
    args.attn_mode = args.attn_mode or (chosen[0] if chosen else "sdpa")
    if args.lora_multiplier and len(args.lora_multiplier) != len(args.lora_weight or []):
        parser.error(f"{len(args.lora_multiplier)} --lora_multiplier values for "
                     f"{len(args.lora_weight or [])} --lora_weight files")
    if args.blocks_to_swap < 0:
        parser.error("--blocks_to_swap must be >= 0")


def add_demo_models(args, folder: Path) -> None:
    """Write tiny random models for args.task into `folder` and point the model flags at them."""
    from .tiny.dit import write_tiny_dit
    from .tiny.text import make_tiny_text_encoders
    from .tiny.vae import make_tiny_flux_vae, make_tiny_hunyuan_vae

    task = get_task(args.task)
    args.dit = str(write_tiny_dit(folder / "diffusion_models", task=task.name))
    make_vae = make_tiny_hunyuan_vae if task.vae == "hunyuan" else make_tiny_flux_vae
    args.vae = str(make_vae(folder / "vae")["comfy"])
    text = make_tiny_text_encoders(folder)
    args.text_encoder_qwen, args.text_encoder_clip = str(text["qwen_file"]), str(text["clip_file"])


def run(args) -> Path:
    """Encode, sample, decode and write; returns the output path."""
    task = get_task(args.task) if args.task else task_of_checkpoint(args.dit)
    image = read_input_image(args.image, task)
    settings = resolve(Settings(task=task.name, prompt=args.prompt, negative_prompt=args.negative_prompt,
                                width=args.width, height=args.height, frames=args.frames, steps=args.steps,
                                guidance=args.guidance, shift=args.shift, seed=args.seed,
                                magcache=args.magcache),
                       image_size=tuple(image.shape[:2]) if image is not None else None)
    output = check_output(Path(args.output), settings)
    device = pick_device(args.device)
    log(f"task {task.name}: {settings.width}x{settings.height}, {settings.frames} frames, "
        f"{settings.steps} steps, guidance {settings.guidance}, seed {settings.seed}")

    embeds, negative = encode_text(args, task, settings, image)
    vae = load_vae_for(args, task, device)                 # in CPU memory until it is needed
    image_latent = None
    if image is not None:
        image_latent = encode_image(move(vae, device), image, settings)
        move(vae, "cpu")
    dit = load_dit_for(args, task, device)

    def before_decode():
        free_dit(dit)
        move(vae, device)

    bar = ProgressBars()
    try:
        result = generate(dit, vae, settings, embeds, negative, image_latent=image_latent, progress=bar,
                          before_decode=before_decode, batch_cfg=not args.no_batch_cfg)
    finally:
        bar.close()
    write_output(output, result.frames[0], settings, args, task)
    return output


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def task_of_checkpoint(path) -> Task:
    """The task a DiT file belongs to, from its tensor shapes and name (no weights read)."""
    if path is None:
        raise ValueError("--task or --dit is needed to know the task")
    from .loading import inspect_dit
    path = Path(path)
    task = inspect_dit(path)
    log(f"task inferred from {path.name}: {task.name} (pass --task to choose another)")
    return task


def read_input_image(path, task: Task):
    """The --image as uint8 (H, W, 3), or None; I2V needs one, T2V/T2I take none."""
    if path is None:
        if task.mode == "i2v":
            raise ValueError(f"task {task.name} is image-to-video: pass the first frame with --image")
        return None
    if not (task.dit.visual_embed_dim > task.dit.in_visual_dim):
        raise ValueError(f"task {task.name} takes no input image (its DiT has no image condition)")
    from .media import read_image
    return read_image(path)


def check_output(output: Path, settings: Settings) -> Path:
    """A .png holds one frame, an .mp4 a video."""
    if output.suffix.lower() == ".png" and settings.frames != 1:
        raise ValueError(f"--output {output}: a .png holds one image but {settings.frames} frames were "
                         f"asked for; use .mp4 or --frames 1")
    if output.suffix.lower() == ".mp4" and not settings.task_config.is_video:
        raise ValueError(f"--output {output}: task {settings.task} makes images; use a .png name")
    return output


def encode_text(args, task: Task, settings: Settings, image=None):
    """Load the text encoders, encode prompt and negative prompt (I2I: with the source image), free them."""
    from .text import TextEncoder
    device = pick_device(args.text_encoder_device or args.device)
    log(f"loading text encoders on {device}")
    encoder = TextEncoder.load(args.text_encoder_qwen, args.text_encoder_clip, device=device,
                               quantization=args.qwen_quantization, comfy_root=args.comfy_root,
                               text_dim=task.dit.in_text_dim, pooled_dim=task.dit.in_text_dim2)
    try:
        embeds, negative = encode_prompts(encoder, settings, image)
    finally:
        encoder.unload()
        del encoder
        release_memory()
    return embeds.to("cpu"), None if negative is None else negative.to("cpu")


def load_vae_for(args, task: Task, device):
    """The VAE in CPU memory, in the dtype for `device`, checked against the task."""
    from .vae import load_vae
    vae = load_vae(args.vae, device="cpu", dtype=pick_dtype(args.vae_dtype, device))
    if vae.kind != task.vae:
        raise ValueError(f"--vae {args.vae}: task {task.name} needs the {task.vae} VAE, this is a {vae.kind} VAE")
    return vae


def load_dit_for(args, task: Task, device):
    """The DiT with fp8 storage, block swap and LoRAs as the flags ask."""
    from .loading import load_dit
    fp8 = fp8_mode(args)
    swap = args.blocks_to_swap > 0
    log(f"loading DiT {args.dit}" + (f" (fp8 {fp8})" if fp8 else ""))
    dit = load_dit(args.dit, task=task, dtype=pick_dtype(args.dtype, device),
                   device="cpu" if swap else device, fp8=fp8, attention=args.attn_mode)
    if args.fp8_fast:
        from .fp8 import use_scaled_mm
        use_scaled_mm(dit)
    if args.lora_weight:
        from .lora import apply_loras
        multipliers = args.lora_multiplier or [1.0] * len(args.lora_weight)
        apply_loras(dit, list(zip(args.lora_weight, multipliers)))
        log(f"applied {len(args.lora_weight)} LoRA(s)")
    if swap:
        from .offload import enable_block_swap
        enable_block_swap(dit, args.blocks_to_swap, device)
    if args.compile:
        dit.compile_blocks()
    return dit.eval()


def move(vae, device):
    """The VAE on `device` (moved only when elsewhere)."""
    if vae.device != torch.device(device):
        vae.to(device)
    return vae


def fp8_mode(args) -> str | None:
    """load_dit's fp8 mode for the flags: per-channel scales with --fp8_scaled, else per tensor."""
    if args.fp8_scaled:
        return "e4m3fn_scaled"
    return "e4m3fn" if args.fp8_base or args.fp8_fast else None


def free_dit(dit) -> None:
    """Drop the DiT's weights (meta tensors) so the VAE decode has the memory."""
    dit.to("meta")
    release_memory()


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class ProgressBars:
    """tqdm bars on stderr: one for the sampling steps, one for the VAE tiles."""

    def __init__(self):
        self.bar, self.phase = None, None

    def __call__(self, step: int, total: int, info) -> None:
        from tqdm import tqdm
        phase = "sampling" if isinstance(info, StepInfo) else "decoding"
        if phase != self.phase:
            self.close()
            self.bar, self.phase = tqdm(total=total, desc=phase, file=sys.stderr, dynamic_ncols=True), phase
        self.bar.set_postfix_str(str(info) if phase == "sampling" else "", refresh=False)
        self.bar.update(step - self.bar.n)
        if step >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.phase = None, None


def write_output(output: Path, frames: torch.Tensor, settings: Settings, args, task: Task) -> Path:
    """frames (F, H, W, 3) in [0, 1] -> mp4 or png with the settings as JSON metadata."""
    from .media import write_image, write_video
    files = {"dit": Path(args.dit).name, "image": args.image and Path(args.image).name,
             "lora_weight": [Path(p).name for p in args.lora_weight or []],
             "lora_multiplier": args.lora_multiplier, "fp8": fp8_mode(args),
             "blocks_to_swap": args.blocks_to_swap, "demo": args.demo}
    meta = settings.to_metadata(**files)
    if output.suffix.lower() == ".png":
        return write_image(frames[0], output, metadata={METADATA_KEY["png"]: meta})
    return write_video(frames, output, fps=args.fps or task.fps, metadata={METADATA_KEY["mp4"]: meta})


if __name__ == "__main__":
    sys.exit(main())
