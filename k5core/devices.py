"""Device and dtype defaults shared by the CLIs and the nodes: CUDA when present; float32 on the
CPU (bf16 matmuls are slow there) and bfloat16 on GPUs."""
from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def pick_device(name: str | None = None) -> torch.device:
    """The named device, else cuda when available, else cpu."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def pick_dtype(name: str | None, device) -> torch.dtype:
    """A dtype by name (float32/fp32, bfloat16/bf16, float16/fp16); None or "auto" picks the device's
    default. Unknown names raise ValueError listing the choices."""
    if name is None or name == "auto":
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise ValueError(f"dtype: expected auto or one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]
