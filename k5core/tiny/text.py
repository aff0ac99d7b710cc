"""Tiny random Qwen2.5-VL and CLIP text encoders with real tokenizers, in the layouts users have.

`make_tiny_text_encoders(root)` turns `root` into a miniature ComfyUI install plus Hugging Face folders:

    root/comfy/text_encoders/qwen25_tokenizer/   vocab.json, merges.txt, tokenizer_config.json (as ComfyUI ships)
    root/comfy/sd1_tokenizer/                    vocab.json, merges.txt, tokenizer_config.json,
                                                 special_tokens_map.json
    root/models/text_encoders/qwen_2.5_vl_7b_tiny.safetensors   ComfyUI layout: model.*, visual.*, lm_head.*
    root/models/text_encoders/clip_l_tiny.safetensors           ComfyUI layout: text_model.*, text_projection.*
    root/hf/Qwen2.5-VL-tiny-Instruct/   hub layout: flat config.json, model.*/visual.*/lm_head.* keys, tokenizer
    root/hf/clip-vit-tiny/              hub layout of openai/clip-vit-*: CLIPModel config + weights, tokenizer

The tokenizers are byte-level BPEs learned on a small built-in corpus (the prompt templates and a few
prompts; `tokenizers` does the byte-level pre-tokenization), with the special tokens the real ones have.
The weights are those of transformers' own Qwen2_5_VLForConditionalGeneration and CLIPModel at a fixed
seed. Deterministic, offline, about a second once transformers is imported.
The single files carry their config as JSON in the safetensors metadata ("config"), because tiny head
sizes cannot be inferred from shapes; `config_in_metadata=False` writes them bare, as ComfyUI's are.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from ..files import atomic_write_text, read_safetensors_header, save_safetensors
from ..text import PROMPT_TEMPLATES, _mrope_section
from . import TINY_POOLED_DIM, TINY_TEXT_DIM

QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
CLIP_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")

_PROMPTS = (
    "A red fox runs through fresh snow in a quiet forest at dawn.",
    "Close-up of a cup of coffee, steam rising, soft morning light.",
    "A drone shot over a city at night, cars moving on wet streets.",
    "An old man plays the violin on a bridge while people walk by.",
    "Waves crash on black rocks; the camera slowly zooms out.",
    "A cartoon robot dances in a colorful kitchen, 2D animation.",
)


def _corpus() -> list[str]:
    """Training text: the official templates (so they tokenize in few tokens) and sample prompts."""
    return [t.replace("{}", "") for t in PROMPT_TEMPLATES.values()] + list(_PROMPTS)


def _words(clip: bool) -> Counter:
    """Corpus words as byte-level symbol tuples with counts; CLIP lowercases and marks word ends '</w>'."""
    from tokenizers import pre_tokenizers

    words = Counter()
    if clip:
        split, to_bytes = pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        for text in _corpus():
            for piece, _ in split.pre_tokenize_str(text.lower()):
                symbols = list(to_bytes.pre_tokenize_str(piece)[0][0])
                words[tuple(symbols[:-1] + [symbols[-1] + "</w>"])] += 1
    else:
        split = pre_tokenizers.ByteLevel(add_prefix_space=False)
        for text in _corpus():
            for piece, _ in split.pre_tokenize_str(text):
                words[tuple(piece)] += 1
    return words


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if word[i:i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _train_bpe(clip: bool, n_merges: int) -> tuple[list[str], list[tuple[str, str]]]:
    """(tokens in id order, merges) of a byte-level BPE learned on the corpus.

    A plain BPE learner rather than `tokenizers`' trainer, whose ties between equally frequent pairs
    fall differently from run to run; here ties go to the smallest pair, so files are byte-identical.
    """
    from tokenizers import pre_tokenizers

    words, merges = _words(clip), []
    for _ in range(n_merges):
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = Counter()
        for word, count in words.items():
            merged[_merge(word, best)] += count
        words = merged
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + ([a + "</w>" for a in alphabet] if clip else []) + [a + b for a, b in merges]
    return list(dict.fromkeys(tokens)), merges


def _write_bpe(folder: Path, tokens: list[str], merges: list[tuple[str, str]]) -> None:
    atomic_write_text(folder / "vocab.json", json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    atomic_write_text(folder / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def _added_token(content: str, normalized: bool = False) -> dict:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
            "single_word": False, "special": True}


def write_qwen_tokenizer(folder) -> Path:
    """A Qwen2-style tokenizer folder (as ComfyUI's qwen25_tokenizer): specials after the BPE vocab."""
    folder = Path(folder)
    tokens, merges = _train_bpe(clip=False, n_merges=300)
    _write_bpe(folder, tokens, merges)
    added = {str(len(tokens) + i): _added_token(t) for i, t in enumerate(QWEN_SPECIAL_TOKENS)}
    config = {"add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
              "additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:]), "bos_token": None,
              "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
              "model_max_length": 131072, "pad_token": "<|endoftext|>", "split_special_tokens": False,
              "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
    atomic_write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2))
    return folder


def write_clip_tokenizer(folder) -> Path:
    """A CLIP tokenizer folder (as ComfyUI's sd1_tokenizer): specials are the last two ids."""
    folder = Path(folder)
    tokens, merges = _train_bpe(clip=True, n_merges=300)
    _write_bpe(folder, tokens + list(CLIP_SPECIAL_TOKENS), merges)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}
    atomic_write_text(folder / "special_tokens_map.json", json.dumps(special, indent=2))
    config = {**special, "add_prefix_space": False, "do_lower_case": True, "errors": "replace",
              "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}
    atomic_write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2))
    return folder


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        atomic_write_text(dst / f.name, f.read_text(encoding="utf-8"))


def _qwen_flat_config(n_tokens: int, special_id: dict[str, int], text_dim: int, head_dim: int) -> dict:
    """A Qwen2.5-VL config.json in the flat layout of the hub's Qwen2.5-VL-7B-Instruct, tiny sizes."""
    heads = text_dim // head_dim
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "vocab_size": (n_tokens + 63) // 64 * 64, "hidden_size": text_dim, "intermediate_size": 2 * text_dim,
        "num_hidden_layers": 2, "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 2),
        "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": _mrope_section(head_dim)},
        "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 2,
        "attention_dropout": 0.0, "initializer_range": 0.1, "torch_dtype": "float32",
        "bos_token_id": special_id["<|endoftext|>"], "eos_token_id": special_id["<|im_end|>"],
        "vision_start_token_id": special_id["<|vision_start|>"], "vision_end_token_id": special_id["<|vision_end|>"],
        "vision_token_id": special_id["<|vision_pad|>"], "image_token_id": special_id["<|image_pad|>"],
        "video_token_id": special_id["<|video_pad|>"],
        "vision_config": {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                          "out_hidden_size": text_dim, "patch_size": 14, "spatial_merge_size": 2,
                          "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [0],
                          "tokens_per_second": 2, "in_chans": 3, "hidden_act": "silu"},
    }


def _hub_qwen_key(key: str) -> str:
    """transformers' internal name -> the hub/ComfyUI name (model.language_model.X -> model.X, visual.X)."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return key[len("model."):]
    return key


def _qwen_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random Qwen2.5-VL weights (vision tower included) under hub key names."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(config))
    return {_hub_qwen_key(k): v for k, v in model.state_dict().items()}


def _clip_config(n_tokens: int, pooled_dim: int, head_dim: int) -> dict:
    """A CLIPModel config.json as in openai/clip-vit-large-patch14, tiny sizes; specials are the last ids."""
    text = {"vocab_size": n_tokens, "hidden_size": pooled_dim, "intermediate_size": 2 * pooled_dim,
            "num_hidden_layers": 2, "num_attention_heads": pooled_dim // head_dim, "max_position_embeddings": 77,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": pooled_dim,
            "bos_token_id": n_tokens - 2, "eos_token_id": n_tokens - 1, "pad_token_id": n_tokens - 1,
            "initializer_factor": 1.0, "initializer_range": 0.1}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 28, "patch_size": 14, "projection_dim": pooled_dim, "hidden_act": "quick_gelu"}
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": pooled_dim,
            "logit_scale_init_value": 2.6592, "text_config": text, "vision_config": vision}


def _clip_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random CLIPModel weights named as on the hub (text_model.*, vision_model.*, projections)."""
    from transformers import CLIPConfig, CLIPModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig.from_dict(config))
    return dict(model.state_dict())


def make_tiny_text_encoders(root, *, text_dim: int = TINY_TEXT_DIM, pooled_dim: int = TINY_POOLED_DIM,
                            qwen_head_dim: int = 8, clip_head_dim: int = 8, config_in_metadata: bool = True,
                            seed: int = 0) -> dict[str, Path]:
    """Write the tiny encoders under `root` (a fake ComfyUI root); return their paths by name.

    Keys: comfy_root, qwen_tokenizer, clip_tokenizer, qwen_file, clip_file, qwen_folder, clip_folder.
    `config_in_metadata=False` leaves the single files without a config, as ComfyUI's files are, so the
    loader must infer it from the shapes (then use head dims 128 / 64 as the real models have).
    """
    root = Path(root)
    paths = {"comfy_root": root,
             "qwen_tokenizer": write_qwen_tokenizer(root / "comfy/text_encoders/qwen25_tokenizer"),
             "clip_tokenizer": write_clip_tokenizer(root / "comfy/sd1_tokenizer"),
             "qwen_file": root / "models/text_encoders/qwen_2.5_vl_7b_tiny.safetensors",
             "clip_file": root / "models/text_encoders/clip_l_tiny.safetensors",
             "qwen_folder": root / "hf/Qwen2.5-VL-tiny-Instruct",
             "clip_folder": root / "hf/clip-vit-tiny"}

    qwen_vocab = json.loads((paths["qwen_tokenizer"] / "vocab.json").read_text(encoding="utf-8"))
    special_id = {t: len(qwen_vocab) + i for i, t in enumerate(QWEN_SPECIAL_TOKENS)}
    qwen_cfg = _qwen_flat_config(len(qwen_vocab) + len(QWEN_SPECIAL_TOKENS), special_id, text_dim, qwen_head_dim)
    qwen_sd = _qwen_weights(qwen_cfg, seed)
    save_safetensors(qwen_sd, paths["qwen_file"], {"config": json.dumps(qwen_cfg)} if config_in_metadata else None)
    save_safetensors(qwen_sd, paths["qwen_folder"] / "model.safetensors", {"format": "pt"})
    atomic_write_text(paths["qwen_folder"] / "config.json", json.dumps(qwen_cfg, indent=2))
    _copy_tokenizer(paths["qwen_tokenizer"], paths["qwen_folder"])

    clip_vocab = json.loads((paths["clip_tokenizer"] / "vocab.json").read_text(encoding="utf-8"))
    clip_cfg = _clip_config(len(clip_vocab), pooled_dim, clip_head_dim)
    clip_sd = _clip_weights(clip_cfg, seed + 1)
    text_only = {k: v for k, v in clip_sd.items() if k.startswith(("text_model.", "text_projection."))}
    save_safetensors(text_only, paths["clip_file"],
                     {"config": json.dumps(clip_cfg["text_config"])} if config_in_metadata else None)
    save_safetensors(clip_sd, paths["clip_folder"] / "model.safetensors", {"format": "pt"})
    atomic_write_text(paths["clip_folder"] / "config.json", json.dumps(clip_cfg, indent=2))
    _copy_tokenizer(paths["clip_tokenizer"], paths["clip_folder"])
    return paths


def make_fp8_scaled_copy(src, dst, style: str = "scaled_fp8") -> dict[str, torch.Tensor]:
    """Write `src` with its 2-D layer weights in fp8 e4m3 + a per-tensor scale, as ComfyUI's fp8-scaled files.

    style "scaled_fp8": `scaled_fp8` marker + `<layer>.scale_weight` (older files);
    style "comfy_quant": `<layer>.weight_scale` + `<layer>.comfy_quant` JSON bytes (newer files).
    Returns {weight key: the float32 weight the fp8 file stands for (fp8 value * scale)}.
    """
    from safetensors.torch import load_file

    if style not in ("scaled_fp8", "comfy_quant"):
        raise ValueError(f"style must be 'scaled_fp8' or 'comfy_quant', got {style!r}")
    tensors = load_file(str(src))
    out, expected = {}, {}
    for key, w in tensors.items():
        if not (".layers." in key and key.endswith(".weight") and w.ndim == 2):
            out[key] = w
            continue
        scale = (w.abs().max().float() / 448.0).clamp(min=1e-12)
        w8 = (w.float() / scale).to(torch.float8_e4m3fn)
        layer = key[: -len(".weight")]
        out[key] = w8
        expected[key] = w8.float() * scale
        if style == "scaled_fp8":
            out[layer + ".scale_weight"] = scale.reshape(())
        else:
            out[layer + ".weight_scale"] = scale.reshape(())
            out[layer + ".comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
    if style == "scaled_fp8":
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_safetensors(out, dst, read_safetensors_header(src)[1])
    return expected
