"""Fit a big DiT into a small GPU: block swap, and gradient checkpointing with activation offload.

Block swap (`enable_block_swap(model, n, device)`): the last n visual blocks live in pinned CPU memory.
Block i is copied to the GPU on a side CUDA stream while the block before it computes, runs, and its
GPU copy is dropped. In backward the order reverses: when the gradient reaches block i's output the
block is brought back (block i-1's copy starts), and when the gradient leaves block i it is dropped.
Tensors autograd saves from a swapped block's weights are kept as references and fetched back in
backward, so swapping saves GPU memory in training with or without checkpointing. The unit is the
whole block module: every parameter and buffer in it is swapped (fp8 weights and scales, and whatever
is added later), except that while autograd is on, parameters that require grad (a LoRA inside a
block) stay on the GPU next to their gradients and optimizer state; freeze the base model for
training (model.requires_grad_(False)), or its weights stay on the GPU too (a warning says so).
Do not call model.to() afterwards; call enable_block_swap again.

On a CPU-only setup (device "cpu") block swap is a no-op with a warning: the schedule runs and is
logged, the copies are skipped. Asking for a CUDA device without CUDA is an error. Devices other than
CUDA copy synchronously, without a side stream.

Gradient checkpointing (`enable_gradient_checkpointing(model, cpu_offload=...)`): each visual block
is recomputed in backward (torch.utils.checkpoint, non-reentrant); with cpu_offload the block inputs
kept for the recomputation wait in pinned CPU memory instead of on the GPU. Text blocks are few and
short, and run plainly.

Both install a BlockRunner as `model.block_runner`, which K5DiT.run_visual_blocks hands its loop to.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


# ----------------------------------------------------------------------------- public
def enable_block_swap(model: nn.Module, n: int, device) -> BlockSwap | None:
    """Keep the last `n` visual blocks in CPU memory and stream them to `device` when used; every
    other module moves to `device`. n=0 turns swapping off (the whole model moves to `device`).
    Returns the BlockSwap (its `log` records the schedule), or None for n=0."""
    blocks = model.visual_transformer_blocks
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(blocks):
        raise ValueError(f"blocks_to_swap={n!r}: the model has {len(blocks)} visual blocks; "
                         f"expected an integer from 0 (off) to {len(blocks)}")
    device = _resolve(device)
    runner = _runner(model)
    if runner.swap is not None:
        runner.swap.close()
        runner.swap = None
    if n == 0:
        model.to(device)
        _install(model, runner)
        return None
    if device.type == "cpu":
        warnings.warn(f"blocks_to_swap={n} on device 'cpu' does nothing: the weights are in CPU memory "
                      f"already (the swap schedule still runs, without copies)", stacklevel=2)
    swapped = range(len(blocks) - n, len(blocks))
    for child in model.children():
        if child is not blocks:
            child.to(device)
    for i, block in enumerate(blocks):
        if i not in swapped:
            block.to(device)
    runner.swap = BlockSwap(blocks, swapped, device)
    _install(model, runner)
    return runner.swap


def enable_gradient_checkpointing(model: nn.Module, enabled: bool = True, cpu_offload: bool = False) -> None:
    """Recompute each visual block in backward instead of keeping its activations; with
    `cpu_offload` the block inputs kept for that wait in (pinned) CPU memory."""
    runner = _runner(model)
    runner.checkpointing, runner.cpu_offload = enabled, enabled and cpu_offload
    _install(model, runner)


# ----------------------------------------------------------------------------- block loop
@dataclass
class BlockRunner:
    """Runs K5DiT's visual block loop with block swap and/or gradient checkpointing."""
    swap: BlockSwap | None = None
    checkpointing: bool = False
    cpu_offload: bool = False

    def __call__(self, blocks: nn.ModuleList, visual: torch.Tensor, *args) -> torch.Tensor:
        swap = self.swap
        if swap is not None:
            swap.begin_forward()
        for i, block in enumerate(blocks):
            if swap is None:
                visual = self.run_block(block, visual, args)
                continue
            swap.before_block(i)
            with swap.saving(i):
                out = self.run_block(block, visual, args)
            swap.after_block(i, visual, out)
            visual = out
        return visual

    def run_block(self, block: nn.Module, x: torch.Tensor, args: tuple) -> torch.Tensor:
        if not (self.checkpointing and torch.is_grad_enabled()):
            return block(x, *args)
        if not self.cpu_offload:
            return checkpoint(block, x, *args, use_reentrant=False)
        return checkpoint(_from_cpu(block, x), offload_to_cpu(x), *args, use_reentrant=False)


def offload_to_cpu(x: torch.Tensor) -> torch.Tensor:
    """Copy x into (pinned) CPU memory without waiting; the copy is all the checkpoint keeps."""
    buf = torch.empty(x.shape, dtype=x.dtype, pin_memory=x.is_cuda)
    return buf.copy_(x.detach(), non_blocking=True).requires_grad_(x.requires_grad)


def _from_cpu(block: nn.Module, x: torch.Tensor):
    """The checkpointed function: the forward runs on x itself (no round trip; the gradient flows to
    x through the forward graph), the recomputation in backward on the CPU copy brought back."""
    first, device = [x], x.device

    def run(x_cpu, *args):
        return block(first.pop() if first else x_cpu.to(device, non_blocking=True), *args)
    return run


def _runner(model: nn.Module) -> BlockRunner:
    runner = getattr(model, "block_runner", None)
    return runner if isinstance(runner, BlockRunner) else BlockRunner()


def _install(model: nn.Module, runner: BlockRunner) -> None:
    model.block_runner = runner if (runner.swap is not None or runner.checkpointing) else None


def _resolve(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"block swap to {device} asked, but this torch has no CUDA device; "
                               f"use blocks_to_swap=0 (or device 'cpu', where it does nothing)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


# ----------------------------------------------------------------------------- swapping
def _slots(module: nn.Module):
    """(owner module, name, tensor) of every parameter and buffer under `module`."""
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                yield m, name, p
        for name, b in m._buffers.items():
            if b is not None:
                yield m, name, b


def _put(m: nn.Module, name: str, t: torch.Tensor) -> None:
    """Point a parameter (keeping the Parameter object) or a buffer at tensor t."""
    if name in m._parameters:
        m._parameters[name].data = t
    else:
        m._buffers[name] = t


def _trainable(t: torch.Tensor) -> bool:
    return isinstance(t, nn.Parameter) and t.requires_grad


@dataclass(frozen=True)
class _SavedRef:
    """A tensor autograd saved from a swapped block's weights: fetched back in backward."""
    block: int
    key: tuple
    size: tuple
    stride: tuple
    offset: int


class BlockSwap:
    """The swapped blocks' CPU homes, the device copies now in use, and the schedule (forward and
    backward). `log` holds (event, block, resident swapped blocks) with events "load", "forward",
    "backward", "drop" and "late" (a copy made on demand because no prefetch covered it)."""

    def __init__(self, blocks: nn.ModuleList, swapped, device: torch.device):
        self.blocks, self.device = blocks, device
        self.swapped = tuple(swapped)
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.homes: dict[int, dict[tuple, torch.Tensor]] = {i: {} for i in self.swapped}
        self.loaded: dict[int, dict[tuple, torch.Tensor]] = {}
        self.events: dict[int, torch.cuda.Event] = {}
        self.log: list[tuple[str, int, tuple[int, ...]]] = []
        self._in_backward = False
        self._warned = False
        self._grad = False           # autograd on in the current forward (backward reuses its choice)
        self.saved_refs = 0          # weights autograd saved as references (not copies) so far
        for i in self.swapped:
            for m, name, t in _slots(blocks[i]):
                self._adopt(i, m, name, t)

    def resident(self) -> tuple[int, ...]:
        """Swapped blocks whose weights are on the device now."""
        return tuple(sorted(self.loaded))

    def _note(self, event: str, i: int) -> None:
        self.log.append((event, i, self.resident()))

    # -- homes
    def _home(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        return t.pin_memory() if self.cuda and not t.is_pinned() else t

    def _adopt(self, i: int, m: nn.Module, name: str, t: torch.Tensor) -> None:
        """Give a tensor its CPU home and point the module at it."""
        home = self._home(t)
        self.homes[i][(m, name)] = home
        _put(m, name, home)

    def _keep(self, i: int, m: nn.Module, name: str, t: torch.Tensor) -> None:
        """Keep a trainable parameter on the device while autograd is on (no home, no copies)."""
        self.homes[i].pop((m, name), None)
        if t.device != self.device:
            t.data = t.data.to(self.device)

    # -- copies
    def prefetch(self, i: int) -> None:
        """Start copying swapped block i to the device (side stream on CUDA)."""
        if i not in self.homes or i in self.loaded:
            return
        homes, grad, kept = self.homes[i], self._grad, 0
        with torch.inference_mode(False):   # homes and copies stay usable by autograd later
            for m, name, t in list(_slots(self.blocks[i])):   # pick up tensors added or replaced since
                home = homes.get((m, name))
                if grad and _trainable(t):
                    self._keep(i, m, name, t)
                    kept += t.numel() * t.element_size()
                elif home is None or t.data_ptr() != home.data_ptr():
                    self._adopt(i, m, name, t)
            copies = {}
            with torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext():
                for (m, name), home in homes.items():
                    copies[(m, name)] = home.to(self.device, non_blocking=True)
                    _put(m, name, copies[(m, name)])
                if self.cuda:
                    self.events[i] = self.stream.record_event()
        self.loaded[i] = copies
        self._note("load", i)
        if kept > sum(c.numel() * c.element_size() for c in copies.values()) and not self._warned:
            self._warned = True
            warnings.warn(f"block swap: most weights of visual block {i} require grad, so they stay on "
                          f"{self.device} during training; freeze the base model "
                          f"(model.requires_grad_(False)) before training a LoRA", stacklevel=2)

    def ready(self, i: int) -> None:
        """Make block i usable on the current stream (copy now if it was not prefetched)."""
        if i not in self.homes:
            return
        if i not in self.loaded:
            self.prefetch(i)
            self._note("late", i)
        event = self.events.pop(i, None)
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            for t in self.loaded[i].values():
                t.record_stream(stream)   # the allocator reuses the memory only after this stream is done

    def drop(self, i: int) -> None:
        """Point block i back at its CPU homes; its device copies are freed."""
        copies = self.loaded.pop(i, None)
        if copies is None:
            return
        self.events.pop(i, None)
        for (m, name), copy in copies.items():
            now = m._parameters[name] if name in m._parameters else m._buffers[name]
            if now.data_ptr() != copy.data_ptr():      # replaced while on the device: new home
                self._adopt(i, m, name, now)
            else:
                _put(m, name, self.homes[i][(m, name)])
        self._note("drop", i)

    def close(self) -> None:
        for i in list(self.loaded):
            self.drop(i)

    # -- forward schedule
    def _next(self, i: int) -> int | None:
        return min((j for j in self.swapped if j > i), default=None)

    def _previous(self, i: int) -> int | None:
        return max((j for j in self.swapped if j < i), default=None)

    def begin_forward(self) -> None:
        self.close()                       # leftovers of a forward without backward
        self._grad = torch.is_grad_enabled()
        first = self._next(-1)
        if first is not None:
            self.prefetch(first)

    def before_block(self, i: int) -> None:
        self.ready(i)
        nxt = self._next(i)
        if nxt is not None:
            self.prefetch(nxt)
        self._note("forward", i)

    def after_block(self, i: int, inp: torch.Tensor, out: torch.Tensor) -> None:
        """Drop block i and, when a backward will follow, hook the block boundaries: the gradient
        arriving at block i's output starts block i's backward and ends block i+1's."""
        self.drop(i)
        if not torch.is_grad_enabled():
            return
        if out.requires_grad:
            out.register_hook(self._boundary(i))
        if i == 0 and inp.requires_grad:
            inp.register_hook(self._boundary(-1))

    @contextlib.contextmanager
    def saving(self, i: int):
        """While swapped block i runs with autograd on, save references to its device weights
        instead of the weights, so dropping the block frees them."""
        if i not in self.loaded or not torch.is_grad_enabled():
            yield
            return
        index = {(t.device, t.untyped_storage().data_ptr()): (key, t) for key, t in self.loaded[i].items()}

        def pack(t):
            hit = index.get((t.device, t.untyped_storage().data_ptr()))
            if hit is None or hit[1].dtype != t.dtype:
                return t
            self.saved_refs += 1
            return _SavedRef(i, hit[0], tuple(t.size()), tuple(t.stride()), t.storage_offset())

        with torch.autograd.graph.saved_tensors_hooks(pack, self._unpack):
            yield

    def _unpack(self, saved):
        if not isinstance(saved, _SavedRef):
            return saved
        self.ready(saved.block)
        base = self.loaded[saved.block][saved.key]
        return base.as_strided(saved.size, saved.stride, saved.offset)

    # -- backward schedule
    def _boundary(self, k: int):
        def hook(grad):
            if not self._in_backward:
                self._in_backward = True
                torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
            if k + 1 < len(self.blocks):
                self.drop(k + 1)                 # block k+1's backward is over
            if k >= 0:
                self.prefetch(k)                 # needed now: nothing could prefetch it earlier
                self.ready(k)
                prev = self._previous(k)
                if prev is not None:
                    self.prefetch(prev)
                self._note("backward", k)
        return hook

    def _end_backward(self) -> None:
        self._in_backward = False
        self.close()
