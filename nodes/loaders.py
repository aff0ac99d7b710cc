"""Loader nodes: DiT, memory settings, text encoders, VAE. They return light handles (nodes.cache);
the weights load when a node first computes with them and stay cached between queue runs."""
from __future__ import annotations

from pathlib import Path

from k5core.attention import BACKENDS
from k5core.loading import inspect_dit
from k5core.tasks import TASKS

from . import comfy
from .cache import DTYPES, FP8_MODES, QUANTIZATIONS, ModelHandle, TextEncoderHandle, VAEHandle

TASK_CHOICES = ["auto"] + [name for name in TASKS if not name.startswith("k5-tiny")]


def _choices(folder: str, folders: bool = False) -> list[str]:
    return comfy.model_names(folder, folders=folders)


class K5ModelLoader:
    DESCRIPTION = ("Kandinsky 5 DiT from models/diffusion_models: official, ComfyUI-repacked or diffusers "
                   "files, optionally stored in fp8. Loads when the sampler first needs it.")
    CATEGORY = comfy.CATEGORY
    RETURN_TYPES = ("K5_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (_choices("diffusion_models", folders=True),
                           {"tooltip": "DiT checkpoint file (or diffusers folder) in models/diffusion_models"}),
            "task": (TASK_CHOICES, {"default": "auto", "tooltip":
                     "auto: from the tensor shapes and the file name (t2v/i2v, 5s/10s, distil, hd...)"}),
            "dtype": (list(DTYPES), {"default": "auto", "tooltip": "compute dtype; auto = bf16 on GPU, fp32 on CPU"}),
            "fp8": (list(FP8_MODES), {"default": "none", "tooltip":
                    "store the blocks' Linear weights in fp8: e4m3fn (one scale per tensor) or e4m3fn_scaled "
                    "(one per output channel, more exact); about half the memory"}),
            "attention": (list(BACKENDS), {"default": "sdpa", "tooltip":
                          "attention kernel; sdpa needs no extra install"}),
        }}

    def load(self, model_name, task, dtype, fp8, attention):
        path = comfy.model_path("diffusion_models", model_name)
        config = inspect_dit(path, None if task == "auto" else task)
        return (ModelHandle(str(path), config.name, dtype, fp8, attention),)


class K5MemorySettings:
    DESCRIPTION = ("Memory and speed settings of a Kandinsky 5 model: block swap (the last N visual blocks live "
                   "in pinned CPU memory and stream to the GPU as they run), activation offload (training), fp8 "
                   "storage of a model loaded in high precision (converted in place, no reload), torch.compile.")
    CATEGORY = comfy.CATEGORY
    RETURN_TYPES = ("K5_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("K5_MODEL",),
            "blocks_to_swap": ("INT", {"default": 0, "min": 0, "max": 60, "tooltip":
                               "visual blocks kept in CPU memory (Lite has 32, Pro 60); 0 = all on the GPU"}),
            "activation_offload": ("BOOLEAN", {"default": False, "tooltip":
                                   "training: keep checkpointed activations in CPU memory (read by the "
                                   "training nodes; sampling keeps no activations, so it has no effect there)"}),
            "fp8": (["keep"] + list(FP8_MODES[1:]), {"default": "keep", "tooltip":
                    "keep: as loaded; otherwise quantize the loaded model's block weights to fp8"}),
            "fp8_scaled_mm": ("BOOLEAN", {"default": False, "tooltip":
                              "fp8 models: use torch._scaled_mm on GPUs that have it (faster, slightly less exact)"}),
        }, "optional": {
            "compile": ("BOOLEAN", {"default": False, "tooltip":
                        "torch.compile the transformer blocks: faster sampling on GPUs after a one-time compile "
                        "(a minute or more; again for each new size)"}),
        }}

    def apply(self, model: ModelHandle, blocks_to_swap, activation_offload, fp8, fp8_scaled_mm, compile=False):
        blocks = model.task_config.dit.num_visual_blocks
        if not 0 <= blocks_to_swap <= blocks:
            raise ValueError(f"blocks_to_swap: task {model.task} has {blocks} visual blocks; swap 0 to "
                             f"{blocks}, got {blocks_to_swap}")
        return (model.with_memory(blocks_to_swap, activation_offload, fp8, fp8_scaled_mm, compile),)


class K5TextEncoderLoader:
    DESCRIPTION = ("Kandinsky 5 text encoders from models/text_encoders: Qwen2.5-VL-7B-Instruct (ComfyUI "
                   "single file, fp8-scaled too, or the Hugging Face folder) and CLIP-L. Tokenizers come from "
                   "the given folders, the model folder, or ComfyUI's own tokenizer folders.")
    CATEGORY = comfy.CATEGORY
    RETURN_TYPES = ("K5_TEXT_ENCODER",)
    RETURN_NAMES = ("text_encoder",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        names = _choices("text_encoders", folders=True)
        return {"required": {
            "qwen": (names, {"tooltip": "qwen_2.5_vl_7b*.safetensors or the Qwen2.5-VL-7B-Instruct folder"}),
            "clip": (names, {"tooltip": "clip_l.safetensors or the openai/clip-vit-large-patch14 folder"}),
            "quantization": (list(QUANTIZATIONS), {"default": "none", "tooltip":
                             "bitsandbytes quantization of Qwen's Linear layers (CUDA)"}),
            "dtype": (list(DTYPES), {"default": "auto", "tooltip": "Qwen dtype; auto = bf16 on GPU, fp32 on CPU"}),
            "device": (["auto", "cpu"], {"default": "auto", "tooltip": "cpu: encode on the CPU, no VRAM used"}),
        }, "optional": {
            "qwen_tokenizer": ("STRING", {"default": "", "tooltip":
                               "folder with the Qwen tokenizer; empty = model folder or ComfyUI's qwen25_tokenizer"}),
            "clip_tokenizer": ("STRING", {"default": "", "tooltip":
                               "folder with the CLIP tokenizer; empty = model folder or ComfyUI's sd1_tokenizer"}),
        }}

    def load(self, qwen, clip, quantization, dtype, device, qwen_tokenizer="", clip_tokenizer=""):
        root = comfy.comfy_root()
        for name, value in (("qwen_tokenizer", qwen_tokenizer), ("clip_tokenizer", clip_tokenizer)):
            if value and not Path(value).is_dir():
                raise FileNotFoundError(f"{name}: {value!r} is not a folder")
        return (TextEncoderHandle(
            str(comfy.model_path("text_encoders", qwen)), str(comfy.model_path("text_encoders", clip)),
            quantization, dtype, device, qwen_tokenizer.strip(), clip_tokenizer.strip(),
            str(root) if root else ""),)


class K5VAELoader:
    DESCRIPTION = ("Kandinsky 5 VAE from models/vae: HunyuanVideo (video models; original .pt, ComfyUI file or "
                   "diffusers folder) or Flux (Lite T2I/I2I).")
    CATEGORY = comfy.CATEGORY
    RETURN_TYPES = ("K5_VAE",)
    RETURN_NAMES = ("vae",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (_choices("vae", folders=True), {"tooltip": "hunyuan_video_vae_bf16.safetensors for video, "
                                                         "ae.safetensors (Flux) for Lite T2I/I2I"}),
            "dtype": (list(DTYPES), {"default": "auto", "tooltip": "auto = bf16 on GPU, fp32 on CPU"}),
        }}

    def load(self, vae_name, dtype):
        return (VAEHandle(str(comfy.model_path("vae", vae_name)), dtype),)


NODE_CLASS_MAPPINGS = {
    "K5ModelLoader": K5ModelLoader,
    "K5MemorySettings": K5MemorySettings,
    "K5TextEncoderLoader": K5TextEncoderLoader,
    "K5VAELoader": K5VAELoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "K5ModelLoader": "K5 Model Loader",
    "K5MemorySettings": "K5 Memory Settings",
    "K5TextEncoderLoader": "K5 Text Encoder Loader",
    "K5VAELoader": "K5 VAE Loader",
}
