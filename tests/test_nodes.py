"""The ComfyUI nodes, called as ComfyUI calls them, on tiny model files in temp model folders.

`call(node, **inputs)` is what ComfyUI's executor does for one node: check the inputs against
INPUT_TYPES (required present, nothing unknown, combo values listed, numbers in range, own socket
types carrying the right objects), call FUNCTION, and check the outputs against RETURN_TYPES.
test_workflows.py reuses `call`, `tiny_models` and `TINY`.
"""
from __future__ import annotations

import math
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

import nodes
from nodes import comfy
from nodes.cache import CACHE, EMBEDS, LoraSpec, ModelHandle, TextEncoderHandle, VAEHandle
from nodes.encode import Embeds

MAPPINGS = nodes.NODE_CLASS_MAPPINGS
SIZE = dict(width=32, height=32)          # the smallest size the tiny tasks take: fast
STEPS = 2
TINY = {  # dropdown names of the tiny files under <root>/models
    "t2v": "k5-tiny-t2v-s0.safetensors", "i2v": "k5-tiny-i2v-s0.safetensors", "t2i": "k5-tiny-t2i-s0.safetensors",
    "qwen": "qwen_2.5_vl_7b_tiny.safetensors", "clip": "clip_l_tiny.safetensors", "clip_folder": "clip-vit-tiny",
    "hunyuan": "hunyuan_video_vae_tiny.safetensors", "flux": "ae_tiny.safetensors", "lora": "tiny_t2v_lora.safetensors",
}


# ----------------------------------------------------------------------------- tiny model folders
def tiny_models(root: Path) -> Path:
    """Write every tiny model once into `root` (a miniature ComfyUI install: comfy/<tokenizers> and
    models/<folders>); returns the models folder. Later calls reuse the files."""
    models, done = root / "models", root / "models.done"
    if not done.exists():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _write_tiny_models(root, models)
        finally:
            torch.set_num_threads(threads)
        done.write_text("ok")
    return models


def _write_tiny_models(root: Path, models: Path) -> None:
    from k5core.lora import LoRANetwork
    from k5core.loading import load_dit
    from k5core.tiny.dit import write_tiny_dit
    from k5core.tiny.text import make_tiny_text_encoders
    from k5core.tiny.vae import make_tiny_flux_vae, make_tiny_hunyuan_vae

    text = make_tiny_text_encoders(root)
    shutil.copytree(text["clip_folder"], models / "text_encoders" / TINY["clip_folder"])
    for task in ("k5-tiny-t2v", "k5-tiny-i2v", "k5-tiny-t2i"):
        write_tiny_dit(models / "diffusion_models", task)
    make_tiny_hunyuan_vae(models / "vae")
    make_tiny_flux_vae(models / "vae")
    net = LoRANetwork(load_dit(models / "diffusion_models" / TINY["t2v"]), rank=4, alpha=4)
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        for a in net.adapters().values():
            a.lora_up.weight.copy_(torch.randn(a.lora_up.weight.shape, generator=g) * 0.5)
    net.save(models / "loras" / TINY["lora"])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models are all per-op overhead: one thread is faster, and spares a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    return tiny_models(tmp_path_factory.getbasetemp() / "k5-tiny-models")


@pytest.fixture(autouse=True)
def folders(models_dir, tmp_path, monkeypatch):
    """ComfyUI absent: model folders from $K5_MODELS_DIR, outputs into a fresh $K5_OUTPUT_DIR."""
    monkeypatch.setenv(comfy.MODELS_ENV, str(models_dir))
    monkeypatch.setenv(comfy.OUTPUT_ENV, str(tmp_path / "output"))
    return tmp_path / "output"


# ----------------------------------------------------------------------------- calling nodes
def _is_image(v) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape[-1] == 3 and v.dtype == torch.float32 \
        and float(v.min()) >= 0.0 and float(v.max()) <= 1.0


def _is_latent(v) -> bool:
    s = v.get("samples") if isinstance(v, dict) else None
    return isinstance(s, torch.Tensor) and s.dim() == 5 and s.shape[1] == 16 and v.get("kind") in ("hunyuan", "flux")


SOCKETS = {
    "K5_MODEL": lambda v: isinstance(v, ModelHandle),
    "K5_TEXT_ENCODER": lambda v: isinstance(v, TextEncoderHandle),
    "K5_VAE": lambda v: isinstance(v, VAEHandle),
    "K5_EMBEDS": lambda v: isinstance(v, Embeds),
    "K5_LATENT": _is_latent,
    "K5_LORA": lambda v: isinstance(v, (str, Path)),
    "IMAGE": _is_image,
    "STRING": lambda v: isinstance(v, str),
    "INT": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "FLOAT": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "BOOLEAN": lambda v: isinstance(v, bool),
}


def check_inputs(cls, inputs: dict) -> None:
    """Validate inputs as ComfyUI does before it runs a node (plus the socket object types)."""
    spec = cls.INPUT_TYPES()
    required, optional, hidden = spec.get("required", {}), spec.get("optional", {}), spec.get("hidden", {})
    missing = required.keys() - inputs.keys()
    unknown = inputs.keys() - required.keys() - optional.keys() - hidden.keys()
    assert not missing, f"{cls.__name__}: missing inputs {sorted(missing)}"
    assert not unknown, f"{cls.__name__}: unknown inputs {sorted(unknown)}"
    for name, value in inputs.items():
        if name in hidden:
            continue
        kind, opts = ((required.get(name) or optional.get(name)) + ({},))[:2]
        if isinstance(kind, list):
            assert value in kind, f"{cls.__name__}.{name}: {value!r} is not one of {kind}"
            continue
        assert SOCKETS[kind](value), f"{cls.__name__}.{name}: {type(value).__name__} is not a {kind}"
        if kind in ("INT", "FLOAT"):
            assert opts.get("min", -math.inf) <= value <= opts.get("max", math.inf), \
                f"{cls.__name__}.{name}: {value} outside [{opts.get('min')}, {opts.get('max')}]"


def call(node: str, **inputs):
    """Run one node as ComfyUI would; returns its outputs (a tuple), checked against RETURN_TYPES."""
    cls = MAPPINGS[node]
    check_inputs(cls, inputs)
    out = getattr(cls(), cls.FUNCTION)(**inputs)
    if isinstance(out, dict):
        assert cls.OUTPUT_NODE and "ui" in out, f"{node}: a dict result must be an output node's ui"
        out = out.get("result", ())
    assert isinstance(out, tuple) and len(out) == len(cls.RETURN_TYPES), f"{node}: returned {type(out).__name__}"
    for value, kind in zip(out, cls.RETURN_TYPES):
        assert SOCKETS[kind](value), f"{node}: output {type(value).__name__} is not a {kind}"
    return out


def loaders(task="t2v", vae="hunyuan", fp8="none"):
    (model,) = call("K5ModelLoader", model_name=TINY[task], task="auto", dtype="auto", fp8=fp8, attention="sdpa")
    (te,) = call("K5TextEncoderLoader", qwen=TINY["qwen"], clip=TINY["clip"], quantization="none",
                 dtype="auto", device="auto")
    (v,) = call("K5VAELoader", vae_name=TINY[vae], dtype="auto")
    return model, te, v


def encode(te, prompt="a red fox runs through snow", content="video", after="offload"):
    return call("K5TextEncode", text_encoder=te, prompt=prompt, negative_prompt="static, blurry",
                content=content, after=after)[0]


def sample(model, embeds, seed=1, frames=5, **kw):
    args = dict(model=model, embeds=embeds, **SIZE, frames=frames, steps=STEPS, guidance=0.0, shift=0.0,
                seed=seed, magcache=False)
    return call("K5Sampler", **{**args, **kw})[0]


def decode(vae, latent):
    return call("K5VAEDecode", vae=vae, latent=latent, tiling=True, spatial_tile=256, spatial_overlap=64,
                temporal_chunk=17, temporal_overlap=4)[0]


# ----------------------------------------------------------------------------- the node set
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


# ----------------------------------------------------------------------------- inside ComfyUI
@pytest.fixture
def fake_comfyui(monkeypatch):
    """comfy.model_management and comfy.utils as ComfyUI has them, recording what the nodes do."""
    state = types.SimpleNamespace(interrupt_after=None, steps=[], unloads=0, interrupted=False)
    mm = types.ModuleType("comfy.model_management")

    class InterruptProcessingException(Exception):
        pass

    def processing_interrupted():
        return state.interrupted

    def interrupt_current_processing(value=True):
        state.interrupted = value

    def unload_all_models():
        state.unloads += 1

    mm.InterruptProcessingException = InterruptProcessingException
    mm.processing_interrupted = processing_interrupted
    mm.interrupt_current_processing = interrupt_current_processing
    mm.throw_exception_if_processing_interrupted = lambda: None
    mm.unload_all_models = unload_all_models
    mm.soft_empty_cache = lambda force=False: None
    mm.minimum_inference_memory = lambda: 1000
    mm.free_memory = lambda memory_required, device, keep_loaded=(): state.freed.append((memory_required, device))
    state.freed = []
    mm.get_torch_device = lambda: torch.device("cpu")
    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            state.steps.append((value, total))
            if state.interrupt_after is not None and value >= state.interrupt_after:
                state.interrupted = True     # the user presses Cancel during this step

    utils.ProgressBar = ProgressBar
    formats = types.ModuleType("comfy.latent_formats")
    formats.HunyuanVideo = type("HunyuanVideo", (), {})
    formats.Flux = type("Flux", (), {})
    previews = types.ModuleType("latent_preview")

    class Previewer:
        def __init__(self, fmt):
            self.fmt = fmt

        def decode_latent_to_preview_image(self, preview_format, x0):
            state.previews.append((self.fmt, tuple(x0.shape)))
            return ("JPEG", "image", 512)

    previews.get_previewer = lambda device, latent_format: Previewer(type(latent_format).__name__)
    state.previews = []
    monkeypatch.setitem(sys.modules, "comfy.latent_formats", formats)
    monkeypatch.setitem(sys.modules, "latent_preview", previews)
    monkeypatch.setitem(sys.modules, "comfy", types.ModuleType("comfy"))
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    monkeypatch.setitem(sys.modules, "comfy.utils", utils)
    monkeypatch.setattr(comfy, "_unload_callbacks", [])
    return types.SimpleNamespace(state=state, mm=mm)


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
    assert _is_latent(latent)


def test_save_video_refuses_paths_outside_the_output_folder():
    with pytest.raises(ValueError, match="outside the output folder"):
        call("K5SaveVideo", images=torch.rand((1, 16, 16, 3)), filename_prefix="../escape", fps=24.0, crf=18)


def test_send_event_is_a_no_op_without_a_server():
    assert comfy.send_event("k5.test", {"x": 1}) is False
