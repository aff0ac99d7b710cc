"""The ComfyUI nodes, called as ComfyUI calls them, on tiny model files in temp model folders.

Nodes run through node_harness.call, which checks inputs and outputs as ComfyUI's executor does.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import nodes
from node_harness import MAPPINGS, SIZE, SOCKETS, TINY, is_latent, call, decode, encode, loaders, sample
from nodes import comfy
from nodes.cache import CACHE, EMBEDS, LoraSpec
from nodes.encode import Embeds


@pytest.fixture(autouse=True)
def folders(models_dir, tmp_path, monkeypatch):
    """ComfyUI absent: model folders from $K5_MODELS_DIR, outputs into a fresh $K5_OUTPUT_DIR."""
    monkeypatch.setenv(comfy.MODELS_ENV, str(models_dir))
    monkeypatch.setenv(comfy.OUTPUT_ENV, str(tmp_path / "output"))
    return tmp_path / "output"


def test_every_node_declares_a_valid_classic_interface():
    assert set(MAPPINGS) >= {"K5ModelLoader", "K5MemorySettings", "K5LoRALoader", "K5TextEncoderLoader",
                             "K5TextEncode", "K5VAELoader", "K5VAEEncode", "K5VAEDecode", "K5Sampler", "K5SaveVideo"}
    for name, cls in MAPPINGS.items():
        assert name.startswith("K5") and cls.__name__ == name
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[name].startswith("K5 ")
        assert cls.CATEGORY == "Kandinsky 5" and cls.DESCRIPTION
        assert callable(getattr(cls, cls.FUNCTION))
        assert len(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)) == len(cls.RETURN_TYPES)
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"}
        for section in ("required", "optional"):
            for inp, value in spec.get(section, {}).items():
                kind = value[0]
                assert isinstance(kind, list) or kind in SOCKETS or kind == "K5_DATASET", \
                    f"{name}.{inp}: unknown type {kind!r}"
                if len(value) > 1:
                    assert isinstance(value[1], dict)
                if isinstance(kind, list) and "default" in value[1]:
                    assert value[1]["default"] in kind, f"{name}.{inp}: default not in its list"


def test_model_lists_show_files_and_model_folders_but_not_their_shards():
    te = comfy.model_names("text_encoders", folders=True)
    assert TINY["qwen"] in te and TINY["clip"] in te and TINY["clip_folder"] in te
    assert not any(n.startswith(TINY["clip_folder"] + "/") for n in te)
    vae = comfy.model_names("vae", folders=True)
    assert {"hunyuan_diffusers", "hunyuan_original", "flux_vae_diffusers", TINY["hunyuan"], TINY["flux"]} <= set(vae)
    assert not any("/" in n for n in vae)
    assert comfy.model_names("loras") == [TINY["lora"]]
    with pytest.raises(FileNotFoundError, match="not found; looked in"):
        comfy.model_path("vae", "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="not found"):
        comfy.model_path("vae", "../text_encoders/" + TINY["clip"])   # no escaping the folder


def test_loaders_are_light_and_check_their_files(models_dir, tmp_path, monkeypatch):
    from k5core.loading import CheckpointError
    before = sum(CACHE.loads.values())
    model, te, vae = loaders()
    assert model.task == "k5-tiny-t2v" and Path(model.path).is_file()
    assert Path(te.qwen).is_file() and Path(te.clip).is_file() and Path(vae.path).is_file()
    assert sum(CACHE.loads.values()) == before                      # nothing loaded yet
    with pytest.raises(CheckpointError, match="do not fit task k5-lite-t2v-5s-sd"):
        MAPPINGS["K5ModelLoader"]().load(TINY["t2v"], "k5-lite-t2v-5s-sd", "auto", "none", "sdpa")
    wrong = tmp_path / "models"
    (wrong / "diffusion_models").mkdir(parents=True)
    shutil.copy(models_dir / "vae" / TINY["hunyuan"], wrong / "diffusion_models" / "oops.safetensors")
    monkeypatch.setenv(comfy.MODELS_ENV, str(wrong))
    with pytest.raises(CheckpointError, match="oops.safetensors: this looks like a VAE"):
        call("K5ModelLoader", model_name="oops.safetensors", task="auto", dtype="auto", fp8="none", attention="sdpa")


# ----------------------------------------------------------------------------- graphs
def test_t2v_graph_runs_node_to_node_to_an_mp4(folders):
    from k5core.media import probe_video
    model, te, vae = loaders()
    embeds = encode(te)
    assert embeds.positive.text_embed.shape[-1] == 32 and embeds.negative is not None
    latent = sample(model, embeds, seed=3)
    assert tuple(latent["samples"].shape) == (1, 16, 2, 4, 4) and latent["task"] == "k5-tiny-t2v"
    frames = decode(vae, latent)
    assert tuple(frames.shape) == (5, 32, 32, 3) and float(frames.std()) > 0.01
    (path,) = call("K5SaveVideo", images=frames, filename_prefix="K5/t2v", fps=24.0, crf=18,
                   prompt={"1": {"class_type": "K5Sampler"}})
    out = MAPPINGS["K5SaveVideo"]().save(frames, "K5/t2v", 24.0, 18)
    assert Path(path) == folders / "K5" / "t2v_00001_.mp4"
    assert out["ui"]["images"] == [{"filename": "t2v_00002_.mp4", "subfolder": "K5", "type": "output"}]
    info = probe_video(path)
    assert (info.frames, info.width, info.height) == (5, 32, 32) and abs(info.fps - 24) < 1e-6


def test_sampler_is_seeded_and_reuses_the_cached_model():
    model, te, _ = loaders()
    embeds = encode(te)
    a = sample(model, embeds, seed=11)["samples"]
    loads = sum(CACHE.loads.values())
    b = sample(model, embeds, seed=11)["samples"]
    c = sample(model, embeds, seed=12)["samples"]
    assert sum(CACHE.loads.values()) == loads                       # re-queue: nothing read from disk
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-3


def test_i2v_graph_keeps_the_encoded_first_frame():
    model, te, vae = loaders("i2v")
    g = torch.Generator().manual_seed(0)
    image = torch.rand((1, 40, 48, 3), generator=g)                 # resized to cover 32x32, centre-cropped
    (start,) = call("K5VAEEncode", vae=vae, image=image, **SIZE, mode="image")
    assert tuple(start["samples"].shape) == (1, 16, 1, 4, 4) and start["task"] is None
    embeds = encode(te, "the fox turns its head", content="image2video")
    latent = sample(model, embeds, image_latent=start)
    assert torch.equal(latent["samples"][:, :, :1], start["samples"])
    frames = decode(vae, latent)
    assert tuple(frames.shape) == (5, 32, 32, 3)
    with pytest.raises(ValueError, match="image-to-video"):
        sample(model, embeds)


def test_t2i_graph_makes_one_image_with_the_flux_vae():
    model, te, vae = loaders("t2i", "flux")
    embeds = encode(te, "a red apple on a table", content="image")
    latent = sample(model, embeds, frames=121)                       # image tasks ignore frames
    assert tuple(latent["samples"].shape) == (1, 16, 1, 4, 4) and latent["kind"] == "flux"
    assert tuple(decode(vae, latent).shape) == (1, 32, 32, 3)
    (_, _, hunyuan) = loaders()
    with pytest.raises(ValueError, match="belongs to the flux VAE"):
        decode(hunyuan, latent)


def test_vae_encode_video_mode_takes_a_clip():
    _, _, vae = loaders()
    clip = torch.rand((5, 32, 32, 3))
    (latent,) = call("K5VAEEncode", vae=vae, image=clip, width=0, height=0, mode="video")
    assert tuple(latent["samples"].shape) == (1, 16, 2, 4, 4)
    with pytest.raises(ValueError, match="4k\\+1 frames"):
        call("K5VAEEncode", vae=vae, image=clip[:4], width=0, height=0, mode="video")
    with pytest.raises(ValueError, match="give both"):
        call("K5VAEEncode", vae=vae, image=clip, width=32, height=0, mode="image")


def test_sampler_errors_name_the_setting():
    model, te, _ = loaders()
    embeds = encode(te)
    with pytest.raises(ValueError, match="width: task k5-tiny-t2v needs a positive multiple of 16"):
        sample(model, embeds, width=40)
    with pytest.raises(ValueError, match="frames: the video VAE needs 4k\\+1 frames"):
        sample(model, embeds, frames=6)
    wide = Embeds(*(e.__class__(torch.zeros(1, 3, 3584), torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, 768))
                    for e in (embeds.positive, embeds.negative)), "video", "p", "n")
    with pytest.raises(ValueError, match="text width 3584 .* needs 32 and 16"):
        sample(model, wide)
    (start,) = call("K5VAEEncode", vae=loaders()[2], image=torch.rand((1, 32, 32, 3)), **SIZE, mode="image")
    t2i = loaders("t2i")[0]
    with pytest.raises(ValueError, match="image_latent: task k5-tiny-t2i takes no image"):
        sample(t2i, encode(te, "an apple", "image"), image_latent=start)


def test_start_latent_sets_the_size():
    model, te, vae = loaders()
    (clip,) = call("K5VAEEncode", vae=vae, image=torch.rand((9, 48, 32, 3)), width=0, height=0, mode="video")
    latent = sample(model, encode(te), latent=clip, width=16, height=16, frames=1)
    assert tuple(latent["samples"].shape) == (1, 16, 3, 6, 4)


# ----------------------------------------------------------------------------- text encoder cache
def test_text_encode_caches_by_text_and_unloads_on_request():
    _, te, _ = loaders()
    EMBEDS.clear()
    CACHE.unload("text")
    first = encode(te, "a cat on a sofa", after="unload")
    assert CACHE.loaded("text") == []                                # unloaded right after
    loads = CACHE.loads[("text", te)]
    again = encode(te, "a cat on a sofa", after="unload")
    assert again is first and CACHE.loads[("text", te)] == loads     # re-queue: no encoder load
    other = encode(te, "a dog on a sofa", after="keep")
    assert CACHE.loads[("text", te)] == loads + 1 and CACHE.loaded("text") == [te]
    assert not torch.equal(other.positive.text_embed, first.positive.text_embed)
    assert torch.equal(other.negative.text_embed, first.negative.text_embed)
    assert first.positive.text_embed.device.type == "cpu"


def test_text_encode_image_edit_reads_the_source_image():
    _, te, _ = loaders()
    image = torch.rand(1, 40, 60, 3, generator=torch.Generator().manual_seed(0))    # ComfyUI IMAGE
    args = dict(text_encoder=te, prompt="a red fox runs through snow", negative_prompt="", content="image_edit",
                after="keep")
    (with_image,) = call("K5TextEncode", **args, image=image)
    assert with_image.negative.lengths[0] > 0                         # an empty negative prompt works
    (again,) = call("K5TextEncode", **args, image=image.clone())
    assert again is with_image                                        # cached by the pixels
    (other,) = call("K5TextEncode", **args, image=image.flip(1))
    assert not torch.equal(other.positive.text_embed, with_image.positive.text_embed)
    with pytest.raises(ValueError, match="no tokens left"):           # without the image: text only
        call("K5TextEncode", **args)


def test_text_encoder_loader_takes_hf_folders_and_tokenizer_paths(models_dir):
    (te,) = call("K5TextEncoderLoader", qwen=TINY["qwen"], clip=TINY["clip_folder"], quantization="none",
                 dtype="fp32", device="cpu", qwen_tokenizer=str(models_dir.parent / "comfy/text_encoders/qwen25_tokenizer"),
                 clip_tokenizer="")
    embeds = encode(te, "a folder-loaded clip", after="unload")
    assert embeds.positive.pooled.shape == (1, 16)
    with pytest.raises(FileNotFoundError, match="qwen_tokenizer: .* is not a folder"):
        call("K5TextEncoderLoader", qwen=TINY["qwen"], clip=TINY["clip"], quantization="none", dtype="auto",
             device="auto", qwen_tokenizer="/no/such/folder")


# ----------------------------------------------------------------------------- LoRA and memory
def test_lora_chain_changes_the_output_and_comes_off_exactly():
    model, te, _ = loaders()
    embeds = encode(te)
    base = sample(model, embeds, seed=5)["samples"]
    (one,) = call("K5LoRALoader", model=model, lora_name=TINY["lora"], strength=1.0, mode="merge")
    with_lora = sample(one, embeds, seed=5)["samples"]
    assert (with_lora - base).abs().max() > 1e-3
    (two,) = call("K5LoRALoader", model=one, lora_name=TINY["lora"], strength=-1.0, mode="merge")
    assert len(two.loras) == 2
    cancelled = sample(two, embeds, seed=5)["samples"]               # +1 and -1: the base model again
    assert (cancelled - base).abs().max() < 1e-4
    (unmerged,) = call("K5LoRALoader", model=model, lora_name=TINY["lora"], strength=1.0, mode="unmerged")
    assert (sample(unmerged, embeds, seed=5)["samples"] - with_lora).abs().max() < 1e-4
    (half,) = call("K5LoRALoader", model=model, lora_name=TINY["lora"], strength=0.5, mode="unmerged")
    halfway = sample(half, embeds, seed=5)["samples"]                # strength change, no re-read
    assert (halfway - base).abs().max() > 1e-4 and (halfway - with_lora).abs().max() > 1e-4
    assert torch.equal(sample(model, embeds, seed=5)["samples"], base)   # all LoRAs off: bit-exact
    assert call("K5LoRALoader", model=model, lora_name="none", strength=1.0, mode="auto")[0] is model
    (from_socket,) = call("K5LoRALoader", model=model, lora_name="none", strength=1.0, mode="auto",
                          lora=str(comfy.model_path("loras", TINY["lora"])))
    assert from_socket.loras == (LoraSpec(one.loras[0].path, 1.0, "auto"),)


def test_memory_settings_convert_a_loaded_model_to_fp8_in_place():
    from k5core.fp8 import FP8Linear
    model, te, _ = loaders()
    embeds = encode(te)
    base = sample(model, embeds, seed=9)["samples"]
    (fp8,) = call("K5MemorySettings", model=model, blocks_to_swap=0, activation_offload=False,
                  fp8="e4m3fn_scaled", fp8_scaled_mm=False)
    assert fp8.fp8 == "e4m3fn_scaled" and fp8.load_key != model.load_key
    quantized = sample(fp8, embeds, seed=9)["samples"]
    assert CACHE.loads[("dit", fp8.load_key)] == 0                   # converted, not read from disk
    assert CACHE.loaded("dit") == [fp8.load_key]
    assert any(isinstance(m, FP8Linear) for m in CACHE.dit(fp8).modules())
    rel = (quantized - base).norm() / base.norm()
    assert 0 < rel < 0.1, rel
    with pytest.raises(ValueError, match="blocks_to_swap: task k5-tiny-t2v has 2 visual blocks"):
        call("K5MemorySettings", model=model, blocks_to_swap=3, activation_offload=False, fp8="keep",
             fp8_scaled_mm=False)


@pytest.mark.filterwarnings("ignore:blocks_to_swap=1 on device 'cpu' does nothing")
def test_block_swap_is_switched_per_handle_and_keeps_the_result():
    model, te, _ = loaders()
    embeds = encode(te)
    base = sample(model, embeds, seed=4)["samples"]
    (swapped,) = call("K5MemorySettings", model=model, blocks_to_swap=1, activation_offload=True, fp8="keep",
                      fp8_scaled_mm=False)
    assert swapped.load_key == model.load_key and swapped.activation_offload
    loads = sum(CACHE.loads.values())
    assert torch.equal(sample(swapped, embeds, seed=4)["samples"], base)
    dit = CACHE.dit(swapped)
    assert dit.block_runner.swap.swapped == (1,)                       # the last block lives in CPU memory
    (with_lora,) = call("K5LoRALoader", model=swapped, lora_name=TINY["lora"], strength=1.0, mode="merge")
    assert (sample(with_lora, embeds, seed=4)["samples"] - base).abs().max() > 1e-3
    assert torch.equal(sample(model, embeds, seed=4)["samples"], base)
    assert CACHE.dit(model).block_runner is None                       # swap off again, same model
    assert sum(CACHE.loads.values()) == loads



def test_compile_is_switched_per_handle_without_a_reload(monkeypatch):
    from k5core.dit import K5DiT
    compile_blocks = K5DiT.compile_blocks
    monkeypatch.setattr(K5DiT, "compile_blocks",   # dynamo's eager backend: the mechanism, fast on CPU
                        lambda self, enabled=True: compile_blocks(self, enabled, backend="eager"))
    model, te, _ = loaders()
    embeds = encode(te)
    base = sample(model, embeds, seed=5)["samples"]
    (fast,) = call("K5MemorySettings", model=model, blocks_to_swap=0, activation_offload=False, fp8="keep",
                   fp8_scaled_mm=False, compile=True)
    loads = sum(CACHE.loads.values())
    assert torch.allclose(sample(fast, embeds, seed=5)["samples"], base, atol=1e-5)
    assert all(b._compiled_call_impl is not None for b in CACHE.dit(fast).visual_transformer_blocks)
    sample(model, embeds, seed=5)
    assert all(b._compiled_call_impl is None for b in CACHE.dit(model).visual_transformer_blocks)
    assert sum(CACHE.loads.values()) == loads


# ----------------------------------------------------------------------------- inside ComfyUI


def test_progress_bar_and_cancel_between_steps(fake_comfyui):
    model, te, _ = loaders()
    embeds = encode(te)
    sample(model, embeds, steps=3)
    assert fake_comfyui.state.steps == [(1, 3), (2, 3), (3, 3)]
    assert fake_comfyui.state.previews == [("HunyuanVideo", (1, 16, 2, 4, 4))] * 3   # x0 of every step
    fake_comfyui.state.steps.clear()
    fake_comfyui.state.interrupt_after = 1
    with pytest.raises(fake_comfyui.mm.InterruptProcessingException):
        sample(model, embeds, steps=3)
    assert fake_comfyui.state.steps == [(1, 3)]                       # stopped before step 2
    assert fake_comfyui.state.interrupted is False                    # flag cleared, as ComfyUI does


def test_comfyui_unload_request_frees_our_models(fake_comfyui):
    model, te, _ = loaders()
    sample(model, encode(te, after="keep"))
    assert CACHE.loaded("dit") and CACHE.loaded("text")
    assert comfy.on_unload_request(CACHE.clear)
    comfy.free_comfy_models()                                        # our own call: ComfyUI's models only
    assert fake_comfyui.state.unloads == 1 and CACHE.loaded("dit")
    comfy.free_comfy_memory(5000, torch.device("cuda", 0))           # before a GPU load: only what it needs
    comfy.free_comfy_memory(5000, torch.device("cpu"))
    assert fake_comfyui.state.freed == [(6000, torch.device("cuda", 0))]
    fake_comfyui.mm.unload_all_models()                              # POST /free, OOM, other nodes
    assert fake_comfyui.state.unloads == 2
    assert CACHE.loaded("dit") == [] and CACHE.loaded("text") == [] and len(EMBEDS) == 0
    latent = sample(model, encode(te))                               # handles reload on demand
    assert is_latent(latent)


def test_save_video_refuses_paths_outside_the_output_folder():
    with pytest.raises(ValueError, match="outside the output folder"):
        call("K5SaveVideo", images=torch.rand((1, 16, 16, 3)), filename_prefix="../escape", fps=24.0, crf=18)


def test_send_event_is_a_no_op_without_a_server():
    assert comfy.send_event("k5.test", {"x": 1}) is False
