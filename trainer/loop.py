"""The training loop: LoRA on a frozen Kandinsky 5 DiT, flow matching on cached latents and text.

One optimizer step = `gradient_accumulation_steps` micro-batches; each micro-batch runs the whole
batch through the DiT in one forward (the engine is batched). Under `accelerate launch` every process
trains on its own share of the batches; the LoRA gradients are averaged across processes with one
all-reduce per step (the DiT itself is never wrapped: only the small LoRA needs syncing), and only the
main process writes files and events.

Stopping: SIGTERM, SIGINT or the stop file end the run at the next step boundary (every process
agrees on that step), after the LoRA and the state are saved; the run then reports done(stopped)
and exits 0. Every file is written atomically, so a crash leaves the last good files intact.
"""
from __future__ import annotations

import datetime
import math
import os
import signal
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from k5core import sampling
from k5core.cache import list_cached_items
from k5core.data import load_dataset_config
from k5core.loading import load_dit
from k5core.lora import LoRANetwork, load_lora_tensors, training_metadata
from k5core.tasks import Task, get_task

from . import state as st
from .config import TrainConfig, parse_key_values, resolve_seed
from .data import batch_stream, batches_per_epoch, to_device
from .events import EventWriter
from .optim import build_optimizer, build_scheduler
from .timesteps import flow_matching_loss, loss_weights, noisy_latents, sample_t, velocity_target

LOSS_WINDOW = (10, 100)   # avg_loss: mean of the last `steps per epoch` losses, kept within 10..100
SPEED_WINDOW = 20         # it/s: over the last 20 steps' own time (saves and samples excluded)
LORA_NETWORK_ARGS = ("include_patterns", "exclude_patterns", "rank_dropout", "module_dropout")


class TrainingError(RuntimeError):
    """Input the run cannot use (dataset, settings, state), with a message for the user."""


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class Position:
    """Where the run is: optimizer steps done, the next batch (epoch from 1, index from 0), recent losses."""
    step: int = 0
    epoch: int = 1
    batch: int = 0
    losses: list = field(default_factory=list)


@dataclass
class Result:
    lora_path: Path | None
    step: int
    stopped: bool


# ------------------------------------------------------------------------------------- stopping
class StopFlag:
    """Set by SIGTERM/SIGINT or by the stop file; a second SIGINT interrupts at once."""

    def __init__(self, stop_file: Path | None):
        self.stop_file, self.reason, self._old = stop_file, None, {}

    def install(self) -> "StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:          # not the main thread (tests calling train() from a thread)
                pass
        return self

    def uninstall(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.reason is not None:
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name

    def requested(self) -> bool:
        if self.reason is None and self.stop_file is not None and self.stop_file.exists():
            self.reason = f"stop file {self.stop_file}"
        return self.reason is not None


# ------------------------------------------------------------------------------------- helpers
def peak_memory(device: torch.device) -> int:
    """Peak bytes: CUDA allocator peak on a GPU, else the process' peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource
    except ImportError:                       # Windows: the peak working set
        import psutil
        return int(getattr(psutil.Process().memory_info(), "peak_wset", 0))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)   # macOS counts bytes, Linux KiB


def dtypes(mixed_precision: str) -> tuple[torch.dtype, torch.dtype]:
    """(base weight dtype, autocast dtype) of a mixed-precision mode."""
    return {"bf16": (torch.bfloat16, torch.bfloat16), "fp16": (torch.float16, torch.float16),
            "no": (torch.float32, torch.float32)}[mixed_precision]


def lora_file(cfg: TrainConfig, step: int | None = None, epoch: int | None = None) -> Path:
    """musubi-tuner's names: <name>-step00000100, <name>-000004 (epoch), <name> (final)."""
    stem = cfg.output_name + (f"-step{step:08d}" if step is not None else f"-{epoch:06d}" if epoch is not None else "")
    return Path(cfg.output_dir) / f"{stem}.safetensors"


def every(n: int | None, value: int) -> bool:
    return bool(n) and value > 0 and value % n == 0


# ------------------------------------------------------------------------------------- trainer
class Trainer:
    """One training run, built from a checked TrainConfig; `run()` trains and returns a Result."""

    def __init__(self, cfg: TrainConfig, events: EventWriter, accelerator=None):
        self.cfg, self.events = cfg, events
        self.acc = accelerator if accelerator is not None else make_accelerator(cfg)
        self.device = self.acc.device
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.main = self.acc.is_main_process
        self.task: Task = get_task(cfg.task)
        self.mixed_precision = self.acc.mixed_precision or "no"
        if self.mixed_precision == "fp16" and self.device.type != "cuda":
            raise TrainingError("--mixed_precision fp16 needs a CUDA GPU; use bf16 or no on the CPU")
        self.weight_dtype, self.compute_dtype = dtypes(self.mixed_precision)
        self.stop = StopFlag(cfg.stop_path)
        self.pos = Position()

    # --------------------------------------------------------------- setup
    def log(self, message: str, level: str = "info") -> None:
        if self.main:
            self.events.emit("log", message=message, **({"level": level} if level != "info" else {}))

    def setup(self) -> None:
        self.seed = self._shared_seed()
        self.setup_data()
        self.setup_model(self.total)
        self.resumed_from = self._resume() if self.cfg.resume else None
        self.sampler = self._make_sampler()

    def setup_data(self) -> None:
        """The cached items (checked against the task) and the run's length in steps and epochs."""
        cfg = self.cfg
        self.items = list_cached_items(load_dataset_config(cfg.dataset_config), task=self.task)
        self._check_items()
        self.per_epoch = batches_per_epoch(self.items, self.world)
        self.steps_per_epoch = math.ceil(self.per_epoch / cfg.gradient_accumulation_steps)
        self.total = cfg.max_train_epochs * self.steps_per_epoch if cfg.max_train_epochs else cfg.max_train_steps
        self.last_epoch = math.ceil(self.total / self.steps_per_epoch)
        self.log(f"dataset: {len(self.items)} cached items, {self.per_epoch} batches per epoch per process, "
                 f"{self.steps_per_epoch} steps per epoch, {self.total} steps ({self.last_epoch} epochs)")

    def setup_model(self, total_steps: int) -> None:
        """DiT, LoRA, memory savers, optimizer, schedule over `total_steps`, and the random generators."""
        cfg = self.cfg
        self.seed = getattr(self, "seed", None) or resolve_seed(cfg)
        self.model = self._load_model()
        self.network = self._make_network()
        self.params = self.network.trainable_parameters()
        self._memory_setup()
        self.optimizer = build_optimizer(self.params, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.mixed_precision == "fp16")
        self.noise_gen = torch.Generator(self.device).manual_seed(self.seed + 7919 * self.rank)
        self.t_gen = torch.Generator().manual_seed(self.seed + 7919 * self.rank + 1)
        torch.manual_seed(self.seed + 7919 * self.rank + 2)      # LoRA dropout
        self.generators = {"noise": self.noise_gen, "timesteps": self.t_gen}

    def _shared_seed(self) -> int:
        """The run's seed, chosen on the main process and the same on every process."""
        seed = resolve_seed(self.cfg) if self.main else 0
        if self.world > 1:
            from accelerate.utils import broadcast_object_list
            seed = broadcast_object_list([seed])[0]
            self.cfg.seed = seed
        return seed

    def _check_items(self) -> None:
        if self.task.mode == "i2v":
            single = [i for i in self.items if i.frames < 5]
            if single:
                raise TrainingError(
                    f"task {self.task.name} trains image-to-video: the first latent frame is the condition, "
                    f"so items need 5 or more frames; {len(single)} item(s) have fewer, e.g. {single[0].source} "
                    f"(remove image datasets from {self.cfg.dataset_config} or set target_frames >= 5)")

    def _load_model(self):
        cfg = self.cfg
        fp8 = ("e4m3fn_scaled" if cfg.fp8_scaled else "e4m3fn") if cfg.fp8_base else None
        swap = cfg.blocks_to_swap > 0
        self.log(f"loading DiT {cfg.dit} ({self.task.name}, {self.weight_dtype}, fp8={fp8 or 'no'}, "
                 f"blocks_to_swap={cfg.blocks_to_swap})")
        model = load_dit(cfg.dit, task=self.task, dtype=self.weight_dtype, device="cpu" if swap else self.device,
                         fp8=fp8, attention=cfg.attention)
        model.requires_grad_(False)
        return model.train()

    def _memory_setup(self) -> None:
        """Block swap and gradient checkpointing (activations optionally in CPU memory), k5core.offload.
        Runs after the LoRA is attached: its parameters stay on the GPU, the frozen weights swap."""
        from k5core import offload
        cfg, model = self.cfg, self.model
        if cfg.blocks_to_swap:
            n = model.params.num_visual_blocks
            if cfg.blocks_to_swap >= n:
                raise TrainingError(f"--blocks_to_swap {cfg.blocks_to_swap}: the DiT has {n} visual blocks; "
                                    f"swap at most {n - 1}")
            if self.device.type != "cuda":
                self.log(f"--blocks_to_swap {cfg.blocks_to_swap} on {self.device}: the weights are in CPU memory "
                         f"already, so nothing is swapped", level="warning")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")       # the CPU no-op warning, reported above
                offload.enable_block_swap(model, cfg.blocks_to_swap, self.device)
        if cfg.gradient_checkpointing:
            offload.enable_gradient_checkpointing(model, cpu_offload=cfg.gradient_checkpointing_cpu_offload)
        elif cfg.gradient_checkpointing_cpu_offload:
            self.log("--gradient_checkpointing_cpu_offload has no effect without --gradient_checkpointing",
                     level="warning")

    def _make_network(self) -> LoRANetwork:
        cfg = self.cfg
        args = parse_key_values(cfg.network_args, "--network_args")
        unknown = sorted(set(args) - set(LORA_NETWORK_ARGS))
        if unknown:
            raise TrainingError(f"--network_args: unknown {', '.join(unknown)} (known: {', '.join(LORA_NETWORK_ARGS)})")
        patterns = {k.removesuffix("_patterns"): _as_list(args[k]) for k in ("include_patterns", "exclude_patterns")
                    if k in args}
        network = LoRANetwork(self.model, rank=cfg.network_dim, alpha=cfg.network_alpha,
                              dropout=cfg.network_dropout or None, rank_dropout=args.get("rank_dropout"),
                              module_dropout=args.get("module_dropout"), dtype=torch.float32, **patterns)
        network.apply_to()
        if cfg.network_weights:
            tensors, _ = load_lora_tensors(cfg.network_weights)
            network.load_state_dict(tensors)
            self.log(f"started from LoRA weights {cfg.network_weights}")
        self.log(f"LoRA rank {cfg.network_dim}, alpha {cfg.network_alpha}: {len(network.paths)} layers, "
                 f"{sum(p.numel() for p in network.parameters()):,} parameters")
        return network

    def _resume(self) -> Path:
        cfg = self.cfg
        folder = st.latest_state(cfg.output_dir, cfg.output_name) if cfg.resume == "latest" else Path(cfg.resume)
        if folder is None:
            raise st.StateError(f"--resume latest: no state of {cfg.output_name!r} in {cfg.output_dir} "
                                f"(states are saved with --save_state)")
        saved = st.load_state(folder)
        p = saved["progress"]
        for key, now in (("task", self.task.name), ("network_dim", cfg.network_dim), ("world", self.world),
                         ("gradient_accumulation_steps", cfg.gradient_accumulation_steps),
                         ("items", len(self.items))):
            if p.get(key) != now:
                raise st.StateError(f"{folder}: saved with {key} = {p.get(key)!r}, this run has {now!r}; "
                                    f"resume with the same settings")
        self.network.load_state_dict(saved["network"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        st.restore_rng(saved["rng"][self.rank], self.generators)
        self.seed = p["seed"]
        self.cfg.seed = p["seed"]
        self.pos = Position(p["step"], p["epoch"], p["batch"], list(p["losses"]))
        self.log(f"resumed from {folder} at step {self.pos.step} (epoch {self.pos.epoch}, batch {self.pos.batch})")
        return folder

    def _make_sampler(self):
        cfg = self.cfg
        if not (cfg.sample_every_n_steps or cfg.sample_every_n_epochs or cfg.sample_at_first) or not self.main:
            return None
        from .sample import Sampler
        return Sampler(cfg, self.task, self.device, self.compute_dtype, self.log)

    # --------------------------------------------------------------- one step
    def micro_step(self, batch: dict, scale: float) -> float:
        """Forward and backward of one micro-batch; returns its unscaled loss."""
        task = self.task
        batch = to_device(batch, self.device, torch.float32)
        latent = batch["latent"]                                                 # (B, 16, T, h, w)
        b = latent.shape[0]
        noise = torch.randn(latent.shape, generator=self.noise_gen, device=self.device)
        t = sample_t(b, self.cfg.timestep_sampling, self.t_gen, shift=self.cfg.discrete_flow_shift,
                     sigmoid_scale=self.cfg.sigmoid_scale, logit_mean=self.cfg.logit_mean,
                     logit_std=self.cfg.logit_std, min_timestep=self.cfg.min_timestep,
                     max_timestep=self.cfg.max_timestep).to(self.device)
        x = noisy_latents(latent, noise, t)
        target = velocity_target(latent, noise)
        x, first = model_input(task, x, batch.get("image_latent") if task.mode == "i2v" else None)
        with torch.autocast(self.device.type, self.compute_dtype, enabled=self.mixed_precision != "no"):
            pred = self.model(x.to(self.weight_dtype), t * 1000, batch["text_embed"].to(self.weight_dtype),
                              batch["pooled"].to(self.weight_dtype), text_mask=batch["text_mask"],
                              scale_factor=task.scale_factor)
        # the I2V condition frames are given, not generated: no loss on them
        loss = flow_matching_loss(pred[:, :, first:], target[:, :, first:],
                                  loss_weights(t, self.cfg.weighting_scheme))
        self.scaler.scale(loss * scale).backward()
        return loss.item()

    def optimizer_step(self) -> None:
        if self.world > 1:
            for p in self.params:          # a LoRA skipped by module dropout here may have run elsewhere
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            all_reduce_mean([p.grad for p in self.params])
        self.scaler.unscale_(self.optimizer)
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # --------------------------------------------------------------- saving
    def save(self, path: Path, stopped: bool = False) -> Path | None:
        """Save the LoRA (main process) and, with --save_state or on a stop, the training state."""
        want_state = self.cfg.save_state or stopped
        rng = self._gather_rng() if want_state else None
        folder = None
        if self.main:
            meta = training_metadata(task=self.task.name, steps=self.pos.step, epoch=self.pos.epoch,
                                     datasets=[{"dataset_config": self.cfg.dataset_config, "items": len(self.items)}],
                                     learning_rate=self.cfg.learning_rate, optimizer=self.cfg.optimizer_type,
                                     lr_scheduler=self.cfg.lr_scheduler, seed=self.seed,
                                     timestep_sampling=self.cfg.timestep_sampling,
                                     discrete_flow_shift=self.cfg.discrete_flow_shift,
                                     mixed_precision=self.mixed_precision, max_train_steps=self.total,
                                     output_name=self.cfg.output_name)
            self.network.save(path, metadata=meta)
            if want_state:
                folder = st.save_state(st.state_dir(self.cfg.output_dir, self.cfg.output_name, self.pos.step),
                                       network=self.network.state_dict(), optimizer=self.optimizer,
                                       scheduler=self.scheduler, rng=rng, progress=self._progress())
            self.events.emit("checkpoint", path=path, step=self.pos.step, **({"state": folder} if folder else {}))
        self.acc.wait_for_everyone()
        return folder

    def _gather_rng(self) -> list[dict]:
        mine = st.capture_rng(self.generators)
        if self.world == 1:
            return [mine]
        from accelerate.utils import gather_object
        return gather_object([mine])

    def _progress(self) -> dict:
        return {"step": self.pos.step, "epoch": self.pos.epoch, "batch": self.pos.batch, "losses": self.pos.losses,
                "seed": self.seed, "task": self.task.name, "network_dim": self.cfg.network_dim,
                "world": self.world, "gradient_accumulation_steps": self.cfg.gradient_accumulation_steps,
                "items": len(self.items), "total": self.total, "output_name": self.cfg.output_name}

    # --------------------------------------------------------------- sampling
    def sample(self) -> None:
        if self.sampler is not None:
            try:
                paths, prompts = self.sampler.run(self.model, self.pos.step, should_stop=self.stop.requested)
                self.events.emit("sample", step=self.pos.step, paths=paths, prompts=prompts)
            except sampling.SamplingCancelled:
                self.log(f"sampling at step {self.pos.step} cancelled by the stop request")
        self.acc.wait_for_everyone()

    # --------------------------------------------------------------- the run
    def run(self) -> Result:
        self.stop.install()
        try:
            self.setup()
            return self._train()
        finally:
            self.stop.uninstall()

    def _train(self) -> Result:
        cfg, pos = self.cfg, self.pos
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.main:
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)   # where the Train node drops the stop file
        if self.main and cfg.stop_path.exists():
            cfg.stop_path.unlink()
            self.log(f"removed the stop file {cfg.stop_path} left from an earlier stop")
        self.acc.wait_for_everyone()
        if self.main:
            self.events.emit("start", total=self.total, run=cfg.output_name, step=pos.step,
                             epochs=self.last_epoch, config=cfg.summary())
        if cfg.sample_at_first and pos.step == 0:
            self.sample()
        window = deque(pos.losses, maxlen=min(max(self.steps_per_epoch, LOSS_WINDOW[0]), LOSS_WINDOW[1]))
        times: deque = deque(maxlen=SPEED_WINDOW)
        stream = batch_stream(self.items, self.seed, (pos.epoch, pos.batch), self.last_epoch, self.world,
                              self.rank, cfg.max_data_loader_n_workers)
        stopped = False
        while pos.step < self.total:
            began = time.perf_counter()
            micro = min(cfg.gradient_accumulation_steps, self.per_epoch - pos.batch)
            loss = 0.0
            for _ in range(micro):
                _, batch = next(stream)
                loss += self.micro_step(batch, 1.0 / micro) / micro
            if not math.isfinite(loss):            # checked before the step: the LoRA stays finite
                raise Diverged(f"loss is {loss} at step {pos.step + 1}: training diverged (lower the learning "
                               f"rate, or use bf16 instead of fp16); the last saved files are intact")
            lr = self.optimizer.param_groups[0]["lr"]           # the rate this step used
            self.optimizer_step()
            loss, stop_now = self._agree(loss, self.stop.requested())
            epoch = pos.epoch
            pos.step += 1
            pos.batch += micro
            epoch_done = pos.batch == self.per_epoch
            if epoch_done:
                pos.epoch, pos.batch = pos.epoch + 1, 0
            window.append(loss)
            pos.losses = list(window)
            times.append(time.perf_counter() - began)
            step_time = sum(times) / len(times)
            if self.main:
                self.events.emit("step", step=pos.step, total=self.total, epoch=epoch, loss=loss,
                                 avg_loss=sum(window) / len(window), lr=lr, it_s=1.0 / step_time,
                                 eta_s=(self.total - pos.step) * step_time, peak_mem=peak_memory(self.device))
                if epoch_done:
                    self.events.emit("epoch", epoch=epoch, step=pos.step, avg_loss=sum(window) / len(window))
            if stop_now and pos.step < self.total:
                stopped = True
                break
            final = pos.step == self.total
            done_epoch = epoch if epoch_done else None
            if not final:
                if every(cfg.save_every_n_steps, pos.step):
                    self.save(lora_file(cfg, step=pos.step))
                elif done_epoch and every(cfg.save_every_n_epochs, done_epoch):
                    self.save(lora_file(cfg, epoch=done_epoch))
            if every(cfg.sample_every_n_steps, pos.step) or (done_epoch and every(cfg.sample_every_n_epochs, done_epoch)):
                self.sample()
        return self._finish(stopped)

    def _finish(self, stopped: bool) -> Result:
        cfg, pos = self.cfg, self.pos
        path = lora_file(cfg, step=pos.step) if stopped else cfg.lora_path
        self.save(path, stopped=stopped)
        if self.main:
            if stopped:
                self.log(f"stopped at step {pos.step} ({self.stop.reason}); resume with --resume latest")
                if cfg.stop_path.exists():
                    cfg.stop_path.unlink()
            self.events.emit("done", lora_path=path, lora_name=path.name, step=pos.step, stopped=stopped)
        return Result(path, pos.step, stopped)

    def _agree(self, loss: float, stop: bool) -> tuple[float, bool]:
        """Mean loss over processes, and stop when any process was asked to (one all-reduce)."""
        if self.world == 1:
            return loss, stop
        t = torch.tensor([loss, float(stop)], device=self.device, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t[0]) / self.world, bool(t[1] > 0)


def model_input(task: Task, x: torch.Tensor, image_latent: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """The DiT input for noisy latents x (B, 16, T, h, w) and the number of leading condition frames.
    Same layout as k5core.sampling: 33-channel models get [x, condition latent, mask]
    (sampling.visual_condition); for I2V the clean first frame is written over x's first frame,
    exactly as the sampler does at every step."""
    first = 0
    if image_latent is not None:
        first = image_latent.shape[2]
        x = sampling.write_first_frames(x, image_latent.to(x.dtype))
    cond = sampling.visual_condition(task, tuple(x.shape), image_latent, x.device)
    return (x if cond is None else torch.cat([x, cond.to(x.dtype)], dim=1)), first


def all_reduce_mean(tensors: list[torch.Tensor]) -> None:
    """Average tensors over the processes in one flat all-reduce."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def default_mixed_precision(cfg: TrainConfig) -> str:
    """--mixed_precision, else `accelerate launch --mixed_precision`, else bf16 on CUDA and no on CPU."""
    if cfg.mixed_precision:
        return cfg.mixed_precision
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launched:
        return launched
    on_cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    return "bf16" if torch.cuda.is_available() and not on_cpu else "no"


def make_accelerator(cfg: TrainConfig):
    """accelerate's Accelerator: the process group under `accelerate launch`, the device and the
    mixed-precision mode."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs
    # the other processes wait while the main one samples or saves: allow that to take a while
    patience = InitProcessGroupKwargs(timeout=datetime.timedelta(hours=2))
    return Accelerator(mixed_precision=default_mixed_precision(cfg), kwargs_handlers=[patience])


def train(cfg: TrainConfig, events: EventWriter, accelerator=None) -> Result:
    """Run one training; raises on errors (the caller turns them into an error event)."""
    return Trainer(cfg, events, accelerator).run()
