"""Kandinsky 5 text encoders: Qwen2.5-VL-7B hidden states and CLIP-L pooled vectors.

The DiT reads each prompt twice:
- Qwen2.5-VL-7B-Instruct (its language model only) reads the prompt wrapped in a chat template
  ("You are a promt engineer. Describe the video in detail. ..."). The template's tokens are cropped
  from the start of the last hidden state; what remains is `text_embed` (B, L, 3584).
- CLIP-L (the ViT-L/14 text tower) reads the bare prompt at 77 tokens; its pooled output (the hidden
  state at the first end-of-text token) is `pooled` (B, 768).

Exactly as the official `kandinsky/models/text_embedders.py`: the template per content type, tokenizing
with `max_length + crop` and truncation, right padding, the Qwen forward on input ids alone (causal
attention with right padding, so a real token never sees a pad), the crop of the first N tokens
(video 129, image2video 132, image 41, image_edit 55 with the Qwen2.5 tokenizer), the mask of the
cropped attention mask; CLIP with padding to 77 and `pooler_output`.

Padding policy: the official code pads every prompt to max_length and masks the pads. We pad on the
right to the longest prompt of the batch after the crop (`pad_to="longest"`, at most max_length) or
to max_length (`pad_to="max_length"`, the official shape). Pad positions are zero and False in
`text_mask`, so a prompt gives the same embeddings alone or in any batch, and the DiT (which masks
text keys) gives the same result for either padding.

Sources: a Hugging Face folder (Qwen/Qwen2.5-VL-7B-Instruct, openai/clip-vit-large-patch14) or one
safetensors file as ComfyUI keeps them in models/text_encoders (`qwen_2.5_vl_7b*.safetensors`,
fp8-scaled variants included, `clip_l.safetensors`). The language model of Qwen2.5-VL is built at load;
its vision tower (`visual.*`) only on the first image_edit encode with a source image; `lm_head` is
never read.

Image editing (I2I) as the official code: each prompt gets `<|vision_start|><|image_pad|><|vision_end|>`
and `<|im_end|>` appended, the source image is halved in size, the Qwen2-VL image processor cuts it into
14x14 patches (pixel_values, image_grid_thw), <|image_pad|> is repeated once per merged 2x2 patch, and
the whole Qwen2.5-VL (vision tower + language model, 3D rotary positions) runs; the crop is the same 55
and nothing is truncated or padded to max_length. An empty (negative) prompt then keeps the image tokens.

Tokenizers are looked up, in this order: the explicit `tokenizer=` path, the model folder itself,
`<comfy_root>/comfy/text_encoders/qwen25_tokenizer` (Qwen) or `<comfy_root>/comfy/sd1_tokenizer` (CLIP),
then the same folders in a ComfyUI install that holds the model file (up to four folders above it).
Nothing is downloaded; the image processor is built in code (QWEN_IMAGE_PROCESSOR).
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import json
import re
from pathlib import Path

import torch
from torch import nn

from .devices import pick_dtype
from .files import read_safetensors_header

# --------------------------------------------------------------------------------------------------
# The official prompt templates and crops
# --------------------------------------------------------------------------------------------------

CONTENT_TYPES = ("video", "image2video", "image", "image_edit")

_VIDEO_GUIDE = (
    "Describe how the camera moves or shakes, describe the zoom and view angle, whether it follows the objects.",
)
_VIDEO_STYLE = (
    "Describe the dynamism of the video and presented actions.",
    "Name the visual style of the video: whether it is a professional footage, user generated content, "
    "some kind of animation, video game or scren content.",
    "Describe the visual effects, postprocessing and transitions if they are presented in the video.",
    "Pay attention to the order of key actions shown in the scene.<|im_end|>",
)
_USER_TURN = "<|im_start|>user\n{}<|im_end|>"

# Verbatim official wording (typos "promt", "scren" included: the crops count these tokens).
PROMPT_TEMPLATES = {
    "video": "\n".join((
        "<|im_start|>system\nYou are a promt engineer. Describe the video in detail.",
        *_VIDEO_GUIDE,
        "Describe the location of the video, main characters or objects and their action.",
        *_VIDEO_STYLE,
        _USER_TURN,
    )),
    "image2video": "\n".join((
        "<|im_start|>system\nYou are a promt engineer. Your task is to create a highly detailed and "
        "effective video description based on a provided input image.",
        *_VIDEO_GUIDE,
        "Describe main characters actions.",
        *_VIDEO_STYLE,
        _USER_TURN,
    )),
    "image": "\n".join((
        "<|im_start|>system\nYou are a promt engineer. Describe the image by detailing the color, shape, "
        "size, texture, quantity, text, spatial relationships of the objects and background:<|im_end|>",
        _USER_TURN,
    )),
    "image_edit": "\n".join((
        "<|im_start|>system\nYou are a promt engineer. Based on the provided source image (first image) "
        "and target image (second image), create an interesting text prompt that can be used together "
        "with the source image to create the target image:<|im_end|>",
        "<|im_start|>user\n{}",
    )),
}

# Official crop_start with the Qwen2.5 tokenizer. The crop is the template prefix (everything before
# the prompt) except for image_edit: its 55 goes 3 tokens past the 52-token prefix (the official code
# appends the image tokens after the prompt), so the first 3 prompt tokens are dropped as well.
OFFICIAL_CROP_START = {"video": 129, "image2video": 132, "image": 41, "image_edit": 55}
CROP_PAST_TEMPLATE = {"video": 0, "image2video": 0, "image": 0, "image_edit": 3}

# Qwen tokens kept after the crop: 256 in the video configs, 512 in the t2i/i2i (hd image) configs.
DEFAULT_MAX_LENGTH = {"video": 256, "image2video": 256, "image": 512, "image_edit": 512}
CLIP_MAX_LENGTH = 77

QWEN_7B_DIM = 3584  # Qwen2.5-VL-7B hidden size = the DiT's in_text_dim
CLIP_L_DIM = 768  # CLIP-L width = the DiT's pooled text dim
_QWEN_NAMES = {2048: "Qwen2.5-VL-3B", 3584: "Qwen2.5-VL-7B", 5120: "Qwen2.5-VL-32B", 8192: "Qwen2.5-VL-72B"}
_CLIP_NAMES = {512: "CLIP-B", 768: "CLIP-L", 1024: "OpenCLIP-H", 1280: "CLIP-G (OpenCLIP bigG)"}
_QWEN25_IM_START_ID = 151644  # id of <|im_start|> in the real Qwen2.5 vocabulary

# Image editing: what the official code appends to each prompt per source image, and the image
# processor settings of Qwen2.5-VL-7B-Instruct's preprocessor_config.json (ComfyUI ships none).
IMAGE_TOKENS = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_IMAGE_PROCESSOR = {
    "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 16384, "patch_size": 14, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}

COMFY_TOKENIZER_DIRS = {"qwen": Path("comfy/text_encoders/qwen25_tokenizer"), "clip": Path("comfy/sd1_tokenizer")}


# --------------------------------------------------------------------------------------------------
# What the encoders return
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TextEmbeds:
    """Prompt embeddings for the DiT: small tensors that nodes and caches keep after the encoders go."""

    text_embed: torch.Tensor  # (B, L, D) Qwen last hidden state after the crop; zero at pads
    text_mask: torch.Tensor  # (B, L) bool, True on real tokens (a prefix of each row)
    pooled: torch.Tensor  # (B, P) CLIP pooled output

    def __post_init__(self):
        b, l = self.text_embed.shape[:2] if self.text_embed.ndim == 3 else (-1, -1)
        if b < 0 or tuple(self.text_mask.shape) != (b, l) or self.pooled.ndim != 2 or self.pooled.shape[0] != b:
            raise ValueError(
                f"TextEmbeds: expected text_embed (B, L, D), text_mask (B, L), pooled (B, P); got "
                f"{tuple(self.text_embed.shape)}, {tuple(self.text_mask.shape)}, {tuple(self.pooled.shape)}")
        if self.text_mask.dtype != torch.bool:
            raise ValueError(f"TextEmbeds: text_mask must be bool, got {self.text_mask.dtype}")

    def __len__(self) -> int:
        return self.text_embed.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) number of real tokens per prompt."""
        return self.text_mask.sum(1)

    def to(self, device=None, dtype: torch.dtype | None = None) -> TextEmbeds:
        """Move to a device; `dtype` casts the float tensors (the mask stays bool)."""
        return TextEmbeds(self.text_embed.to(device=device, dtype=dtype),
                          self.text_mask.to(device=device),
                          self.pooled.to(device=device, dtype=dtype))

    def pad_to(self, length: int) -> TextEmbeds:
        """Pad (zeros, False) or cut on the right to `length` tokens; refuses to cut real tokens."""
        longest = int(self.lengths.max()) if len(self) else 0
        if length < longest:
            raise ValueError(f"TextEmbeds.pad_to({length}): a prompt has {longest} tokens")
        extra = length - self.text_embed.shape[1]
        if extra <= 0:
            return TextEmbeds(self.text_embed[:, :length], self.text_mask[:, :length], self.pooled)
        return TextEmbeds(nn.functional.pad(self.text_embed, (0, 0, 0, extra)),
                          nn.functional.pad(self.text_mask, (0, extra)), self.pooled)

    def trim(self) -> TextEmbeds:
        """Drop the pad columns past the longest prompt."""
        return self.pad_to(int(self.lengths.max()))

    def select(self, idx) -> TextEmbeds:
        """Rows `idx` (int, slice, list or bool/long tensor) as a batch, trimmed to their longest prompt."""
        if isinstance(idx, int):
            idx = [idx]
        return TextEmbeds(self.text_embed[idx], self.text_mask[idx], self.pooled[idx]).trim()

    @staticmethod
    def cat(items: list[TextEmbeds]) -> TextEmbeds:
        """One batch from several (e.g. prompt + negative prompt for CFG), padded to the longest."""
        if not items:
            raise ValueError("TextEmbeds.cat: nothing to concatenate")
        length = max(e.text_embed.shape[1] for e in items)
        items = [e.pad_to(length) for e in items]
        return TextEmbeds(torch.cat([e.text_embed for e in items]), torch.cat([e.text_mask for e in items]),
                          torch.cat([e.pooled for e in items]))


# --------------------------------------------------------------------------------------------------
# Checkpoints: a folder of shards or one file, read tensor by tensor
# --------------------------------------------------------------------------------------------------

_AUX_SUFFIXES = (".scale_weight", ".weight_scale", ".weight_scale_2", ".scale_input", ".input_scale",
                 ".comfy_quant", ".scaled_fp8")
_FP8_DTYPES = {"F8_E4M3", "F8_E5M2"}
_SHARD_NAME = re.compile(r".*-\d{5}-of-\d{5}\.safetensors$")


def _is_aux(key: str) -> bool:
    """True for the scale/marker tensors of fp8-scaled files (read with their weight, never alone)."""
    return key == "scaled_fp8" or key.endswith(_AUX_SUFFIXES)


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model folder or single file."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        index = path.parent / "model.safetensors.index.json"
        if _SHARD_NAME.match(path.name) and index.is_file():
            raise ValueError(f"{path}: this is one shard of a sharded checkpoint; pass its folder {path.parent}")
        return [path]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise ValueError(f"{path}: holds only PyTorch .bin/.pt weights; k5core reads .safetensors "
                         "(download the safetensors files of this model)")
    raise FileNotFoundError(f"{path}: no .safetensors weights in this folder")


def _read_config(path: Path, metadata: dict[str, str]) -> dict:
    """config.json of a folder, or a JSON `config` entry in a single file's metadata, or {}."""
    if path.is_dir():
        cfg = path / "config.json"
        return json.loads(cfg.read_text(encoding="utf-8")) if cfg.is_file() else {}
    try:
        cfg = json.loads(metadata.get("config", "{}"))
    except json.JSONDecodeError:
        return {}
    return cfg if isinstance(cfg, dict) else {}


class _Checkpoint:
    """The tensor table of one model source; tensors are read on demand, fp8-scaled ones dequantized."""

    def __init__(self, path):
        self.path = Path(path)
        self.entries: dict[str, tuple[Path, str, list[int]]] = {}  # key -> (file, dtype, shape)
        metadata = {}
        for file in _weight_files(self.path):
            header, meta = read_safetensors_header(file)
            metadata = metadata or meta
            for key, info in header.items():
                self.entries[key] = (file, info["dtype"], info["shape"])
        self.config = _read_config(self.path, metadata)

    def keys(self) -> list[str]:
        """Tensor names without the fp8 scale/marker tensors."""
        return [k for k in self.entries if not _is_aux(k)]

    def shape(self, key: str) -> list[int]:
        return self.entries[key][2]

    def read(self, names: dict[str, str], dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
        """{target: source key} -> {target: tensor in dtype on device}, one file open at a time."""
        from safetensors import safe_open

        by_file: dict[Path, list[tuple[str, str]]] = {}
        for target, source in names.items():
            by_file.setdefault(self.entries[source][0], []).append((target, source))
        out = {}
        for file, pairs in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for target, source in pairs:
                    out[target] = self._dequantize(f, source).to(device=device, dtype=dtype)
        return out

    def _dequantize(self, f, key: str) -> torch.Tensor:
        """The tensor `key`; an fp8 weight with a scale comes back as float32 weight * scale."""
        tensor = f.get_tensor(key)
        base = key[: -len(".weight")] if key.endswith(".weight") else key
        quant = base + ".comfy_quant"
        if quant in self.entries:
            conf = json.loads(bytes(self._aux(quant).tolist()).decode("utf-8"))
            if not str(conf.get("format", "")).startswith("float8"):
                raise ValueError(f"{self.path}: tensor {key} is stored as {conf.get('format')!r}; k5core reads "
                                 "bf16/fp16/fp32 and fp8-scaled text encoders only")
        if self.entries[key][1] not in _FP8_DTYPES:
            return tensor
        for scale_key in (base + ".scale_weight", base + ".weight_scale"):
            if scale_key in self.entries:
                scale = self._aux(scale_key).float()
                if scale.numel() > 1:  # per output channel
                    scale = scale.reshape(-1, *([1] * (tensor.ndim - 1)))
                return tensor.float() * scale
        return tensor.float()

    def _aux(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.entries[key][0]), framework="pt", device="cpu") as f:
            return f.get_tensor(key)


def _guess_kind(keys: list[str]) -> str:
    """A name for what a checkpoint holds, for error messages."""
    if any(k.endswith("embed_tokens.weight") for k in keys):
        return "a decoder LLM (Qwen-style)"
    if any(k.endswith("token_embedding.weight") for k in keys):
        return "a CLIP text encoder"
    if any("visual_transformer_blocks." in k or "text_transformer_blocks." in k or "diffusion_model." in k
           for k in keys):
        return "a diffusion model (DiT) - it belongs in models/diffusion_models"
    if any("decoder.up_blocks" in k or "encoder.down_blocks" in k for k in keys):
        return "a VAE - it belongs in models/vae"
    if any(k.startswith(("encoder.block.", "shared.")) for k in keys):
        return "a T5 text encoder"
    return "an unknown model (first keys: " + ", ".join(sorted(keys)[:3]) + ")"


def _count_layers(names, prefix: str) -> int:
    """Number of blocks `prefix{i}.` among the names."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for n in names if (m := pattern.match(n))}
    return max(found) + 1 if found else 0


def _require(ckpt: _Checkpoint, names: dict[str, str], needed: list[str]) -> None:
    """Raise naming the file when tensors that the config is read from are absent."""
    absent = [n for n in needed if n not in names]
    if absent:
        raise ValueError(f"{ckpt.path}: incomplete checkpoint, no tensor for {absent} (file cut short, or one "
                         "shard of several?)")


def _empty_model(cls, config):
    """Build `cls(config)` with parameters on the meta device (buffers real), filled later by assign."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return cls(config)


def _load_weights(model: nn.Module, ckpt: _Checkpoint, names: dict[str, str], dtype, device) -> None:
    """Read the mapped tensors and assign them as the model's parameters (no second copy)."""
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - names.keys()), sorted(names.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"{ckpt.path}: does not match the model built from its shapes: missing "
                         f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
    state = ckpt.read(names, dtype, device)
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False).eval()


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------

def comfy_tokenizer_dirs(comfy_root) -> dict[str, Path]:
    """The tokenizer folders every ComfyUI install ships: {"qwen": ..., "clip": ...}."""
    return {kind: Path(comfy_root) / sub for kind, sub in COMFY_TOKENIZER_DIRS.items()}


def _has_tokenizer_files(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())


def find_tokenizer(kind: str, model_path, tokenizer=None, comfy_root=None) -> Path:
    """The tokenizer folder for a model: explicit path, model folder, ComfyUI root, ComfyUI above the file."""
    if tokenizer is not None:
        folder = Path(tokenizer)
        if not _has_tokenizer_files(folder):
            raise FileNotFoundError(f"{folder}: not a tokenizer folder (needs tokenizer.json, or vocab.json "
                                    "and merges.txt)")
        return folder
    model_path = Path(model_path)
    candidates = [model_path] if model_path.is_dir() else []
    if comfy_root is not None:
        candidates.append(Path(comfy_root) / COMFY_TOKENIZER_DIRS[kind])
    candidates += [p / COMFY_TOKENIZER_DIRS[kind] for p in model_path.resolve().parents[:4]]
    for folder in candidates:
        if _has_tokenizer_files(folder):
            return folder
    looked = "\n  ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"{model_path}: no {kind} tokenizer found (nothing is downloaded). Looked in:\n  {looked}\n"
        f"Pass tokenizer=<folder> (--tokenizer), the ComfyUI root (comfy_root=), or use the Hugging Face "
        f"folder of the model, which holds its tokenizer.")


def _load_qwen_tokenizer(folder: Path):
    """Qwen2 tokenizer, right padding, pad token <|endoftext|>; checks the template's special tokens."""
    from transformers import Qwen2TokenizerFast

    tok = Qwen2TokenizerFast.from_pretrained(str(folder), local_files_only=True)
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = "<|endoftext|>"
    if len(tok("<|im_start|><|im_end|>")["input_ids"]) != 2:
        raise ValueError(f"{folder}: not a Qwen2.5 tokenizer (<|im_start|> and <|im_end|> are not special tokens)")
    return tok


def _load_clip_tokenizer(folder: Path):
    """CLIP BPE tokenizer with <|startoftext|> / <|endoftext|>."""
    from transformers import CLIPTokenizerFast

    tok = CLIPTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    if tok.eos_token_id is None or tok.bos_token_id is None:
        raise ValueError(f"{folder}: not a CLIP tokenizer (no <|startoftext|>/<|endoftext|> tokens)")
    return tok


def _check_vocab(tok, folder: Path, rows: int, model_path: Path) -> None:
    """A tokenizer with more ids than the model has embedding rows belongs to another model."""
    if len(tok) > rows:
        raise ValueError(f"{folder}: tokenizer has {len(tok)} tokens but {model_path} embeds only {rows}; "
                         "this tokenizer belongs to another model")


def _check_prompts(prompts) -> list[str]:
    """A non-empty list of str (a single str becomes a list of one)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("encode: the prompt list is empty")
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"encode: prompts must be str, got {bad[0]}")
    return prompts


class _LoadedEncoder:
    """An encoder model that can move between devices or be dropped; the tokenizer stays."""
    what = "text"
    model: nn.Module | None
    path: Path

    def to(self, device):
        """Move the model, e.g. to "cpu" to free the GPU between encodes."""
        self._live().to(device)
        return self

    def unload(self) -> None:
        """Drop the model (the tokenizer stays); encode() then raises."""
        self.model = None
        _free_memory()

    def _live(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError(f"{self.path}: the {self.what} encoder was unloaded; load it again")
        return self.model


# --------------------------------------------------------------------------------------------------
# Qwen2.5-VL (language model only)
# --------------------------------------------------------------------------------------------------

_QWEN_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.", "")
_QWEN_PART = re.compile(r"embed_tokens\.weight|norm\.weight|layers\.\d+\.\S+")


def _qwen_name(key: str) -> str | None:
    """Checkpoint key -> Qwen2_5_VLTextModel parameter name; None for vision tower, lm_head, others."""
    if key.startswith(("visual.", "model.visual.", "lm_head.")):
        return None
    for prefix in _QWEN_PREFIXES:
        if key.startswith(prefix) and _QWEN_PART.fullmatch(key[len(prefix):]):
            return key[len(prefix):]
    return None


def _mrope_section(head_dim: int) -> list[int]:
    """Qwen2.5-VL's split of rotary frequencies into (t, h, w): [16, 24, 24] for head_dim 128."""
    half = head_dim // 2
    t, h = half // 4, 3 * half // 8
    return [t, h, half - t - h]


def _qwen_config(ckpt: _Checkpoint, names: dict[str, str]):
    """Qwen2_5_VLTextConfig from the weight shapes, with heads/rope/eps from config.json when present."""
    from transformers import Qwen2_5_VLTextConfig

    _require(ckpt, names, ["embed_tokens.weight", "layers.0.mlp.gate_proj.weight",
                           "layers.0.self_attn.k_proj.weight"])
    cfg = {**ckpt.config, **(ckpt.config.get("text_config") or {})}  # legacy flat or nested layout
    vocab, hidden = ckpt.shape(names["embed_tokens.weight"])
    heads = cfg.get("num_attention_heads")
    if heads is None:
        if hidden % 128:
            raise ValueError(f"{ckpt.path}: cannot infer the attention heads (hidden size {hidden} is not a "
                             "multiple of 128); use the model's Hugging Face folder with its config.json")
        heads = hidden // 128
    head_dim = hidden // heads
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    return Qwen2_5_VLTextConfig(
        vocab_size=vocab, hidden_size=hidden,
        intermediate_size=ckpt.shape(names["layers.0.mlp.gate_proj.weight"])[0],
        num_hidden_layers=_count_layers(names, "layers."),
        num_attention_heads=heads,
        num_key_value_heads=ckpt.shape(names["layers.0.self_attn.k_proj.weight"])[0] // head_dim,
        hidden_act=cfg.get("hidden_act", "silu"),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_position_embeddings=cfg.get("max_position_embeddings", 128000),
        rope_theta=cfg.get("rope_theta") or rope.get("rope_theta") or 1e6,
        rope_scaling={"type": "mrope", "mrope_section": rope.get("mrope_section") or _mrope_section(head_dim)},
        bos_token_id=None, eos_token_id=None, pad_token_id=None, use_cache=False,
    )


def _check_width(path: Path, width: int, needed: int | None, what: str, names: dict[int, str],
                 advice: str) -> None:
    """Refuse an encoder whose width is not the DiT's (None: no check), naming the model it looks like."""
    if needed is not None and width != needed:
        known = f" ({names[width]})" if width in names else ""
        raise ValueError(f"{path}: this {what} has width {width}{known}, but the diffusion model needs "
                         f"{needed}. {advice}")


def _swap_linears_for_bnb(root: nn.Module, method: str, compute_dtype, device) -> None:
    """Replace every nn.Linear under `root` by its bitsandbytes NF4 / int8 twin, quantized on `device`."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError(f"quantization={method!r} needs bitsandbytes (pip install bitsandbytes): {e}") from None
    for module in list(root.modules()):
        for name, lin in list(module.named_children()):
            if type(lin) is not nn.Linear:
                continue
            bias = lin.bias is not None
            if method == "nf4":
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=bias, compute_dtype=compute_dtype,
                                      compress_statistics=True, quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4")
            else:
                q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=bias, has_fp16_weights=False,
                                        threshold=6.0, device="meta")
                q.weight = bnb.nn.Int8Params(lin.weight.data, requires_grad=False, has_fp16_weights=False)
            if bias:
                q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
            setattr(module, name, q.to(device))  # .to() quantizes


def crop_start(tokenizer, content: str) -> int:
    """Tokens cropped from the start: the template prefix + the official extra (3 for image_edit).

    With the real Qwen2.5 tokenizer this is OFFICIAL_CROP_START (checked); with another tokenizer (the
    tiny test ones) the same rule gives the crop that matches its template.
    """
    if content not in PROMPT_TEMPLATES:
        raise ValueError(f"content must be one of {CONTENT_TYPES}, got {content!r}")
    prefix = PROMPT_TEMPLATES[content].split("{}")[0]
    crop = len(tokenizer(prefix)["input_ids"]) + CROP_PAST_TEMPLATE[content]
    if tokenizer.convert_tokens_to_ids("<|im_start|>") == _QWEN25_IM_START_ID and crop != OFFICIAL_CROP_START[content]:
        raise RuntimeError(f"the {content} template gives crop {crop} with the Qwen2.5 tokenizer, official is "
                           f"{OFFICIAL_CROP_START[content]}: the template text is wrong")
    return crop


# --------------------------------------------------------------------------------------------------
# Qwen2.5-VL vision tower (image_edit with a source image)
# --------------------------------------------------------------------------------------------------

_VISION_PREFIXES = ("model.visual.", "visual.")  # transformers 5 / hub and ComfyUI layouts


def _vision_name(key: str) -> str | None:
    """Checkpoint key -> Qwen2_5_VisionTransformerPretrainedModel parameter name; None for the rest."""
    for prefix in _VISION_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return None


def _vision_config(ckpt: _Checkpoint, names: dict[str, str]):
    """Qwen2_5_VLVisionConfig from the weight shapes; heads/windows from config.json (7B values otherwise)."""
    from transformers import Qwen2_5_VLVisionConfig

    _require(ckpt, names, ["patch_embed.proj.weight", "blocks.0.mlp.gate_proj.weight", "merger.mlp.0.weight",
                           "merger.mlp.2.weight"])
    cfg = ckpt.config.get("vision_config") or {}
    width, _, temporal, patch, _ = ckpt.shape(names["patch_embed.proj.weight"])  # (1280, 3, 2, 14, 14)
    depth = _count_layers(names, "blocks.")
    merge = round((ckpt.shape(names["merger.mlp.0.weight"])[1] // width) ** 0.5)  # 2x2 patches -> 1 token
    return Qwen2_5_VLVisionConfig(
        depth=depth, hidden_size=width, hidden_act=cfg.get("hidden_act", "silu"),
        intermediate_size=ckpt.shape(names["blocks.0.mlp.gate_proj.weight"])[0],
        num_heads=cfg.get("num_heads") or width // 80, in_channels=3, patch_size=patch,
        spatial_merge_size=merge, temporal_patch_size=temporal, tokens_per_second=cfg.get("tokens_per_second", 2),
        window_size=cfg.get("window_size", 112), out_hidden_size=ckpt.shape(names["merger.mlp.2.weight"])[0],
        fullatt_block_indexes=cfg.get("fullatt_block_indexes") or [depth // 4 * (i + 1) - 1 for i in range(4)],
    )


@functools.cache
def qwen_image_processor():
    """Qwen2-VL image processor with the official settings, built locally (torchvision backend when
    installed, as the official `use_fast=True`; the PIL backend otherwise)."""
    import importlib.util

    import transformers

    name = "Qwen2VLImageProcessor" if importlib.util.find_spec("torchvision") else "Qwen2VLImageProcessorPil"
    return getattr(transformers, name)(**QWEN_IMAGE_PROCESSOR)


def _half_size(image: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) uint8 or float in [0, 1] -> (3, H/2, W/2) uint8: the official `F.resize(i, (h//2, w//2))`."""
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"images: expected (H, W, 3) tensors, got "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    x = image.detach().cpu().permute(2, 0, 1)[None].float()  # (1, 3, H, W)
    x = x if image.dtype == torch.uint8 else x * 255.0
    h, w = x.shape[-2:]
    if h < 2 or w < 2:
        raise ValueError(f"images: a source image of {h}x{w} pixels is too small")
    x = nn.functional.interpolate(x, size=(h // 2, w // 2), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)[0]


def _source_images(images, count: int) -> list[torch.Tensor]:
    """One image shared by all prompts, or one per prompt (a list or an (N, H, W, 3) tensor), halved."""
    if isinstance(images, torch.Tensor):
        images = list(images) if images.ndim == 4 else [images]
    images = list(images)
    if len(images) == 1:
        images = images * count
    if len(images) != count:
        raise ValueError(f"images: give one source image for all prompts or one per prompt ({count}), "
                         f"got {len(images)}")
    return [_half_size(i) for i in images]


class QwenEncoder(_LoadedEncoder):
    """Qwen2.5-VL-7B language model + tokenizer: prompts -> cropped last hidden states and masks.
    The vision tower is read from the same checkpoint when an image_edit encode first gets images."""
    what = "Qwen text"

    def __init__(self, model: nn.Module, tokenizer, path: Path, quantization: str | None = None):
        self.model, self.tokenizer, self.path, self.quantization = model, tokenizer, path, quantization
        self._crops: dict[str, int] = {}
        self._vl = None  # Qwen2_5_VLModel sharing `model`, built on the first encode with images

    @classmethod
    def load(cls, path, *, tokenizer=None, comfy_root=None, device="cpu", dtype: torch.dtype | None = None,
             quantization: str | None = None, text_dim: int | None = QWEN_7B_DIM) -> QwenEncoder:
        """Load from an HF folder or a single safetensors file (ComfyUI layout, fp8-scaled included)."""
        if quantization not in (None, "nf4", "int8"):
            raise ValueError(f"quantization must be None, 'nf4' or 'int8', got {quantization!r}")
        device = torch.device(device)
        dtype = dtype or pick_dtype(None, device)  # bf16 on GPUs as the official code
        ckpt = _Checkpoint(path)
        names = {n: k for k in ckpt.keys() if (n := _qwen_name(k)) is not None}
        if "embed_tokens.weight" not in names:
            raise ValueError(f"{ckpt.path}: not a Qwen2.5-VL text encoder; it looks like {_guess_kind(ckpt.keys())}")
        hidden = ckpt.shape(names["embed_tokens.weight"])[1]
        _check_width(ckpt.path, hidden, text_dim, "Qwen text encoder", _QWEN_NAMES,
                     "Kandinsky 5 needs Qwen2.5-VL-7B-Instruct (hidden size 3584): use qwen_2.5_vl_7b*.safetensors "
                     "or the Qwen/Qwen2.5-VL-7B-Instruct folder; the 3B model (2048) does not fit.")
        tok_dir = find_tokenizer("qwen", ckpt.path, tokenizer, comfy_root)
        tok = _load_qwen_tokenizer(tok_dir)
        _check_vocab(tok, tok_dir, ckpt.shape(names["embed_tokens.weight"])[0], ckpt.path)

        from transformers import Qwen2_5_VLTextModel

        model = _empty_model(Qwen2_5_VLTextModel, _qwen_config(ckpt, names))
        _load_weights(model, ckpt, names, dtype, "cpu" if quantization else device)
        if quantization:
            _swap_linears_for_bnb(model.layers, quantization, dtype, device)
        return cls(model.to(device), tok, ckpt.path, quantization)

    @property
    def device(self) -> torch.device:
        return self._live().embed_tokens.weight.device

    def crop_start(self, content: str) -> int:
        """Template tokens cropped from the start for `content` with this encoder's tokenizer."""
        if content not in self._crops:
            self._crops[content] = crop_start(self.tokenizer, content)
        return self._crops[content]

    def to(self, device):
        """Move the language model and, once loaded, the vision tower."""
        super().to(device)
        if self._vl is not None:
            self._vl.visual.to(device)
        return self

    def unload(self) -> None:
        self._vl = None
        super().unload()

    def vision_model(self) -> nn.Module:
        """Qwen2_5_VLModel: this language model + the checkpoint's vision tower, read on first use."""
        if self._vl is None:
            from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

            model = self._live()
            ckpt = _Checkpoint(self.path)
            names = {n: k for k in ckpt.keys() if (n := _vision_name(k)) is not None}
            if "patch_embed.proj.weight" not in names:
                raise ValueError(f"{self.path}: has no vision tower (no visual.* tensors); image editing with a "
                                 "source image needs the full Qwen2.5-VL checkpoint (qwen_2.5_vl_7b*.safetensors "
                                 "or the Qwen/Qwen2.5-VL-7B-Instruct folder)")
            ids = {f"{kind}_token_id": self.tokenizer.convert_tokens_to_ids(f"<|{token}|>") for kind, token in
                   (("image", "image_pad"), ("video", "video_pad"), ("vision_start", "vision_start"),
                    ("vision_end", "vision_end"))}
            config = Qwen2_5_VLConfig(text_config=model.config.to_dict(),
                                      vision_config=_vision_config(ckpt, names).to_dict(), **ids)
            vl = _empty_model(Qwen2_5_VLModel, config)
            _load_weights(vl.visual, ckpt, names, model.embed_tokens.weight.dtype, self.device)
            vl.language_model = model  # shared: moving or quantizing `model` applies here too
            self._vl = vl.requires_grad_(False).eval()
        return self._vl

    def encode(self, prompts, content: str = "video", max_length: int | None = None,
               pad_to: str = "longest", images=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (text_embed (B, L, D) zero at pads, text_mask (B, L) bool); L <= max_length.

        `images` (image_edit only): the source image(s), (H, W, 3) uint8 or float in [0, 1], one shared
        or one per prompt; they are encoded with the prompts as the official I2I code does (no max_length).
        """
        prompts = _check_prompts(prompts)
        if pad_to not in ("longest", "max_length"):
            raise ValueError(f"pad_to must be 'longest' or 'max_length', got {pad_to!r}")
        if images is not None:
            return self._encode_with_images(prompts, content, images, max_length, pad_to)
        model = self._live()
        crop = self.crop_start(content)
        max_length = max_length or DEFAULT_MAX_LENGTH[content]
        tokens = self.tokenizer([PROMPT_TEMPLATES[content].format(p) for p in prompts], truncation=True,
                                max_length=max_length + crop, padding=pad_to, return_tensors="pt")
        ids, mask = tokens["input_ids"], tokens["attention_mask"].bool()  # (B, crop + L), right padded
        with torch.no_grad():  # causal + right padding: real tokens never attend to pads, no mask needed
            hidden = model(input_ids=ids.to(self.device), use_cache=False).last_hidden_state
        return self._crop(hidden, mask, prompts, content)

    def _encode_with_images(self, prompts: list[str], content: str, images, max_length, pad_to):
        """The official image_edit encode: prompt + image tokens, halved image, full Qwen2.5-VL."""
        if content != "image_edit":
            raise ValueError(f"images: only the image_edit template reads a source image, got content {content!r}")
        if max_length is not None or pad_to != "longest":
            raise ValueError("images: with a source image the official code neither truncates nor pads to "
                             "max_length; leave max_length=None and pad_to='longest'")
        vl = self.vision_model()
        pixels = qwen_image_processor()(images=_source_images(images, len(prompts)), return_tensors="pt")
        grid = pixels["image_grid_thw"]  # (B, 3) patches along t, h, w
        per_image = (grid.prod(-1) // vl.visual.spatial_merge_size ** 2).tolist()  # tokens after the merger
        texts = [(PROMPT_TEMPLATES[content].format(p) + IMAGE_TOKENS + "<|im_end|>").replace(
                 "<|image_pad|>", "<|image_pad|>" * n) for p, n in zip(prompts, per_image)]
        tokens = self.tokenizer(texts, padding="longest", return_tensors="pt").to(self.device)
        with torch.no_grad():  # right padding + attention mask: real tokens are as in a batch of one
            hidden = vl(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                        pixel_values=pixels["pixel_values"].to(self.device, self.model.embed_tokens.weight.dtype),
                        image_grid_thw=grid.to(self.device), use_cache=False).last_hidden_state
        return self._crop(hidden, tokens["attention_mask"].bool(), prompts, content)

    def _crop(self, hidden: torch.Tensor, mask: torch.Tensor, prompts: list[str], content: str):
        """Drop the official crop from the start; zero the pads; refuse prompts with nothing left."""
        crop = self.crop_start(content)
        hidden, mask = hidden[:, crop:], mask[:, crop:].to(hidden.device)  # (B, L, D), (B, L)
        empty = [p for p, m in zip(prompts, mask) if not m.any()]
        if empty:
            raise ValueError(f"prompt {empty[0]!r} has no tokens left after the official {content} crop of "
                             f"{crop} tokens, which also drops the first {CROP_PAST_TEMPLATE[content]} prompt "
                             "tokens; write a longer prompt" + (" or pass the source image (images=)"
                                                                 if content == "image_edit" else ""))
        return hidden.masked_fill(~mask[..., None], 0), mask



# --------------------------------------------------------------------------------------------------
# CLIP-L (text tower only)
# --------------------------------------------------------------------------------------------------

@functools.cache
def _clip_model_prefix() -> str:
    """"text_model." when CLIPTextModel nests its parameters there (transformers 4.x), else "" (5.x)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    probe = _empty_model(CLIPTextModel, CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                                       num_attention_heads=1, vocab_size=8, bos_token_id=None,
                                                       eos_token_id=None, pad_token_id=None))
    return "text_model." if next(iter(probe.state_dict())).startswith("text_model.") else ""


def _clip_names(ckpt: _Checkpoint, model_prefix: str) -> dict[str, str]:
    """{CLIPTextModel parameter name: checkpoint key} for every `...text_model.*` key."""
    names = {}
    for key in ckpt.keys():
        at = key.find("text_model.")
        if at >= 0 and not key.endswith("position_ids"):
            names[model_prefix + key[at + len("text_model."):]] = key
    return names


def _clip_config(ckpt: _Checkpoint, names: dict[str, str], prefix: str, tok):
    """CLIPTextConfig from the weight shapes; heads/act/eps from config.json when present (CLIP-L defaults)."""
    from transformers import CLIPTextConfig

    _require(ckpt, names, [prefix + n for n in ("embeddings.token_embedding.weight", "encoder.layers.0.mlp.fc1.weight",
                                               "embeddings.position_embedding.weight")])
    cfg = {**ckpt.config, **(ckpt.config.get("text_config") or {}), **(ckpt.config.get("text_config_dict") or {})}
    vocab, width = ckpt.shape(names[prefix + "embeddings.token_embedding.weight"])
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=width,
        intermediate_size=ckpt.shape(names[prefix + "encoder.layers.0.mlp.fc1.weight"])[0],
        num_hidden_layers=_count_layers(names, prefix + "encoder.layers."),
        num_attention_heads=cfg.get("num_attention_heads") or width // 64,
        max_position_embeddings=ckpt.shape(names[prefix + "embeddings.position_embedding.weight"])[0],
        hidden_act=cfg.get("hidden_act", "quick_gelu"), layer_norm_eps=cfg.get("layer_norm_eps", 1e-5),
        projection_dim=cfg.get("projection_dim", width),
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )


class ClipEncoder(_LoadedEncoder):
    """CLIP-L text tower + tokenizer: prompts -> pooled output (B, 768) at 77 tokens."""
    what = "CLIP text"

    def __init__(self, model: nn.Module, tokenizer, path: Path):
        self.model, self.tokenizer, self.path = model, tokenizer, path

    @classmethod
    def load(cls, path, *, tokenizer=None, comfy_root=None, device="cpu", dtype: torch.dtype = torch.float32,
             pooled_dim: int | None = CLIP_L_DIM) -> ClipEncoder:
        """Load from a CLIP HF folder or a single file (`clip_l.safetensors`); float32 as the official code."""
        from transformers import CLIPTextModel

        device = torch.device(device)
        ckpt = _Checkpoint(path)
        if not any(k.endswith("text_model.embeddings.token_embedding.weight") for k in ckpt.keys()):
            raise ValueError(f"{ckpt.path}: not a CLIP text encoder; it looks like {_guess_kind(ckpt.keys())}")
        prefix = _clip_model_prefix()
        names = _clip_names(ckpt, prefix)
        width = ckpt.shape(names[prefix + "embeddings.token_embedding.weight"])[1]
        _check_width(ckpt.path, width, pooled_dim, "CLIP text encoder", _CLIP_NAMES,
                     "Kandinsky 5 uses CLIP-L (clip_l.safetensors or openai/clip-vit-large-patch14, width 768).")
        tok_dir = find_tokenizer("clip", ckpt.path, tokenizer, comfy_root)
        tok = _load_clip_tokenizer(tok_dir)
        _check_vocab(tok, tok_dir, ckpt.shape(names[prefix + "embeddings.token_embedding.weight"])[0], ckpt.path)
        model = _empty_model(CLIPTextModel, _clip_config(ckpt, names, prefix, tok))
        _load_weights(model, ckpt, names, dtype, device)
        return cls(model.to(device), tok, ckpt.path)

    @property
    def device(self) -> torch.device:
        return next(self._live().parameters()).device

    def encode(self, prompts) -> torch.Tensor:
        """Prompts -> pooled (B, P): the final-norm hidden state at each prompt's first end-of-text token."""
        prompts = _check_prompts(prompts)
        model = self._live()
        tokens = self.tokenizer(prompts, max_length=CLIP_MAX_LENGTH, truncation=True, padding="max_length",
                                return_tensors="pt").to(self.device)
        with torch.no_grad():
            return model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output


# --------------------------------------------------------------------------------------------------
# Both together
# --------------------------------------------------------------------------------------------------

def _free_memory() -> None:
    """Return the memory of dropped models to the system / CUDA allocator."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class TextEncoder:
    """Qwen2.5-VL-7B + CLIP-L as Kandinsky 5 uses them: prompts -> TextEmbeds."""

    def __init__(self, qwen: QwenEncoder, clip: ClipEncoder):
        self.qwen, self.clip = qwen, clip

    @classmethod
    def load(cls, qwen, clip, *, device="cpu", dtype: torch.dtype | None = None, quantization: str | None = None,
             qwen_tokenizer=None, clip_tokenizer=None, comfy_root=None, text_dim: int | None = QWEN_7B_DIM,
             pooled_dim: int | None = CLIP_L_DIM, clip_dtype: torch.dtype = torch.float32) -> TextEncoder:
        """Load both encoders. `text_dim`/`pooled_dim` are the DiT's widths (None skips the check);
        `dtype` is Qwen's (default bf16 on CUDA, fp32 on CPU); CLIP runs in `clip_dtype` (fp32 as official);
        `quantization` ("nf4", "int8") applies to Qwen's Linear layers through bitsandbytes."""
        q = QwenEncoder.load(qwen, tokenizer=qwen_tokenizer, comfy_root=comfy_root, device=device, dtype=dtype,
                             quantization=quantization, text_dim=text_dim)
        c = ClipEncoder.load(clip, tokenizer=clip_tokenizer, comfy_root=comfy_root, device=device,
                             dtype=clip_dtype, pooled_dim=pooled_dim)
        return cls(q, c)

    def encode(self, prompts, content: str = "video", max_length: int | None = None,
               pad_to: str = "longest", images=None) -> TextEmbeds:
        """Prompts -> TextEmbeds(text_embed (B, L, D), text_mask (B, L), pooled (B, P)) on the encoders' device.
        `images`: the I2I source image(s) for content "image_edit" (see QwenEncoder.encode); CLIP reads text only."""
        prompts = _check_prompts(prompts)
        text_embed, text_mask = self.qwen.encode(prompts, content, max_length, pad_to, images=images)
        pooled = self.clip.encode(prompts).to(text_embed.device)
        return TextEmbeds(text_embed, text_mask, pooled)

    def to(self, device) -> TextEncoder:
        """Move both models (e.g. to "cpu" to offload between encodes)."""
        self.qwen.to(device)
        self.clip.to(device)
        return self

    def unload(self) -> None:
        """Free both models; embeddings already returned stay valid."""
        self.qwen.unload()
        self.clip.unload()


__all__ = [
    "CLIP_L_DIM", "CLIP_MAX_LENGTH", "CONTENT_TYPES", "DEFAULT_MAX_LENGTH", "OFFICIAL_CROP_START",
    "IMAGE_TOKENS", "PROMPT_TEMPLATES", "QWEN_7B_DIM", "QWEN_IMAGE_PROCESSOR", "ClipEncoder", "QwenEncoder",
    "TextEmbeds", "TextEncoder",
    "comfy_tokenizer_dirs", "crop_start", "find_tokenizer", "qwen_image_processor",
]
