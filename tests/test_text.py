"""k5core.text: templates, crop, masks, batching, file layouts, widths, quantization.

Tiny random Qwen2.5-VL and CLIP models with real (tiny, trained) tokenizers are written by
k5core.tiny.text in the layouts users have and loaded through the real loaders. The oracle is
transformers' own Qwen2_5_VLForConditionalGeneration / CLIPTextModel run the way the official
kandinsky/models/text_embedders.py runs them.
"""
import json
import os
import shutil

import pytest
import torch

from k5core.files import save_safetensors
from k5core.text import (CONTENT_TYPES, OFFICIAL_CROP_START, PROMPT_TEMPLATES, ClipEncoder, QwenEncoder,
                         TextEmbeds, TextEncoder, crop_start)
from k5core.tiny import TINY_POOLED_DIM, TINY_TEXT_DIM
from k5core.tiny.text import make_fp8_scaled_copy, make_tiny_text_encoders

DIMS = {"text_dim": TINY_TEXT_DIM, "pooled_dim": TINY_POOLED_DIM}
PROMPTS = ["A red fox runs through fresh snow in a quiet forest at dawn, the camera slowly follows it.",
           "hi", "", "Waves crash on black rocks."]



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_text_encoders(tmp_path_factory.mktemp("te"))


@pytest.fixture(scope="module")
def enc(tiny):
    return TextEncoder.load(tiny["qwen_folder"], tiny["clip_folder"], **DIMS)


def _official_qwen(folder, prompts, content, max_length):
    """The official embedder's procedure with transformers' full Qwen2.5-VL model (the oracle)."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(folder), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    crop = crop_start(tok, content)
    inputs = tok([PROMPT_TEMPLATES[content].format(p) for p in prompts], max_length=max_length + crop,
                 truncation=True, return_tensors="pt", padding="max_length")
    with torch.no_grad():
        hidden = model(input_ids=inputs["input_ids"], return_dict=True, output_hidden_states=True)
    return hidden["hidden_states"][-1][:, crop:], inputs["attention_mask"][:, crop:].bool()


@pytest.mark.parametrize("content", CONTENT_TYPES)
def test_matches_official_embedder(tiny, enc, content):
    prompts = [p for p in PROMPTS if len(p) > 10] if content == "image_edit" else PROMPTS
    ref_embed, ref_mask = _official_qwen(tiny["qwen_folder"], prompts, content, max_length=12)
    embed, mask = enc.qwen.encode(prompts, content, max_length=12, pad_to="max_length")
    assert embed.shape == (len(prompts), 12, TINY_TEXT_DIM)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(embed[mask], ref_embed[ref_mask], atol=1e-5, rtol=1e-5)
    assert not embed[~mask].any()


def test_clip_matches_official(tiny, enc):
    from transformers import CLIPTextModel, CLIPTokenizer

    model = CLIPTextModel.from_pretrained(str(tiny["clip_folder"]), local_files_only=True).eval()
    tok = CLIPTokenizer.from_pretrained(str(tiny["clip_folder"]), local_files_only=True)
    inputs = tok(PROMPTS, max_length=77, truncation=True, padding="max_length", return_tensors="pt")
    with torch.no_grad():
        ref = model(**inputs)["pooler_output"]
    pooled = enc.clip.encode(PROMPTS)
    assert pooled.shape == (len(PROMPTS), TINY_POOLED_DIM)
    torch.testing.assert_close(pooled, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pooled[0], pooled[1])  # different prompts, different vectors


@pytest.mark.parametrize("content", CONTENT_TYPES)
def test_template_and_crop_keep_exactly_the_prompt(enc, content):
    tok = enc.qwen.tokenizer
    prompt = "A cartoon robot dances in a colorful kitchen"
    crop = enc.qwen.crop_start(content)
    prefix = PROMPT_TEMPLATES[content].split("{}")[0]
    assert crop == len(tok(prefix)["input_ids"]) + (3 if content == "image_edit" else 0)
    ids = tok(PROMPT_TEMPLATES[content].format(prompt))["input_ids"]
    kept = tok.decode(ids[crop:])
    prompt_ids = tok(prompt)["input_ids"]
    if content == "image_edit":  # official quirk: 55 = 52 template tokens + the first 3 prompt tokens
        assert kept == tok.decode(prompt_ids[3:])
    else:
        assert kept == prompt + "<|im_end|>"
    embeds = enc.encode([prompt], content)
    assert embeds.text_mask.tolist() == [[True] * (len(ids) - crop)]


def test_batch_equals_single(enc):
    batch = enc.encode(PROMPTS, "video")
    assert batch.text_embed.shape[1] == int(batch.lengths.max())  # padded to the longest prompt
    for i, prompt in enumerate(PROMPTS):
        alone = enc.encode([prompt], "video")
        n = alone.text_embed.shape[1]
        assert int(batch.lengths[i]) == n and alone.text_mask.all()
        torch.testing.assert_close(batch.text_embed[i, :n], alone.text_embed[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batch.pooled[i], alone.pooled[0], atol=1e-5, rtol=1e-5)
        assert not batch.text_embed[i, n:].any() and not batch.text_mask[i, n:].any()
        torch.testing.assert_close(batch.select(i).text_embed, alone.text_embed, atol=1e-5, rtol=1e-5)


def test_truncation_keeps_the_first_max_length_tokens(enc):
    long = " ".join(["the camera moves slowly over waves"] * 20)
    full = enc.encode([long], "video")
    cut = enc.encode([long], "video", max_length=8)
    assert full.text_embed.shape[1] > 8 and cut.text_embed.shape[1] == 8
    torch.testing.assert_close(cut.text_embed[0], full.text_embed[0, :8], atol=1e-5, rtol=1e-5)
    padded = enc.encode(["hi"], "video", max_length=20, pad_to="max_length")
    assert padded.text_embed.shape == (1, 20, TINY_TEXT_DIM) and int(padded.lengths[0]) < 20


def test_text_embeds_cat_pad_select_to(enc):
    pos, neg = enc.encode([PROMPTS[0]]), enc.encode([""])
    both = TextEmbeds.cat([pos, neg])
    batch = enc.encode([PROMPTS[0], ""])
    torch.testing.assert_close(both.text_embed, batch.text_embed, atol=1e-5, rtol=1e-5)
    assert torch.equal(both.text_mask, batch.text_mask)
    assert both.select([1]).text_embed.shape[1] == int(neg.lengths[0])
    assert both.pad_to(40).text_embed.shape[1] == 40
    with pytest.raises(ValueError, match="has"):
        both.pad_to(1)
    half = both.to(dtype=torch.float16)
    assert half.text_embed.dtype == torch.float16 and half.text_mask.dtype == torch.bool


def test_single_files_equal_folders(tiny, enc):
    # Tokenizers are not passed: they are found in the fake ComfyUI install that holds the files.
    files = TextEncoder.load(tiny["qwen_file"], tiny["clip_file"], **DIMS)
    a, b = files.encode(PROMPTS, "image"), enc.encode(PROMPTS, "image")
    assert torch.equal(a.text_embed, b.text_embed) and torch.equal(a.text_mask, b.text_mask)
    assert torch.equal(a.pooled, b.pooled)
    assert "visual" not in " ".join(n for n, _ in files.qwen.model.named_parameters())


def test_config_inferred_from_shapes_like_comfyui_files(tmp_path):
    # ComfyUI's single files carry no config: heads come from head_dim 128 (Qwen) / 64 (CLIP).
    paths = make_tiny_text_encoders(tmp_path, text_dim=128, pooled_dim=64, qwen_head_dim=128, clip_head_dim=64,
                                    config_in_metadata=False)
    dims = {"text_dim": 128, "pooled_dim": 64}
    files = TextEncoder.load(paths["qwen_file"], paths["clip_file"], **dims)
    folders = TextEncoder.load(paths["qwen_folder"], paths["clip_folder"], **dims)
    assert files.qwen.model.config.num_attention_heads == 1 and files.clip.model.config.num_attention_heads == 1
    a, b = files.encode(PROMPTS[:2]), folders.encode(PROMPTS[:2])
    assert torch.equal(a.text_embed, b.text_embed) and torch.equal(a.pooled, b.pooled)


@pytest.mark.parametrize("style", ["scaled_fp8", "comfy_quant"])
def test_fp8_scaled_file_is_dequantized(tiny, enc, tmp_path, style):
    dst = tmp_path / "qwen_2.5_vl_7b_fp8_scaled.safetensors"
    expected = make_fp8_scaled_copy(tiny["qwen_file"], dst, style)
    qwen = QwenEncoder.load(dst, tokenizer=tiny["qwen_tokenizer"], text_dim=TINY_TEXT_DIM)
    weight = qwen.model.layers[1].mlp.down_proj.weight
    assert torch.equal(weight, expected["model.layers.1.mlp.down_proj.weight"])
    got, ref = qwen.encode(PROMPTS[:2])[0], enc.qwen.encode(PROMPTS[:2])[0]
    assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.99


def test_unsupported_comfy_quant_format_is_named(tiny, tmp_path):
    from safetensors.torch import load_file

    src = tmp_path / "fp8.safetensors"
    make_fp8_scaled_copy(tiny["qwen_file"], src, "comfy_quant")
    tensors = load_file(str(src))
    tensors["model.layers.0.mlp.up_proj.comfy_quant"] = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    save_safetensors(tensors, tmp_path / "nvfp4.safetensors")
    with pytest.raises(ValueError, match="nvfp4"):
        QwenEncoder.load(tmp_path / "nvfp4.safetensors", tokenizer=tiny["qwen_tokenizer"], text_dim=TINY_TEXT_DIM)


def _fake_qwen(path, hidden):
    save_safetensors({"model.embed_tokens.weight": torch.zeros(8, hidden),
                      "model.layers.0.self_attn.k_proj.bias": torch.zeros(hidden // 8)}, path)
    return path


def test_qwen_3b_and_other_widths_are_refused(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"2048 \(Qwen2\.5-VL-3B\).*needs 3584.*Qwen2\.5-VL-7B-Instruct"):
        QwenEncoder.load(_fake_qwen(tmp_path / "qwen_2.5_vl_3b.safetensors", 2048))
    folder = tmp_path / "Qwen2.5-VL-3B-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hidden_size": 2048, "model_type": "qwen2_5_vl"}))
    _fake_qwen(folder / "model.safetensors", 2048)
    with pytest.raises(ValueError, match="3B"):
        TextEncoder.load(folder, tiny["clip_folder"])
    with pytest.raises(ValueError, match=r"width 32, but the diffusion model needs 3584"):
        QwenEncoder.load(tiny["qwen_folder"])  # the DiT's in_text_dim defaults to the real 3584
    with pytest.raises(ValueError, match=r"width 16, but the diffusion model needs 768.*CLIP-L"):
        ClipEncoder.load(tiny["clip_folder"])


def test_wrong_files_are_named(tiny, tmp_path):
    dit = save_safetensors({"text_embeddings.in_layer.weight": torch.zeros(4, 4),
                            "visual_transformer_blocks.0.ff.in_layer.weight": torch.zeros(4, 4)},
                           tmp_path / "kandinsky5lite_t2v.safetensors")
    with pytest.raises(ValueError, match="kandinsky5lite_t2v.safetensors: not a Qwen.*diffusion model"):
        QwenEncoder.load(dit)
    with pytest.raises(ValueError, match="not a CLIP text encoder.*diffusion model"):
        ClipEncoder.load(dit)
    with pytest.raises(ValueError, match="not a Qwen.*CLIP text encoder"):
        QwenEncoder.load(tiny["clip_file"])
    with pytest.raises(ValueError, match="not a CLIP text encoder.*LLM"):
        ClipEncoder.load(tiny["qwen_file"])
    partial = save_safetensors({"model.embed_tokens.weight": torch.zeros(1000, TINY_TEXT_DIM)},
                               tmp_path / "qwen-part.safetensors")
    with pytest.raises(ValueError, match="qwen-part.safetensors: incomplete checkpoint"):
        QwenEncoder.load(partial, tokenizer=tiny["qwen_tokenizer"], text_dim=TINY_TEXT_DIM)
    cut = tmp_path / "qwen_cut.safetensors"
    cut.write_bytes(tiny["qwen_file"].read_bytes()[:-100])
    with pytest.raises(ValueError, match="qwen_cut.safetensors: truncated"):
        QwenEncoder.load(cut)
    with pytest.raises(FileNotFoundError, match="no such file"):
        QwenEncoder.load(tmp_path / "missing.safetensors")


def test_tokenizer_lookup(tiny, tmp_path):
    lone = tmp_path / "elsewhere" / "qwen.safetensors"
    lone.parent.mkdir()
    shutil.copy(tiny["qwen_file"], lone)
    with pytest.raises(FileNotFoundError, match=r"no qwen tokenizer found(.|\n)*qwen25_tokenizer(.|\n)*tokenizer="):
        QwenEncoder.load(lone, text_dim=TINY_TEXT_DIM)
    by_root = QwenEncoder.load(lone, comfy_root=tiny["comfy_root"], text_dim=TINY_TEXT_DIM)
    by_path = QwenEncoder.load(lone, tokenizer=tiny["qwen_tokenizer"], text_dim=TINY_TEXT_DIM)
    assert torch.equal(by_root.encode(["hi there"])[0], by_path.encode(["hi there"])[0])
    broken = tmp_path / "broken_tok"
    shutil.copytree(tiny["qwen_tokenizer"], broken)
    (broken / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match="broken_tok: not a tokenizer folder"):
        QwenEncoder.load(lone, tokenizer=broken, text_dim=TINY_TEXT_DIM)
    with pytest.raises(ValueError, match="not a Qwen2.5 tokenizer"):
        QwenEncoder.load(lone, tokenizer=tiny["clip_tokenizer"], text_dim=TINY_TEXT_DIM)


def test_bad_prompts(enc):
    with pytest.raises(ValueError, match="empty"):
        enc.encode([])
    with pytest.raises(TypeError, match="must be str"):
        enc.encode(["ok", None])
    with pytest.raises(ValueError, match="content must be one of"):
        enc.encode(["ok"], content="audio")
    with pytest.raises(ValueError, match="no tokens left after the official image_edit crop"):
        enc.encode(["hi"], content="image_edit")


def test_unload_keeps_embeddings(tiny):
    te = TextEncoder.load(tiny["qwen_file"], tiny["clip_file"], **DIMS)
    embeds = te.encode(["a fox"]).to("cpu")
    te.to("cpu")
    te.unload()
    assert te.qwen.model is None and te.clip.model is None
    with pytest.raises(RuntimeError, match="unloaded"):
        te.encode(["a fox"])
    assert embeds.text_embed.abs().sum() > 0 and len(embeds) == 1


def test_tiny_encoders_are_deterministic(tiny, tmp_path):
    again = make_tiny_text_encoders(tmp_path)
    for name in ("qwen_file", "clip_file"):
        assert again[name].read_bytes() == tiny[name].read_bytes()
    for name in ("qwen_tokenizer", "clip_tokenizer"):
        for f in tiny[name].iterdir():
            assert (again[name] / f.name).read_bytes() == f.read_bytes()


def _bnb_support(method):
    """None when bitsandbytes can quantize a Linear on this CPU, else the reason why not."""
    try:
        import bitsandbytes as bnb
        lin = torch.nn.Linear(64, 64)
        if method == "nf4":
            q = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4")
        else:
            q = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
            q.weight = bnb.nn.Int8Params(lin.weight.data, requires_grad=False, has_fp16_weights=False)
        q.to("cpu")(torch.randn(2, 64))
    except Exception as e:  # ImportError or no CPU kernel
        return f"bitsandbytes {method} does not run on this CPU: {type(e).__name__}: {e}"
    return None


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_quantized_qwen(tiny, enc, method):
    reason = _bnb_support(method)
    if reason:
        pytest.skip(reason)
    import bitsandbytes as bnb

    qwen = QwenEncoder.load(tiny["qwen_folder"], quantization=method, text_dim=TINY_TEXT_DIM)
    kind = bnb.nn.Linear4bit if method == "nf4" else bnb.nn.Linear8bitLt
    assert isinstance(qwen.model.layers[0].self_attn.q_proj, kind)
    assert isinstance(qwen.model.layers[1].mlp.down_proj, kind)
    got, mask = qwen.encode(PROMPTS)
    ref, ref_mask = enc.qwen.encode(PROMPTS)
    assert torch.equal(mask, ref_mask) and not got[~mask].any()
    assert torch.nn.functional.cosine_similarity(got[mask], ref[mask], dim=-1).mean() > 0.9


def test_official_crops_with_the_real_qwen_tokenizer():
    folder = os.environ.get("K5_QWEN_TOKENIZER")
    if not folder:
        pytest.skip("set K5_QWEN_TOKENIZER to a Qwen2.5 tokenizer folder (e.g. ComfyUI's "
                    "comfy/text_encoders/qwen25_tokenizer) to check the official crops")
    from transformers import Qwen2TokenizerFast

    tok = Qwen2TokenizerFast.from_pretrained(folder, local_files_only=True)
    assert {c: crop_start(tok, c) for c in CONTENT_TYPES} == OFFICIAL_CROP_START


# ---------------------------------------------------------------------------- image_edit with the source image
EDIT_IMAGE = (torch.rand(120, 176, 3, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8)


def _official_qwen_with_image(folder, prompt, image):
    """The official image_edit procedure for one prompt: image tokens + <|im_end|> appended, the image
    halved, processor (the official one when torchvision is there to build it), full model, crop."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from k5core.text import IMAGE_TOKENS, qwen_image_processor

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(folder), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    x = image.permute(2, 0, 1)[None]                                       # (1, 3, H, W) uint8
    h, w = x.shape[-2:]
    try:
        import torchvision.transforms.functional as F
        half = F.resize(x, (h // 2, w // 2))
    except ImportError:  # what torchvision's resize does on uint8: antialiased bilinear, rounded
        half = torch.nn.functional.interpolate(x.float(), size=(h // 2, w // 2), mode="bilinear", antialias=True)
        half = half.round().to(torch.uint8)
    text = PROMPT_TEMPLATES["image_edit"].format(prompt) + IMAGE_TOKENS + "<|im_end|>"
    try:
        from transformers import Qwen2_5_VLProcessor
        processor = Qwen2_5_VLProcessor(image_processor=qwen_image_processor(), tokenizer=tok)
        inputs = processor(text=[text], images=[half], padding=True, return_tensors="pt")
    except (AttributeError, ImportError, ValueError):  # no torchvision: the processor's own two steps
        pixels = qwen_image_processor()(images=[half], return_tensors="pt")
        n = int(pixels["image_grid_thw"].prod()) // 4
        inputs = {**tok([text.replace("<|image_pad|>", "<|image_pad|>" * n)], return_tensors="pt"), **pixels}
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True)["hidden_states"][-1]
    return hidden[0, crop_start(tok, "image_edit"):]


@pytest.mark.parametrize("source", ["qwen_file", "qwen_folder"])
def test_image_edit_with_image_matches_official(tiny, source):
    te = QwenEncoder.load(tiny[source], text_dim=TINY_TEXT_DIM)
    te.encode(["a fox"], "video")
    assert te._vl is None                                  # text-only encodes never read the vision tower
    prompts = [PROMPTS[0], "", "hi"]                       # empty and short prompts keep the image tokens
    embed, mask = te.encode(prompts, "image_edit", images=EDIT_IMAGE)
    assert te._vl is not None
    for i, prompt in enumerate(prompts):
        ref = _official_qwen_with_image(tiny["qwen_folder"], prompt, EDIT_IMAGE)
        n = int(mask[i].sum())
        assert n == ref.shape[0] and bool(mask[i, :n].all())
        torch.testing.assert_close(embed[i, :n], ref, atol=1e-5, rtol=1e-5)
        assert not embed[i, n:].any()
    # 60x88 half image -> 56x84 -> 4x6 patches -> 6 merged tokens, + vision_start/end, im_end, - 3 cropped
    assert int(mask[1].sum()) == 6 + 3 - 3


def test_image_edit_empty_negative_prompt_and_image_forms(enc):
    both = enc.encode(["Waves crash on black rocks.", ""], "image_edit", images=EDIT_IMAGE)
    assert both.lengths[1] > 0 and both.pooled.shape == (2, TINY_POOLED_DIM)
    alone = enc.encode([""], "image_edit", images=EDIT_IMAGE.float() / 255)   # float in [0, 1]: same
    torch.testing.assert_close(alone.text_embed[0], both.select(1).text_embed[0], atol=1e-5, rtol=1e-5)
    per_prompt = enc.encode(["Waves crash on black rocks.", ""], "image_edit", images=[EDIT_IMAGE, EDIT_IMAGE])
    torch.testing.assert_close(per_prompt.text_embed, both.text_embed)
    other = enc.encode([""], "image_edit", images=EDIT_IMAGE.flip(0))
    assert not torch.allclose(other.text_embed, alone.text_embed)          # the image is really read
    with pytest.raises(ValueError, match="only the image_edit template"):
        enc.encode(["a fox"], "image", images=EDIT_IMAGE)
    with pytest.raises(ValueError, match="one per prompt"):
        enc.encode(["a", "b", "c"], "image_edit", images=[EDIT_IMAGE, EDIT_IMAGE])
    with pytest.raises(ValueError, match="expected \\(H, W, 3\\)"):
        enc.encode(["a fox"], "image_edit", images=EDIT_IMAGE.permute(2, 0, 1))
    with pytest.raises(ValueError, match="neither truncates nor pads"):
        enc.qwen.encode(["a fox"], "image_edit", max_length=12, images=EDIT_IMAGE)


def test_image_edit_without_vision_tower_is_named(tiny, tmp_path):
    from safetensors.torch import load_file

    text_only = {k: v for k, v in load_file(str(tiny["qwen_file"])).items() if not k.startswith("visual.")}
    path = tmp_path / "qwen_text_only.safetensors"
    save_safetensors(text_only, path, {"config": (tiny["qwen_folder"] / "config.json").read_text()})
    te = QwenEncoder.load(path, tokenizer=tiny["qwen_tokenizer"], text_dim=TINY_TEXT_DIM)
    te.encode([PROMPTS[0]], "image_edit")                   # text only still works
    with pytest.raises(ValueError, match="has no vision tower"):
        te.encode([PROMPTS[0]], "image_edit", images=EDIT_IMAGE)
