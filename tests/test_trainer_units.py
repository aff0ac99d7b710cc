"""Unit tests of the trainer's parts that need no model: settings, events, timesteps, schedules,
optimizers, state folders, data order, prompt files, the DiT input layout."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from k5core.cache import CachedItem
from k5core.tasks import get_task
from trainer import config as tc
from trainer.data import batches_per_epoch, epoch_batches
from trainer.events import EVENTS, EventWriter, encode_event, read_events
from trainer.loop import StopFlag, model_input
from trainer.optim import build_optimizer, build_scheduler, lr_factor, warmup_steps
from trainer.sample import PromptFileError, parse_prompt_file
from trainer.state import (StateError, capture_rng, latest_state, list_states, load_state, read_progress,
                           restore_rng, save_state, state_dir)
from trainer.timesteps import (flow_matching_loss, loss_weights, noisy_latents, sample_t, shift_t,
                               velocity_target)


@pytest.fixture
def base(tmp_path) -> list[str]:
    """Required flags pointing at files that exist."""
    dit = tmp_path / "dit.safetensors"
    data = tmp_path / "dataset.toml"
    dit.write_bytes(b"x")
    data.write_text("")
    return ["--task", "k5-tiny-t2v", "--dit", str(dit), "--dataset_config", str(data),
            "--output_dir", str(tmp_path / "out")]


# ------------------------------------------------------------------------------------- settings
def test_flags_toml_and_precedence(tmp_path, base):
    toml = tmp_path / "train.toml"
    toml.write_text('network_dim = 8\nlearning_rate = 2e-4\noptimizer_type = "AdamW"\nfp8_base = true\n'
                    'optimizer_args = ["weight_decay=0.01", "betas=0.9,0.99"]\n')
    cfg = tc.load_config(base + ["--config", str(toml), "--network_dim", "16", "--flash_attn",
                                 "--no-fp8_scaled", "--lr_warmup_steps", "0.1"])
    assert cfg.network_dim == 16                       # the command line beats the TOML
    assert cfg.learning_rate == 2e-4 and cfg.optimizer_type == "adamw" and cfg.fp8_base is True
    assert cfg.fp8_scaled is False and cfg.attention == "flash2" and cfg.lr_warmup_steps == 0.1
    assert tc.parse_key_values(cfg.optimizer_args, "x") == {"weight_decay": 0.01, "betas": (0.9, 0.99)}
    assert cfg.stop_path == tmp_path / "out" / "k5_lora.stop"
    assert not (tmp_path / "out").exists()             # reading settings creates nothing
    assert "config" not in cfg.summary() and cfg.summary()["network_dim"] == 16


def test_seed_doc_command_parses(base):
    cfg = tc.load_config(base + "--sdpa --mixed_precision bf16 --fp8_base --optimizer_type adamw8bit "
                                "--learning_rate 2e-4 --gradient_checkpointing --gradient_checkpointing_cpu_offload "
                                "--blocks_to_swap 4 --max_data_loader_n_workers 2 --persistent_data_loader_workers "
                                "--network_module networks.lora_kandinsky --network_dim 32 --timestep_sampling shift "
                                "--discrete_flow_shift 3.0 --min_timestep 0 --max_timestep 1000 --max_train_epochs 16 "
                                "--save_every_n_epochs 1 --seed 42 --output_name demo".split())
    assert (cfg.max_train_epochs, cfg.blocks_to_swap, cfg.seed, cfg.attention) == (16, 4, 42, "sdpa")


@pytest.mark.parametrize("toml, expected", [
    ("network_dims = 8\n", "unknown key 'network_dims' (did you mean network_dim?)"),
    ("[model]\nnetwork_dim = 8\n", "table [model] is not allowed"),
    ("network_dim = 0\n", "--network_dim: 0 must be at least 1"),
    ('network_dim = "eight"\n', "network_dim: expected an integer, got 'eight'"),
    ('optimizer_type = "sgd"\n', "'sgd' is not one of adamw, adamw8bit, adafactor"),
    ("min_timestep = 600\nmax_timestep = 500\n", "--min_timestep 600.0 must be below --max_timestep 500.0"),
    ("sample_every_n_steps = 10\n", "sampling during training needs --sample_prompts, --vae"),
    ("save_every_n_steps = 0\n", "--save_every_n_steps: 0 must be at least 1 (leave it out to turn it off)"),
    ("fp8_base = 3\n", "fp8_base: expected true or false, got 3"),
    ("network_dim = 8\nnetwork_dim = 9\n", "not valid TOML"),
])
def test_bad_settings_are_named(tmp_path, base, toml, expected):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(tc.ConfigError) as e:
        tc.load_config(base + ["--config", str(path)])
    assert expected in str(e.value), str(e.value)


def test_bad_flags_and_missing_files(tmp_path):
    with pytest.raises(tc.ConfigError) as e:
        tc.load_config(["--task", "k5-tiny-t2", "--dit", str(tmp_path / "nope.safetensors"), "--netwrk_dim", "4",
                        "--sdpa", "--xformers"])
    text = str(e.value)
    for part in ("unknown flag --netwrk_dim (did you mean --network_dim?)", "unknown task 'k5-tiny-t2'",
                 "nope.safetensors does not exist", "--dataset_config is required", "--output_dir is required",
                 "several attention flags"):
        assert part in text, text


def test_image_tasks_are_refused(base):
    with pytest.raises(tc.ConfigError, match="k5-lite-t2i-hd is an image task"):
        tc.load_config(base + ["--task", "k5-lite-t2i-hd"])


def test_output_dir_checks(tmp_path, base):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(tc.ConfigError, match="a_file is a file"):
        tc.load_config(base + ["--output_dir", str(blocker / "out")])
    assert tc.writable_dir_problem(tmp_path / "new" / "deeper") is None
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------- events
def test_events_are_json_lines_with_nan_as_null(tmp_path):
    path = tmp_path / "ev" / "events.jsonl"
    human = []

    class Sink:
        def write(self, s): human.append(s)
        def flush(self): pass

    w = EventWriter(str(path), human=Sink())
    w.emit("start", total=3, run="r", config={"p": Path("/x"), "t": (1, 2)})
    w.emit("step", step=1, total=3, epoch=1, loss=float("nan"), avg_loss=float("inf"), lr=1e-4, it_s=2.0,
           eta_s=1.0, peak_mem=2**30)
    w.emit("done", lora_path=Path("/x/l.safetensors"), lora_name="l.safetensors", step=3, stopped=False)
    w.close()
    events = read_events(path)
    assert [e["event"] for e in events] == ["start", "step", "done"]
    assert events[0]["config"] == {"p": "/x", "t": [1, 2]}
    assert events[1]["loss"] is None and events[1]["avg_loss"] is None
    assert "step 1/3 ep 1 loss nan" in "".join(human) and "1.00 GiB" in "".join(human)
    with pytest.raises(ValueError, match="unknown event"):
        encode_event("progress", step=1)
    assert set(EVENTS) == {"start", "step", "epoch", "sample", "checkpoint", "log", "error", "done"}


def test_disabled_writer_still_says_errors():
    out, human = [], []

    class Sink:
        def __init__(self, into): self.into = into
        def write(self, s): self.into.append(s)
        def flush(self): pass

    w = EventWriter(stream=Sink(out), human=Sink(human), enabled=False)
    w.emit("step", step=1, total=1, epoch=1, loss=1.0, avg_loss=1.0, lr=1.0, it_s=1.0, eta_s=0.0, peak_mem=1)
    w.emit("error", message="boom")
    assert out == [] and human == ["error: boom\n"]


# ------------------------------------------------------------------------------------- timesteps
def test_timestep_samplings():
    g = torch.Generator().manual_seed(0)
    n = 20000
    uniform = sample_t(n, "uniform", g)
    sigmoid = sample_t(n, "sigmoid", g)
    shifted = sample_t(n, "shift", g, shift=3.0)
    logsnr = sample_t(n, "logsnr", g, logit_mean=0.0, logit_std=1.0)
    for t in (uniform, sigmoid, shifted, logsnr):
        assert t.shape == (n,) and 0 <= t.min() and t.max() <= 1
    assert abs(uniform.mean() - 0.5) < 0.01 and abs(sigmoid.mean() - 0.5) < 0.01
    assert shifted.mean() > 0.65                       # shift 3 moves time toward noise (t = 1)
    assert abs(logsnr.median() - 0.5) < 0.01 and logsnr.std() < sigmoid.std()   # sigmoid(-n/2) is narrower
    narrow = sample_t(n, "uniform", g, min_timestep=200, max_timestep=300)
    assert 0.2 <= narrow.min() and narrow.max() <= 0.3
    assert torch.allclose(shift_t(torch.tensor([0.0, 0.5, 1.0]), 3.0), torch.tensor([0.0, 0.75, 1.0]))
    with pytest.raises(ValueError, match="unknown timestep sampling"):
        sample_t(1, "sigma", g)


def test_flow_matching_convention():
    """x_t runs from data (t=0) to noise (t=1) and the target is noise - data, so one Euler step of
    the official sampler with the exact velocity lands on the data."""
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 16, 3, 4, 4, generator=g), torch.randn(2, 16, 3, 4, 4, generator=g)
    t = torch.tensor([0.3, 0.9])
    xt = noisy_latents(x0, noise, t)
    v = velocity_target(x0, noise)
    assert torch.allclose(noisy_latents(x0, noise, torch.zeros(2)), x0)
    assert torch.allclose(noisy_latents(x0, noise, torch.ones(2)), noise)
    assert torch.allclose(xt + (0 - t).view(-1, 1, 1, 1, 1) * v, x0, atol=1e-5)
    w = loss_weights(t, "none")
    assert flow_matching_loss(v, v, w) == 0
    assert torch.isclose(flow_matching_loss(v + 1, v, w), torch.tensor(1.0))
    assert torch.allclose(loss_weights(torch.tensor([0.5]), "sigma_sqrt"), torch.tensor([4.0]))
    assert torch.allclose(loss_weights(torch.tensor([0.5]), "cosmap"), torch.tensor([4 / math.pi]))


# ------------------------------------------------------------------------------------- optim
def test_schedules():
    assert [round(lr_factor(s, 10, 0, "constant"), 6) for s in (0, 9)] == [1.0, 1.0]
    assert lr_factor(0, 10, 4, "cosine") == pytest.approx(0.2) and lr_factor(3, 10, 4, "cosine") == pytest.approx(0.8)
    assert lr_factor(4, 10, 4, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 10, 4, "cosine") == pytest.approx(0.0)
    assert lr_factor(7, 10, 4, "linear") == pytest.approx(0.5)
    assert lr_factor(10, 10, 0, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert warmup_steps(tc.TrainConfig(lr_warmup_steps=0.1), 50) == 5
    assert warmup_steps(tc.TrainConfig(lr_warmup_steps=7), 50) == 7


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "adafactor"])
def test_optimizers_step_and_schedule(name):
    p = torch.nn.Parameter(torch.ones(64, 64))
    cfg = tc.TrainConfig(optimizer_type=name, learning_rate=0.1, lr_scheduler="linear", lr_warmup_steps=1)
    opt = build_optimizer([p], cfg)
    sched = build_scheduler(opt, cfg, total_steps=3)
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.05, 0.1, 0.05]) and p.detach().max() < 1
    restored = build_scheduler(build_optimizer([p], cfg), cfg, total_steps=3)
    restored.load_state_dict(sched.state_dict())
    assert restored.last_epoch == 3


def test_optimizer_args_are_checked():
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(tc.ConfigError, match="momentum not accepted by adamw"):
        build_optimizer([p], tc.TrainConfig(optimizer_type="adamw", optimizer_args=["momentum=0.9"]))
    opt = build_optimizer([p], tc.TrainConfig(optimizer_type="adamw", optimizer_args=["weight_decay=0.5"]))
    assert opt.param_groups[0]["weight_decay"] == 0.5


# ------------------------------------------------------------------------------------- state
def _tiny_state(tmp_path, step: int, name: str = "run"):
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    g = torch.Generator().manual_seed(5)
    folder = save_state(state_dir(tmp_path, name, step), network={"w": p.detach()}, optimizer=opt, scheduler=sched,
                        rng=[capture_rng({"noise": g})], progress={"step": step, "epoch": 1, "batch": 0})
    return folder, p, opt, g


def test_state_roundtrip_and_latest(tmp_path):
    folder, p, opt, g = _tiny_state(tmp_path, 3)
    expected = (torch.rand(3, generator=g), torch.rand(2))
    saved = load_state(folder)
    assert saved["progress"]["step"] == 3 and torch.equal(saved["network"]["w"], p.detach())
    assert saved["optimizer"]["state"][0]["exp_avg"].shape == (4, 4)
    restore_rng(saved["rng"][0], {"noise": g})
    assert all(torch.equal(a, b) for a, b in zip(expected, (torch.rand(3, generator=g), torch.rand(2))))
    _tiny_state(tmp_path, 12)
    (tmp_path / "run-step00000020-state").mkdir()               # incomplete: no train_state.json
    (tmp_path / "other-step00000099-state").mkdir()
    assert [s for s, _ in list_states(tmp_path, "run")] == [3, 12]
    assert latest_state(tmp_path, "run").name == "run-step00000012-state"
    with pytest.raises(StateError, match="not a complete training state"):
        read_progress(tmp_path / "run-step00000020-state")


def test_failed_state_save_leaves_nothing(tmp_path):
    class Broken:
        def state_dict(self):
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        save_state(state_dir(tmp_path, "run", 1), network={"w": torch.ones(1)}, optimizer=Broken(), scheduler=Broken(),
                   rng=[], progress={"step": 1})
    assert list(tmp_path.iterdir()) == []


def test_state_resave_replaces_atomically(tmp_path):
    folder, *_ = _tiny_state(tmp_path, 4)
    again, *_ = _tiny_state(tmp_path, 4)
    assert again == folder and sorted(p.name for p in tmp_path.iterdir()) == ["run-step00000004-state"]


# ------------------------------------------------------------------------------------- data order
def _items(sizes: list[tuple[int, int, int, int]]) -> list[CachedItem]:
    """(dataset, frames, repeats, batch_size) per item."""
    return [CachedItem(Path(f"l{i}"), Path(f"t{i}"), Path(f"s{i}"), d, (64, 64), f, "c", r, b)
            for i, (d, f, r, b) in enumerate(sizes)]


def test_epoch_order_is_seeded_bucketed_and_split():
    items = _items([(0, 9, 2, 2)] * 3 + [(1, 1, 1, 1)] * 2)
    a, b = epoch_batches(items, 7, 1), epoch_batches(items, 7, 1)
    assert a == b and a != epoch_batches(items, 7, 2) and a != epoch_batches(items, 8, 1)
    flat = sorted(i for batch in a for i in batch)
    assert flat == [0, 0, 1, 1, 2, 2, 3, 4]                       # every repeat exactly once
    for batch in a:
        assert len({items[i].bucket_key for i in batch}) == 1 and len({items[i].dataset for i in batch}) == 1
        assert len(batch) <= items[batch[0]].batch_size
    r0, r1 = epoch_batches(items, 7, 1, world=2, rank=0), epoch_batches(items, 7, 1, world=2, rank=1)
    assert len(r0) == len(r1) == batches_per_epoch(items, 2) == 3
    assert [b for pair in zip(r0, r1) for b in pair] == a + a[:1]      # shares of one list, padded


def test_stop_flag_file(tmp_path):
    flag = StopFlag(tmp_path / "x.stop")
    assert not flag.requested()
    (tmp_path / "x.stop").write_text("")
    assert flag.requested() and "stop file" in flag.reason


# ------------------------------------------------------------------------------------- prompts
def test_prompt_file(tmp_path):
    image = tmp_path / "first.png"
    image.write_bytes(b"png")
    f = tmp_path / "prompts.txt"
    f.write_text("# comment\n\na cat walks --w 96 --h 64 --f 9 --d 5 --s 3 --g 1.0 --n blurry, dark\n"
                 "a dog --i first.png\n")
    t2v, i2v = get_task("k5-tiny-t2v"), get_task("k5-tiny-i2v")
    p = parse_prompt_file(f, t2v)
    assert (p[0].prompt, p[0].width, p[0].height, p[0].frames, p[0].seed, p[0].steps, p[0].guidance, p[0].negative) \
        == ("a cat walks", 96, 64, 9, 5, 3, 1.0, "blurry, dark")
    assert (p[1].width, p[1].height, p[1].frames, p[1].seed) == (64, 64, 25, 43) and p[1].image == str(image)
    with pytest.raises(PromptFileError, match=r"prompts.txt:3: task k5-tiny-i2v is image-to-video"):
        parse_prompt_file(f, i2v)
    f.write_text("a cat --f 8\n")
    with pytest.raises(PromptFileError, match=r"prompts.txt:1: frames: the video VAE needs 4k\+1 frames"):
        parse_prompt_file(f, t2v)
    f.write_text("a cat --q 1\n")
    with pytest.raises(PromptFileError, match="unknown option --q"):
        parse_prompt_file(f, t2v)


# ------------------------------------------------------------------------------------- DiT input
def test_model_input_matches_the_sampler_layout():
    """T2V: [x, zeros, mask 0]; I2V: the clean first frame written over x, mask 1 on frame 0 only."""
    x = torch.randn(2, 16, 3, 4, 4)
    inp, first = model_input(get_task("k5-tiny-t2v"), x, None)
    assert first == 0 and inp.shape == (2, 33, 3, 4, 4)
    assert torch.equal(inp[:, :16], x) and not inp[:, 16:].any()
    image = torch.randn(2, 16, 1, 4, 4)
    inp, first = model_input(get_task("k5-tiny-i2v"), x, image)
    assert first == 1 and torch.equal(inp[:, :16, :1], image) and torch.equal(inp[:, :16, 1:], x[:, :, 1:])
    assert (inp[:, 32, 0] == 1).all() and not inp[:, 32, 1:].any()
