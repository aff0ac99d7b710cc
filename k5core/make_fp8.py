"""Write a pre-quantized fp8 copy of a Kandinsky 5 DiT checkpoint.

    python -m k5core.make_fp8 --input X.safetensors --output Y.safetensors [--fp8 e4m3fn_scaled] [--dtype bf16]

The block Linear weights become fp8 with `<layer>.scale_weight` float32 scales and the file carries
ComfyUI's `scaled_fp8` marker, keeping the input's key prefix; the other tensors are cast to --dtype.
`load_dit` reads the result as it is (no re-quantization). With `--fp8 e4m3fn` (one scale per tensor)
the file is exactly ComfyUI's scaled-fp8 layout and also loads in ComfyUI's own Kandinsky 5 loader;
the default per-channel scales ((out, 1), musubi-tuner's layout) are more exact.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .files import save_safetensors
from .fp8 import FP8, MARKER, MODES, Fp8Plan
from .loading import CheckpointError, checkpoint_files, detect_prefix, dit_params_from_shapes, iter_tensors, \
    read_shapes

DEFAULT_MODE = "e4m3fn_scaled"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "keep": None}


def make_fp8(input_path, output_path, fp8: str = DEFAULT_MODE, dtype=torch.bfloat16) -> Path:
    """Quantize a DiT checkpoint (file or diffusers folder) into one pre-quantized safetensors file."""
    source, output = Path(input_path), Path(output_path)
    files = checkpoint_files(source)
    if output.resolve() in {f.resolve() for f in files}:
        raise ValueError(f"{output}: the output would overwrite the input; choose another path")
    shapes = read_shapes(files)
    prefix = detect_prefix(shapes.keys(), str(source))
    dit_params_from_shapes(shapes, prefix, str(source))           # a Kandinsky 5 DiT, or a clear error
    try:
        plan = Fp8Plan({k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}, fp8, str(source))
        if plan.prequantized:
            raise ValueError(f"{source}: already holds fp8 weights; load it with load_dit as it is")
        tensors = ((k[len(prefix):], t) for k, t in iter_tensors(files) if k.startswith(prefix))
        out = {prefix + k: t for k, t in plan.convert(tensors, dtype, "cpu")}
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    out[prefix + MARKER] = torch.empty(0, dtype=FP8)
    return save_safetensors(out, output, {"format": "pt", "k5core.fp8": fp8, "source": source.name})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m k5core.make_fp8", description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="DiT checkpoint: .safetensors, .pt or diffusers folder")
    parser.add_argument("--output", required=True, help="the fp8 .safetensors file to write")
    parser.add_argument("--fp8", default=DEFAULT_MODE, choices=sorted(MODES),
                        help="e4m3fn_scaled: a scale per output channel (default); e4m3fn: one per tensor "
                             "(ComfyUI's layout)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES),
                        help="dtype of the tensors kept in high precision (keep: as in the input)")
    args = parser.parse_args(argv)
    try:
        path = make_fp8(args.input, args.output, args.fp8, DTYPES[args.dtype])
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
