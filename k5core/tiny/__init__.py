"""Tiny random Kandinsky 5 models written to real files in real layouts.

Used by the tests and by `python -m k5core.generate --demo` so an install can be checked in
seconds without downloading anything. All tiny models agree on these widths:
TINY_TEXT_DIM (Qwen hidden size), TINY_POOLED_DIM (CLIP hidden size), 16 latent channels.
"""
TINY_TEXT_DIM = 32
TINY_POOLED_DIM = 16
LATENT_CHANNELS = 16
