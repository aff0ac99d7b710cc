"""`python -m k5core.generate` end to end on tiny models, and the pipeline's size and I2V rules."""
import json
import subprocess
import sys
from pathlib import Path

import av
import pytest
import torch
from PIL import Image

from k5core import generate as cli
from k5core.pipeline import Settings, cover_crop, normalize_first_frames, resolve, size_for_image
from k5core.tasks import DEFAULT_NEGATIVE_PROMPT, get_task

ROOT = Path(__file__).resolve().parents[1]


def test_demo_writes_an_mp4_that_pyav_reads_back(tmp_path):
    out = tmp_path / "demo.mp4"
    proc = subprocess.run([sys.executable, "-m", "k5core.generate", "--demo", "--output", str(out),
                           "--width", "96", "--height", "64", "--seed", "11"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(out)                        # only the path on stdout
    assert "sampling" in proc.stderr                               # the progress bar
    with av.open(str(out)) as c:
        stream = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
        meta = json.loads(c.metadata["comment"])
    assert len(frames) == 9 and frames[0].shape == (64, 96, 3)
    assert max(f.std() for f in frames) > 1.0                      # not a blank video
    assert meta["task"] == "k5-tiny-t2v" and meta["seed"] == 11 and meta["width"] == 96
    assert meta["negative_prompt"] == DEFAULT_NEGATIVE_PROMPT and meta["steps"] == 4


def test_demo_t2i_writes_a_png_with_the_settings(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert cli.main(["--demo", "--task", "k5-tiny-t2i", "--output", str(out), "--seed", "4",
                     "--steps", "2", "--guidance", "2.5"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    with Image.open(out) as im:
        assert im.size == (64, 64) and im.mode == "RGB"
        meta = json.loads(im.text["Comment"])
    assert meta["task"] == "k5-tiny-t2i" and meta["steps"] == 2 and meta["guidance"] == 2.5
    assert meta["negative_prompt"] == "" and meta["frames"] == 1


@pytest.mark.parametrize("argv,code,message", [
    (["--demo", "--output", "x.gif"], 2, "must end in .mp4"),
    (["--demo", "--task", "k5-lite-t2v-5s-sd", "--output", "x.mp4"], 2, "k5-tiny"),
    (["--output", "x.mp4", "--prompt", "a cat"], 2, "missing --dit"),
    (["--demo", "--output", "x.mp4", "--lora_weight", "a", "--lora_multiplier", "1", "2"], 2, "2 --lora_multiplier"),
])
def test_bad_flags_exit_2_with_a_reason(argv, code, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == code and message in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--width", "100", "--height", "64"], "width: task k5-tiny-t2v needs a positive multiple of 16"),
    (["--frames", "8"], "4k+1"),
    (["--task", "k5-tiny-i2v"], "pass the first frame with --image"),
])
def test_bad_settings_fail_before_any_model_loads(extra, message, capsys, monkeypatch):
    monkeypatch.setattr(cli, "add_demo_models", lambda args, folder: None)   # nothing is loaded anyway
    assert cli.main(["--demo", "--output", "x.mp4", *extra]) == 1
    assert message in capsys.readouterr().err


def test_resolve_fills_the_official_defaults():
    video = resolve(Settings(task="k5-lite-t2v-5s-sd", prompt="p"))
    assert (video.height, video.width, video.frames, video.steps, video.guidance, video.shift) == \
        (512, 768, 121, 50, 5.0, 10.0)
    assert video.negative_prompt == DEFAULT_NEGATIVE_PROMPT and 0 <= video.seed < 2 ** 32
    image = resolve(Settings(task="k5-lite-t2i-hd", prompt="p", seed=1))
    assert (image.height, image.width, image.frames, image.shift, image.negative_prompt) == (1024, 1024, 1, 3.0, "")
    with pytest.raises(ValueError, match="both or neither"):
        resolve(Settings(task="k5-lite-t2v-5s-sd", prompt="p", width=512))


def test_input_image_sizes_follow_the_official_rules():
    # I2V SD: area 512*768, sides multiples of 16; k = sqrt(393216 / (300*500)) / 16 = 0.10119
    # -> 300k = 30.36 -> 480, 500k = 50.60 -> 816
    assert size_for_image(get_task("k5-lite-i2v-5s-sd"), (300, 500)) == (480, 816)
    # I2V HD: area 1024*1024, multiples of 128: k = sqrt(1048576 / 150000) / 128 = 0.020656 -> 768, 1280
    assert size_for_image(get_task("k5-pro-i2v-5s-hd"), (300, 500)) == (768, 1280)
    # I2I: the bucket with the nearest aspect ratio (0.6 -> 768/1280)
    assert size_for_image(get_task("k5-lite-i2i-hd"), (300, 500)) == (768, 1280)


def test_cover_crop_keeps_the_centre():
    x = torch.zeros(1, 1, 10, 40)
    x[..., 15:25] = 1.0                       # a centred stripe 10 wide
    y = cover_crop(x, 16, 16)                 # scale 10 -> 16 (x1.6), width 64, crop the middle 16
    assert y.shape == (1, 1, 16, 16) and y[..., 2:14].min() > 0.99


def test_i2v_first_frame_normalisation():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 16, 8, 4, 4, generator=g)
    frames = (base - base.mean(dim=(1, 3, 4), keepdim=True)) / base.std(dim=(1, 3, 4), keepdim=True)
    ref = frames.clone()
    ref[:, :, 4:] = ref[:, :, 4:] * 1.1 + 0.05        # reference frames: mean ~0.05, std ~1.1
    out = normalize_first_frames(ref)
    assert torch.equal(out[:, :, 4:], ref[:, :, 4:])
    r_mean, r_std = ref[:, :, 4:].mean(), ref[:, :, 4:].std()
    for k in range(4):                                 # inside the clamps: moved to the reference stats
        assert abs(out[0, :, k].mean() - r_mean) < 1e-5 and abs(out[0, :, k].std() - r_std) < 1e-5
    far = ref.clone()
    far[:, :, 4:] += 5.0                               # mean clamped to own mean + 0.1
    assert abs(normalize_first_frames(far)[0, :, 0].mean() - 0.1) < 1e-5
    short = torch.randn(1, 16, 3, 4, 4)                # no frame after the first four: unchanged
    assert torch.equal(normalize_first_frames(short), short)


def test_lora_fp8_and_block_swap_flags_are_wired(tmp_path):
    from k5core.lora import LoRANetwork, applied_loras
    from k5core.loading import build_dit
    from k5core.tiny.dit import write_tiny_dit

    task = get_task("k5-tiny-t2v")
    dit_path = write_tiny_dit(tmp_path, task=task.name)
    lora_path = LoRANetwork(build_dit(task), rank=2).save(tmp_path / "tiny_lora.safetensors")
    parser = cli.build_parser()
    args = parser.parse_args(["--demo", "--output", "x.mp4", "--dit", str(dit_path), "--fp8_base",
                              "--blocks_to_swap", "1", "--lora_weight", str(lora_path), "--lora_multiplier", "0.5"])
    cli.check_args(args, parser)
    with pytest.warns(UserWarning, match="does nothing"):          # block swap on a CPU is a no-op
        dit = cli.load_dit_for(args, task, torch.device("cpu"))
    assert [v["multiplier"] for v in applied_loras(dit).values()] == [0.5]
    assert any(p.dtype == torch.float8_e4m3fn for p in dit.parameters())
    assert dit.block_runner is not None and dit.block_runner.swap is not None


def test_pipeline_i2v_from_an_image_to_frames(tmp_path):
    from k5core.loading import load_dit
    from k5core.pipeline import encode_image, generate
    from k5core.tiny.dit import write_tiny_dit
    from k5core.tiny.vae import make_tiny_hunyuan_vae
    from k5core.vae import load_vae

    task = get_task("k5-tiny-i2v")
    dit = load_dit(write_tiny_dit(tmp_path, task=task.name))
    vae = load_vae(make_tiny_hunyuan_vae(tmp_path)["comfy"])
    image = (torch.rand(50, 80, 3) * 255).to(torch.uint8)
    settings = resolve(Settings(task=task.name, prompt="p", seed=5, steps=2), image_size=(50, 80))
    assert (settings.height, settings.width) == (64, 96)      # nearest bucket to the image's aspect
    latent = encode_image(vae, image, settings)
    assert latent.shape == (1, 16, 1, 8, 12)
    g = torch.Generator().manual_seed(0)
    embeds = {"text_embed": torch.randn(1, 4, 32, generator=g), "pooled": torch.randn(1, 16, generator=g)}
    negative = {"text_embed": torch.randn(1, 6, 32, generator=g), "pooled": torch.randn(1, 16, generator=g)}
    steps = []
    result = generate(dit, vae, settings, embeds, negative, image_latent=latent,
                      progress=lambda s, t, info: steps.append((s, t, type(info).__name__)))
    assert torch.equal(result.latent[:, :, :1], latent)        # the first latent frame is the image's
    assert result.frames.shape == (1, 9, 64, 96, 3) and 0 <= result.frames.min() and result.frames.max() <= 1
    assert steps[:2] == [(1, 2, "StepInfo"), (2, 2, "StepInfo")] and steps[-1][2] == "str"  # then VAE tiles


def test_demo_i2i_encodes_the_source_image_with_an_empty_negative_prompt(tmp_path, monkeypatch):
    src = tmp_path / "source.png"
    Image.fromarray((torch.rand(40, 60, 3, generator=torch.Generator().manual_seed(1)) * 255)
                    .to(torch.uint8).numpy()).save(src)
    seen = []
    from k5core import text
    encode = text.TextEncoder.encode
    monkeypatch.setattr(text.TextEncoder, "encode",
                        lambda self, *a, **k: seen.append((a, k.get("images"))) or encode(self, *a, **k))
    out = tmp_path / "edit.png"
    assert cli.main(["--demo", "--task", "k5-tiny-i2i", "--image", str(src), "--output", str(out), "--seed", "2",
                     "--steps", "2", "--guidance", "3", "--negative_prompt", ""]) == 0
    (prompts, content), image = seen[0]
    assert prompts[1] == "" and content == "image_edit"      # the empty negative prompt is encoded ...
    assert image is not None and image.dtype == torch.uint8   # ... with the source image at the output size
    with Image.open(out) as im:
        assert im.size[::-1] == tuple(image.shape[:2])
        meta = json.loads(im.text["Comment"])
    assert meta["task"] == "k5-tiny-i2i" and meta["negative_prompt"] == "" and meta["guidance"] == 3
