"""Headless Kandinsky 5 LoRA trainer: `python -m trainer`."""
