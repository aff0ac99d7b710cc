"""k5core.cache and the two cache commands, end to end with the tiny VAE and text encoders."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from k5core import cache, cache_latents as latents_cli, cache_text_encoder_outputs as text_cli
from k5core.cache import (CacheError, collate_cached, latent_cache_path, list_cached_items, load_cached_item,
                          load_latent_cache, load_text_cache, save_latent_cache, save_text_cache, text_cache_path)
from k5core.data import collect_items, dataset_config_from_dict, load_dataset_config, load_item_pixels
from k5core.files import read_safetensors_header
from k5core.tiny.dataset import make_tiny_dataset

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny VAE and text encoder files, and the loaded models (loaded once for the whole module)."""
    from k5core.text import TextEncoder
    from k5core.tiny.text import make_tiny_text_encoders
    from k5core.tiny.vae import make_tiny_hunyuan_vae
    from k5core.vae import load_vae
    root = tmp_path_factory.mktemp("models")
    vae_path = make_tiny_hunyuan_vae(root / "vae")["comfy"]
    te = make_tiny_text_encoders(root / "te")
    encoder = TextEncoder.load(te["qwen_file"], te["clip_file"], comfy_root=te["comfy_root"], text_dim=32, pooled_dim=16)
    return {"vae_path": vae_path, "vae": load_vae(vae_path), "te": te, "encoder": encoder}


@pytest.fixture
def dataset(tmp_path):
    """The tiny dataset: 3 clips of 5 frames, 1 image (32x32), a random-bytes and an empty video."""
    return load_dataset_config(make_tiny_dataset(tmp_path, n_videos=3, n_images=1, frames=5, size=(32, 32),
                                                 corrupt=True))


def items_by_stem(config):
    return {i.stem: i for spec in config.datasets for i in collect_items(spec) if i.ok}


# --- names and files ------------------------------------------------------------------------------

def test_cache_names_are_musubis(dataset, tmp_path):
    items = items_by_stem(dataset)
    assert latent_cache_path(items["clip0"]) == tmp_path / "cache/videos/clip0_00000-005_0032x0032_kandinsky5.safetensors"
    assert latent_cache_path(items["image0"]) == tmp_path / "cache/images/image0_0032x0032_kandinsky5.safetensors"
    assert text_cache_path(items["clip0"]) == tmp_path / "cache/videos/clip0_kandinsky5_te.safetensors"
    # musubi's training side parses the names back: size, then frame window, then the stem
    tokens = latent_cache_path(items["clip0"]).name.split("_")
    assert tokens[-2] == "0032x0032" and tokens[-3].split("-") == ["00000", "005"] and tokens[:-3] == ["clip0"]


def test_latent_file_round_trip_with_musubi_keys(tmp_path):
    latent, cond = torch.randn(16, 3, 4, 6), torch.randn(16, 1, 4, 6)
    path = save_latent_cache(tmp_path / "a.safetensors", latent, image_latent=cond, scaling_factor=0.476986,
                             metadata={"width": 48, "height": 32})
    header, meta = read_safetensors_header(path)
    assert set(header) == {"latents_3x4x6_float32", "latents_image_1x4x6_float32", "vae_scaling_factor"}
    assert meta == {"architecture": "kandinsky5", "format_version": "1.0.1", "width": "48", "height": "32"}
    back = load_latent_cache(path)
    assert torch.equal(back["latent"], latent) and torch.equal(back["image_latent"], cond)
    assert back["scaling_factor"] == pytest.approx(0.476986)
    with pytest.raises(ValueError, match=r"b\.safetensors: latents has NaN"):
        save_latent_cache(tmp_path / "b.safetensors", torch.full((16, 1, 2, 2), float("nan")))
    assert not (tmp_path / "b.safetensors").exists()


def test_text_file_keeps_only_real_tokens(tmp_path):
    embed, mask = torch.randn(6, 32), torch.tensor([True] * 4 + [False] * 2)
    path = save_text_cache(tmp_path / "t.safetensors", embed, mask, torch.randn(16), caption="a cat")
    header, meta = read_safetensors_header(path)
    assert set(header) == {"text_embeds_float32", "pooled_embed_float32", "attention_mask"}
    assert header["text_embeds_float32"]["shape"] == [4, 32] and header["attention_mask"]["dtype"] == "BOOL"
    assert meta["caption1"] == "a cat" and meta["architecture"] == "kandinsky5" and meta["k5_text_dim"] == "32"
    back = load_text_cache(path)
    assert torch.equal(back["text_embed"], embed[:4]) and back["text_mask"].all() and back["caption"] == "a cat"


def test_musubi_written_caches_load(dataset):
    """A cache as musubi writes it: bf16, 2-frame latents_image (first+last), a padded text mask."""
    item = items_by_stem(dataset)["clip1"]
    item.cache_directory.mkdir(parents=True)
    lat = torch.randn(16, 2, 4, 4).bfloat16()
    save_file({"latents_2x4x4_bfloat16": lat, "latents_image_2x4x4_bfloat16": lat[:, [0, 1]].contiguous(),
               "vae_scaling_factor": torch.tensor(0.476986)}, str(latent_cache_path(item)),
              {"architecture": "kandinsky5", "width": "32", "height": "32", "format_version": "1.0.1", "frame_count": "5"})
    emb = torch.randn(7, 32).bfloat16()
    save_file({"text_embeds_bfloat16": emb, "pooled_embed_bfloat16": torch.randn(16).bfloat16(),
               "attention_mask": torch.tensor([1, 1, 1, 1, 1, 0, 0])}, str(text_cache_path(item)),
              {"architecture": "kandinsky5", "caption1": item.caption, "format_version": "1.0.1"})
    assert cache.latent_cache_problem(item, vae_kind="hunyuan", i2v=True) is None
    assert cache.text_cache_problem(item, content="image2video", text_dim=32, pooled_dim=16) is None
    cached = cache.CachedItem(latent_cache_path(item), text_cache_path(item), item.path, 0, (32, 32), 5, item.caption)
    sample = load_cached_item(cached)
    assert torch.equal(sample["image_latent"], lat[:, :1]) and torch.equal(sample["text_embed"], emb[:5])


# --- building the caches --------------------------------------------------------------------------

def test_cache_latents_encodes_every_usable_item_and_lists_the_broken_ones(dataset, models, tmp_path):
    vae, calls = models["vae"], []
    report = cache.cache_latents(dataset, vae, i2v=True, batch_size=2, progress=lambda *a: calls.append(a))
    assert (report.cached, report.skipped, report.stopped) == (4, 0, False)
    assert sorted(os.path.basename(p) for p, _ in report.failed) == ["broken.mp4", "empty.mp4"]
    assert [c[:2] for c in calls] == [(k, 4) for k in range(1, 5)] and calls[0][2].startswith("cached: ")

    items = items_by_stem(dataset)
    got = load_latent_cache(latent_cache_path(items["clip2"]))
    pixels = load_item_pixels(items["clip2"])[None]                              # (1, 3, 5, 32, 32)
    assert got["latent"].shape == (16, 2, 4, 4)
    assert torch.allclose(got["latent"], vae.encode(pixels)[0], atol=1e-5)
    assert torch.allclose(got["image_latent"], vae.encode(pixels[:, :, :1])[0], atol=1e-5)
    assert got["metadata"]["frame_count"] == "5" and got["metadata"]["k5_i2v"] == "true"
    assert load_latent_cache(latent_cache_path(items["image0"]))["latent"].shape == (16, 1, 4, 4)
    failures = json.loads((tmp_path / "cache/videos" / cache.FAILURES_FILE).read_text())
    assert {os.path.basename(r["path"]) for r in failures} == {"broken.mp4", "empty.mp4"}


def test_skip_existing_keeps_valid_caches_and_rebuilds_stale_or_broken_ones(dataset, models, tmp_path):
    vae = models["vae"]
    cache.cache_latents(dataset, vae)
    again = cache.cache_latents(dataset, vae, skip_existing=True)
    assert (again.cached, again.skipped) == (0, 4)

    items = items_by_stem(dataset)
    truncated = latent_cache_path(items["clip0"])
    truncated.write_bytes(truncated.read_bytes()[:-100])
    latent_cache_path(items["image0"]).write_bytes(b"")
    clip1 = tmp_path / "videos/clip1.mp4"
    os.utime(clip1, ns=(clip1.stat().st_atime_ns, clip1.stat().st_mtime_ns + 10**9))   # a re-edited source
    assert "truncated safetensors file" in cache.latent_cache_problem(items["clip0"])
    assert "built from an older version of clip1.mp4" in cache.latent_cache_problem(items["clip1"])
    rebuilt = cache.cache_latents(dataset, vae, skip_existing=True)
    assert (rebuilt.cached, rebuilt.skipped) == (3, 1)
    assert all(cache.latent_cache_problem(i) is None for i in items.values())

    assert cache.latent_cache_problem(items["clip2"], i2v=True).endswith(
        "no latents_image (I2V first-frame condition); rebuild with an I2V task")
    bigger = dataset_config_from_dict({"datasets": [{"image_directory": str(tmp_path / "images"), "resolution": 48,
                                                     "cache_directory": str(tmp_path / "cache/images")}]})
    image = collect_items(bigger.datasets[0])[0]                                 # same name, another bucket
    assert latent_cache_path(image) == latent_cache_path(items["image0"])
    assert "latent shape [(16, 1, 4, 4)], expected [16, 1, 6, 6] for bucket (48, 48)" in cache.latent_cache_problem(image)


def test_should_stop_ends_the_run_between_batches(dataset, models):
    report = cache.cache_latents(dataset, models["vae"], should_stop=lambda: True)
    assert report.stopped and report.cached == 0 and len(report.failed) == 2
    seen = []
    report = cache.cache_latents(dataset, models["vae"], progress=lambda d, t, i: seen.append(d),
                                 should_stop=lambda: len(seen) >= 2)
    assert report.stopped and report.cached == 2
    asked = []                                                                   # 1st: between batches,
    report = cache.cache_latents(dataset, models["vae"], should_stop=lambda: asked.append(1) or len(asked) > 1)
    assert report.stopped and report.cached == 0 and len(asked) == 2             # 2nd: inside the VAE


def test_text_caches_hold_the_encoders_output_once_per_source(dataset, models):
    encoder = models["encoder"]
    report = cache.cache_text_encoder_outputs(dataset, encoder, content="image2video", batch_size=3)
    assert (report.cached, report.skipped, len(report.failed)) == (4, 0, 2)
    item = items_by_stem(dataset)["clip2"]
    alone = encoder.encode([item.caption], content="image2video")
    got = load_text_cache(text_cache_path(item))
    n = int(alone.text_mask.sum())
    assert got["text_embed"].shape == (n, 32)
    assert torch.allclose(got["text_embed"], alone.text_embed[0, :n], atol=1e-5)
    assert torch.allclose(got["pooled"], alone.pooled[0], atol=1e-5)
    assert got["metadata"]["k5_content"] == "image2video"

    item.path.with_suffix(".txt").write_text("a new caption")
    again = cache.cache_text_encoder_outputs(dataset, encoder, content="image2video", skip_existing=True)
    assert (again.cached, again.skipped) == (1, 3)
    other = cache.cache_text_encoder_outputs(dataset, encoder, content="video", skip_existing=True)
    assert (other.cached, other.skipped) == (4, 0)                               # another prompt template


# --- reading them for training --------------------------------------------------------------------

def test_list_cached_items_pairs_caches_and_names_what_is_missing_or_unfit(dataset, models):
    with pytest.raises(CacheError, match=r"clip0_00000-005_0032x0032_kandinsky5\.safetensors: missing"):
        list_cached_items(dataset)
    cache.cache_latents(dataset, models["vae"])
    with pytest.raises(CacheError) as e:
        list_cached_items(dataset)
    assert "clip0_kandinsky5_te.safetensors: missing" in str(e.value)
    assert "run python -m k5core.cache_text_encoder_outputs --dataset_config" in str(e.value)
    assert "cache_latents" not in str(e.value)

    cache.cache_text_encoder_outputs(dataset, models["encoder"], content="video")
    items = list_cached_items(dataset, task="k5-tiny-t2v")                       # broken videos left out
    assert [(i.source.name, i.bucket_key) for i in items] == [
        ("clip0.mp4", (32, 32, 5)), ("clip1.mp4", (32, 32, 5)), ("clip2.mp4", (32, 32, 5)), ("image0.png", (32, 32, 1))]
    with pytest.raises(CacheError, match=r"text embedding width 32, this task needs 3584"):
        list_cached_items(dataset, task="k5-lite-t2v-5s-sd")
    with pytest.raises(CacheError, match=r"no latents_image"):
        list_cached_items(dataset, task="k5-tiny-i2v")

    batch = collate_cached([load_cached_item(i) for i in items[:3]])
    assert batch["latent"].shape == (3, 16, 2, 4, 4) and "image_latent" not in batch
    lengths = [load_cached_item(i)["text_embed"].shape[0] for i in items[:3]]
    assert batch["text_embed"].shape == (3, max(lengths), 32)
    assert batch["text_mask"].sum(1).tolist() == lengths and batch["pooled"].shape == (3, 16)


# --- the commands ---------------------------------------------------------------------------------

def test_both_commands_end_to_end(dataset, models, capsys, tmp_path):
    toml, te = dataset.source, models["te"]
    args = ["--dataset_config", toml, "--vae", str(models["vae_path"]), "--task", "k5-tiny-i2v", "--device", "cpu",
            "--vae_tiling", "--vae_spatial_tile_sample_min_size", "64", "--vae_chunk_size", "9"]
    assert latents_cli.main(args) == 0
    out, err = capsys.readouterr()
    assert "latent caches: cached 4, skipped 0 (already cached), failed 2" in out
    assert "failed: " in out and "empty.mp4: empty file (0 bytes)" in out
    assert "[cache latents] 4/4 cached: " in err

    text_args = ["--dataset_config", toml, "--text_encoder_qwen", str(te["qwen_file"]), "--text_encoder_clip",
                 str(te["clip_file"]), "--comfy_root", str(te["comfy_root"]), "--task", "k5-tiny-i2v",
                 "--batch_size", "2"]
    assert text_cli.main(text_args) == 0
    assert "text encoder caches: cached 4, skipped 0 (already cached), failed 2" in capsys.readouterr().out

    items = list_cached_items(dataset, task="k5-tiny-i2v")
    sample = load_cached_item(items[0])
    assert sample["latent"].shape == (16, 2, 4, 4) and sample["image_latent"].shape == (16, 1, 4, 4)
    assert sample["pooled"].shape == (16,) and sample["text_embed"].shape[1] == 32

    assert latents_cli.main(args + ["--skip_existing"]) == 0
    assert "cached 0, skipped 4" in capsys.readouterr().out


def test_commands_fail_only_when_nothing_is_usable(tmp_path, models, capsys):
    toml = make_tiny_dataset(tmp_path, n_videos=0, n_images=0, corrupt=True)
    assert latents_cli.main(["--dataset_config", str(toml), "--vae", str(models["vae_path"]), "--task", "k5-tiny-t2v"]) == 1
    out, err = capsys.readouterr()
    assert "cached 0, skipped 0 (already cached), failed 2" in out and "error: no usable latent caches" in err

    (tmp_path / "bad.toml").write_text('[[datasets]]\nvideo_directory = "videos"\nnum_repeats = 0\n')
    with pytest.raises(SystemExit) as e:
        latents_cli.main(["--dataset_config", str(tmp_path / "bad.toml"), "--vae", str(models["vae_path"])])
    assert e.value.code == 2
    assert "bad.toml line 3: [[datasets]] #1 key 'num_repeats' must be >= 1, got 0" in capsys.readouterr().err
