"""Headless Kandinsky 5 LoRA trainer: `python -m trainer` (or `accelerate launch -m trainer`).

    config     the flags (musubi-tuner's names) and the TOML `--config`, checked
    events     the JSON-lines event stream (stdout or --events FILE) and the readable stderr lines
    timesteps  flow-matching times, noisy latents, velocity target, loss weighting
    optim      optimizers and learning-rate schedules
    data       the seeded, resumable batch order over the cached items
    state      --save_state / --resume folders
    sample     sample videos during training from a prompt file
    loop       the training loop (Trainer), stopping, saving
    tiny       a complete tiny setup on disk for tests, benchmarks and smoke runs
"""
