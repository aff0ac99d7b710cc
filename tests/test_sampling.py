"""The sampler: Euler/CFG against hand-computed numbers, seeds, branches, stopping, conditions, MagCache."""
import pytest
import torch

from k5core.loading import build_dit
from k5core.magcache import MAG_RATIOS, MagCache, step_ratios
from k5core.sampling import (SamplingCancelled, StepInfo, check_size, latent_shape, make_noise, sample,
                             schedule)
from k5core.tasks import TASKS, get_task
from k5core.tiny.dit import randomize_

T2I = get_task("k5-tiny-t2i")   # 16 input channels: no visual condition
T2V = get_task("k5-tiny-t2v")   # 33 input channels
I2V = get_task("k5-tiny-i2v")
I2I = get_task("k5-tiny-i2i")


class ToyVelocity(torch.nn.Module):
    """v = x * t + pooled[:, 0]: a known function of the latent, the time and the prompt.
    Records the batch size, timesteps and text shapes of every call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, timestep, text_embed, pooled_text_embed, text_mask=None, scale_factor=(1, 1, 1)):
        assert text_mask.shape == text_embed.shape[:2] and text_mask.dtype == torch.bool
        self.calls.append({"batch": x.shape[0], "t": timestep.tolist(), "mask": text_mask.clone()})
        return x * (timestep / 1000)[:, None, None, None, None] + pooled_text_embed[:, :1, None, None, None]


def text(pooled: float, length: int, dim: int = 32):
    return {"text_embed": torch.randn(1, length, dim), "text_mask": torch.ones(1, length, dtype=torch.bool),
            "pooled": torch.full((1, 16), pooled)}


def tiny_dit(task, seed=0):
    return randomize_(build_dit(task), seed).eval()


def embeds(seed, length, task=T2V):
    g = torch.Generator().manual_seed(seed)
    return {"text_embed": torch.randn(1, length, task.dit.in_text_dim, generator=g),
            "text_mask": torch.ones(1, length, dtype=torch.bool),
            "pooled": torch.randn(1, task.dit.in_text_dim2, generator=g)}


SMALL = dict(width=32, height=32, frames=5)   # latent (1, 16, 2, 4, 4)


def test_schedule_is_the_official_shifted_linspace():
    assert schedule(2, 3.0).tolist() == [1.0, 0.75, 0.0]          # 3 * .5 / (1 + 2 * .5) = .75
    ts = schedule(50, 10.0)
    assert ts[0] == 1 and ts[-1] == 0 and bool((ts[1:] < ts[:-1]).all())


@pytest.mark.parametrize("batch_cfg", [True, False])
def test_two_euler_steps_with_cfg_match_hand_computation(batch_cfg):
    # noise 1, pooled cond 2, uncond 0.5, guidance 2, shift 3: t = 1, .75, 0; cfg term = .5 + 2 * 1.5 = 3.5
    # step 0: v = 1 * 1 + 3.5 = 4.5,            x = 1 - .25 * 4.5 = -0.125
    # step 1: v = -0.125 * .75 + 3.5 = 3.40625, x = -0.125 - .75 * 3.40625 = -2.6796875
    model = ToyVelocity()
    noise = torch.ones(latent_shape(T2I, 16, 16, 1))
    out = sample(model, T2I, text(2.0, 3), text(0.5, 5), width=16, height=16, frames=1, steps=2,
                 guidance=2.0, shift=3.0, noise=noise, batch_cfg=batch_cfg)
    assert torch.equal(out, torch.full_like(noise, -2.6796875))
    if batch_cfg:   # both branches in one forward, the shorter prompt padded and masked
        assert [c["batch"] for c in model.calls] == [2, 2]
        assert [c["t"] for c in model.calls] == [[1000.0, 1000.0], [750.0, 750.0]]
        assert model.calls[0]["mask"].tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    else:
        assert [c["batch"] for c in model.calls] == [1, 1, 1, 1]


def test_guidance_one_runs_the_conditional_branch_only():
    # v = x * t + 2: x = 1 - .25 * 3 = .25, then .25 - .75 * (.25 * .75 + 2) = -1.390625
    model = ToyVelocity()
    noise = torch.ones(latent_shape(T2I, 16, 16, 1))
    out = sample(model, T2I, text(2.0, 3), None, width=16, height=16, frames=1, steps=2, guidance=1.0,
                 shift=3.0, noise=noise)
    assert torch.equal(out, torch.full_like(noise, -1.390625))
    assert [c["batch"] for c in model.calls] == [1, 1]


def test_text_cache_items_are_accepted():
    # an unbatched cache item (L, D) / (Dp,) without mask gives what the batched TextEmbeds gives
    item = text(2.0, 3)
    cached = {"text_embed": item["text_embed"][0], "pooled": item["pooled"][0]}
    noise = torch.ones(latent_shape(T2I, 16, 16, 1))
    kw = dict(width=16, height=16, frames=1, steps=2, guidance=1.0, shift=3.0, noise=noise)
    assert torch.equal(sample(ToyVelocity(), T2I, cached, **kw), sample(ToyVelocity(), T2I, item, **kw))


def test_cfg_needs_the_negative_embeddings():
    with pytest.raises(ValueError, match="negative"):
        sample(ToyVelocity(), T2I, text(2.0, 3), None, width=16, height=16, frames=1, steps=2, guidance=3.0)


def test_out_of_memory_falls_back_to_one_branch_at_a_time():
    class Fussy(ToyVelocity):
        def forward(self, x, *a, **k):
            if x.shape[0] > 1:
                raise torch.OutOfMemoryError("no room for 2B")
            return super().forward(x, *a, **k)
    noise = torch.ones(latent_shape(T2I, 16, 16, 1))
    out = sample(Fussy(), T2I, text(2.0, 3), text(0.5, 5), width=16, height=16, frames=1, steps=2,
                 guidance=2.0, shift=3.0, noise=noise)
    assert torch.equal(out, torch.full_like(noise, -2.6796875))


def test_noise_layout_and_seed_determinism():
    shape = (2, 16, 3, 4, 6)
    g = torch.Generator().manual_seed(7)
    official = torch.randn(2 * 3, 4, 6, 16, generator=g)           # (B*T, H, W, C) as the official code
    assert torch.equal(make_noise(shape, 7), official.view(2, 3, 4, 6, 16).permute(0, 4, 1, 2, 3))
    dit = tiny_dit(T2V)
    run = lambda seed: sample(dit, T2V, embeds(1, 4), embeds(2, 6), steps=2, seed=seed, **SMALL)
    a, b, c = run(5), run(5), run(6)
    assert a.shape == (1, 16, 2, 4, 4) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.1


def test_batched_cfg_equals_two_forwards_on_the_dit():
    dit = tiny_dit(T2V)
    kw = dict(steps=3, seed=3, **SMALL)
    a = sample(dit, T2V, embeds(1, 4), embeds(2, 9), batch_cfg=True, **kw)
    b = sample(dit, T2V, embeds(1, 4), embeds(2, 9), batch_cfg=False, **kw)
    assert (a - b).abs().max() / b.abs().max() < 1e-5


def test_stop_midway_raises_cancelled_with_the_latent_so_far():
    model, seen = ToyVelocity(), []
    with pytest.raises(SamplingCancelled) as e:
        sample(model, T2I, text(2.0, 3), text(0.5, 3), width=16, height=16, frames=1, steps=5, seed=0,
               progress=lambda step, total, info: seen.append((step, total, info)),
               should_stop=lambda: len(seen) >= 2)
    assert isinstance(e.value, InterruptedError) and e.value.step == 2 and e.value.total == 5
    assert len(model.calls) == 2 and e.value.latent.shape == (1, 16, 1, 2, 2)
    assert [s[:2] for s in seen] == [(1, 5), (2, 5)] and isinstance(seen[0][2], StepInfo)


class Spy(torch.nn.Module):
    """Wraps a DiT and keeps every input latent it sees."""

    def __init__(self, dit):
        super().__init__()
        self.dit, self.inputs = dit, []

    def forward(self, x, *a, **k):
        self.inputs.append(x.clone())
        return self.dit(x, *a, **k)


def test_i2v_keeps_the_conditioned_first_latent_frame():
    spy = Spy(tiny_dit(I2V))
    first = torch.randn(1, 16, 1, 4, 4)
    out = sample(spy, I2V, embeds(1, 4), embeds(2, 5), steps=3, seed=1, image_latent=first, **SMALL)
    assert torch.equal(out[:, :, :1], first)
    assert not torch.equal(out[:, :, 1:], torch.zeros_like(out[:, :, 1:]))
    for x in spy.inputs:   # (2B, 33, T, H, W): [sample with the frame written in, zeros, mask on frame 0]
        assert x.shape == (2, 33, 2, 4, 4)
        assert torch.equal(x[:, :16, :1], first.expand(2, -1, -1, -1, -1))
        assert not x[:, 16:32].any()
        assert x[:, 32, 0].eq(1).all() and not x[:, 32, 1:].any()
    with pytest.raises(ValueError, match="image-to-video"):
        sample(spy, I2V, embeds(1, 4), embeds(2, 5), steps=1, seed=1, **SMALL)


def test_t2v_passes_the_zero_condition_and_i2i_the_image_channels():
    spy = Spy(tiny_dit(T2V))
    sample(spy, T2V, embeds(1, 4), None, guidance=1.0, steps=2, seed=1, **SMALL)
    assert all(x.shape[1] == 33 and not x[:, 16:].any() for x in spy.inputs)

    spy = Spy(tiny_dit(I2I))
    source = torch.randn(1, 16, 1, 4, 4)
    out = sample(spy, I2I, embeds(1, 4, I2I), None, guidance=1.0, steps=2, seed=1, image_latent=source,
                 width=32, height=32, frames=1)
    for x in spy.inputs:
        assert torch.equal(x[:, 16:32], source) and x[:, 32].eq(1).all()
    assert not torch.equal(out, source)   # the image conditions the sample, it is not written into it


@pytest.mark.parametrize("task,size,match", [
    ("k5-tiny-t2v", dict(width=100, height=64, frames=9), "width.*multiple of 16"),
    ("k5-tiny-t2v", dict(width=64, height=64, frames=10), "4k\\+1.*use 9 or 13"),
    ("k5-tiny-t2i", dict(width=64, height=64, frames=5), "images; frames must be 1"),
    ("k5-lite-t2v-10s-sd", dict(width=512 + 16, height=512, frames=241), "multiple of 128.*NABLA"),
])
def test_bad_sizes_are_refused_with_the_setting_named(task, size, match):
    with pytest.raises(ValueError, match=match):
        check_size(get_task(task), **size)


def test_every_bucket_of_every_task_is_a_valid_size():
    for task in TASKS.values():
        for h, w in task.buckets:
            check_size(task, w, h, task.frames)


# ----------------------------------------------------------------------------- MagCache
def test_magcache_ratio_tables_are_whole():
    assert set(MAG_RATIOS) <= set(TASKS)
    for name, ratios in MAG_RATIOS.items():
        assert len(ratios) == 98, name                              # (cond, uncond) for steps 1..49
        if "nocfg" in name:
            assert not any(ratios[1::2]) and all(ratios[0::2]), name
        else:
            assert all(0.7 < r < 1.2 for r in ratios), name
    assert step_ratios(MAG_RATIOS["k5-lite-t2v-5s-sd"], 50)[1] == (0.91607, 0.91507)
    # cond column [1, 2, 3, 4] to 3 steps: indices round(0, 1.5, 3) = 0, 2, 3 (half to even, as numpy)
    assert [r[0] for r in step_ratios([2.0, 2.0, 3.0, 3.0, 4.0, 4.0], 3)] == [1.0, 3.0, 4.0]


def test_magcache_skips_where_the_accumulated_error_is_small():
    # constant ratio 1.05, 10 steps: the first int(2 * 10 * .2) = 4 forwards (steps 0, 1) compute;
    # then err = .05 -> skip, err = .05 + .1025 > .12 -> compute and reset, and so on.
    cache = MagCache([1.05] * 18, 10)
    decisions = []
    for i in range(10):
        cache.begin_step(i)
        cache.set_branches((0, 1))
        decisions.append((cache.skip[0], cache.skip[1]))
        for b in (0, 1):
            cache.branches[b].residual = torch.zeros(1)
    assert [d[0] for d in decisions] == [False, False, True, False, True, False, True, False, True, False]
    assert all(a == b for a, b in decisions)


def test_magcache_on_the_dit_skips_blocks_and_stays_close():
    dit = tiny_dit(T2V)
    kw = dict(steps=10, seed=2, **SMALL)
    ref = sample(dit, T2V, embeds(1, 4), embeds(2, 6), **kw)
    ratios = [1.01] * 18
    skipped = []
    out = sample(dit, T2V, embeds(1, 4), embeds(2, 6), magcache=ratios,
                 progress=lambda s, t, info: skipped.append(info.skipped), **kw)
    seq = sample(dit, T2V, embeds(1, 4), embeds(2, 6), magcache=ratios, batch_cfg=False, **kw)
    assert sum(skipped) >= 4 and not any(skipped[:2])
    assert "run_visual_blocks" not in vars(dit)                     # the wrapper is removed afterwards
    assert (out - seq).abs().max() / seq.abs().max() < 1e-5          # same decisions batched or not
    assert 0 < (out - ref).abs().max() / ref.abs().max() < 0.5


def test_magcache_refuses_tasks_without_official_ratios():
    with pytest.raises(ValueError, match="no official MagCache ratios"):
        sample(tiny_dit(T2V), T2V, embeds(1, 4), embeds(2, 6), steps=2, seed=1, magcache=True, **SMALL)
