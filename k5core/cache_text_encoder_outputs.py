"""`python -m k5core.cache_text_encoder_outputs`: encode a dataset's captions into text caches.

    python -m k5core.cache_text_encoder_outputs --dataset_config dataset.toml \
        --text_encoder_qwen qwen_2.5_vl_7b.safetensors --text_encoder_clip clip_l.safetensors \
        [--task k5-lite-t2v-5s-sd] [--batch_size 8] [--device cuda] [--skip_existing] [--quantized_qwen]

Flags follow musubi-tuner's kandinsky5_cache_text_encoder_outputs. The task picks the prompt
template (video, image2video, image, image_edit), Qwen's max length and the expected widths.
A progress line goes to stderr, the counts to stdout; exit status 1 only when no caption has a
usable cache, 2 for a bad config or flags.
"""
from __future__ import annotations

import argparse
import sys

from k5core.cache import cache_text_encoder_outputs
from k5core.cache_latents import ProgressLine, add_common_args, common_setup, finish
from k5core.devices import pick_dtype


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m k5core.cache_text_encoder_outputs",
                                     description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--text_encoder_qwen", required=True,
                        help="Qwen2.5-VL-7B-Instruct folder or ComfyUI single file")
    parser.add_argument("--text_encoder_clip", required=True, help="CLIP-L folder or clip_l.safetensors")
    parser.add_argument("--text_encoder_dtype", default=None, help="Qwen dtype: float32 | bfloat16 | float16")
    parser.add_argument("--quantized_qwen", action="store_true", help="load Qwen in 4 bit (nf4, bitsandbytes)")
    parser.add_argument("--comfy_root", default=None, help="ComfyUI folder whose tokenizer folders to use")
    args = parser.parse_args(argv)

    task, config, device = common_setup(parser, args)

    from k5core.text import TextEncoder
    try:
        encoder = TextEncoder.load(args.text_encoder_qwen, args.text_encoder_clip, device=device,
                                   dtype=pick_dtype(args.text_encoder_dtype, device),
                                   quantization="nf4" if args.quantized_qwen else None, comfy_root=args.comfy_root,
                                   text_dim=task.dit.in_text_dim, pooled_dim=task.dit.in_text_dim2)
    except (OSError, ValueError, ImportError) as e:
        parser.error(f"cannot load the text encoders: {e}")
    line = ProgressLine("cache text")
    try:
        report = cache_text_encoder_outputs(config, encoder, content=task.content, skip_existing=args.skip_existing,
                                            batch_size=args.batch_size or 8, progress=line, task=task)
    finally:
        line.close()
    return finish(report, "text encoder caches")


if __name__ == "__main__":
    sys.exit(main())
