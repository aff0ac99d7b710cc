"""LoRA: targets, training, save/load round trip, merged vs unmerged, foreign key formats checked
against the key rules of musubi-tuner and ComfyUI (re-implemented below as oracles) and against
diffusers + PEFT loading the same file, fp8 base weights, and bad files."""
import json
import re
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from k5core.dit import K5DiT
from k5core.files import read_safetensors_header
from k5core.loading import build_dit
from k5core.lora import (LoRAError, LoRANetwork, LoRAWarning, apply_loras, applied_loras,
                         linear_modules, read_lora, remove_loras, set_lora_multiplier,
                         training_metadata)
from k5core.tasks import TINY, get_task
from k5core.tiny.dit import diffusers_config, randomize_, tiny_state_dict

TASK = "k5-tiny-t2v"
RANK, ALPHA = 4, 2.0          # scale 1/2: exact in every dtype



def tiny_model(seed=0, dtype=torch.float32):
    model = build_dit(get_task(TASK))
    model.load_state_dict(tiny_state_dict(TASK, seed))
    return model.to(dtype).eval()


def inputs(seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 33, 1, 4, 4, generator=g)
    return (x.to(dtype), torch.tensor([300.0, 800.0]), torch.randn(2, 5, 32, generator=g).to(dtype),
            torch.randn(2, 16, generator=g).to(dtype))


def run(model, seed=1, dtype=torch.float32):
    with torch.no_grad():
        return model(*inputs(seed, dtype))


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def random_network(model, seed=0, rank=RANK, alpha=ALPHA, **kw):
    """A network with random (bf16-representable) up and down, so every format holds it exactly."""
    net = LoRANetwork(model, rank=rank, alpha=alpha, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.3).bfloat16().float())
    return net


def saved_lora(tmp_path, seed=0, name="a", **kw):
    return random_network(tiny_model(), seed, **kw).save(tmp_path / f"{name}.safetensors")


# ----------------------------------------------------------------------------- targets
def test_default_targets_are_musubis_attention_and_ff_layers():
    net = LoRANetwork(tiny_model(), rank=RANK)
    paths = set(net.paths.values())
    # 1 text block (self-attention 4 + FF 2) + 2 visual blocks (self 4 + cross 4 + FF 2)
    assert len(paths) == 6 + 2 * 10
    assert "visual_transformer_blocks.1.cross_attention.to_value" in paths
    assert "text_transformer_blocks.0.feed_forward.out_layer" in paths
    assert not any("modulation" in p or p.startswith(("out_layer", "time_", "text_emb", "visual_emb"))
                   for p in paths)


def test_include_exclude_patterns():
    model = tiny_model()
    visual = LoRANetwork(model, rank=RANK, exclude=[r"text_transformer_blocks\..*"])
    assert len(visual.paths) == 20 and all(p.startswith("visual") for p in visual.paths.values())
    qk = LoRANetwork(model, rank=RANK, include=r".*self_attention\.to_(query|key)")
    assert len(qk.paths) == 6
    everything = LoRANetwork(model, rank=RANK, include=".*", exclude=[])
    assert len(everything.paths) == len(linear_modules(model))  # modulation only excluded by default
    with pytest.raises(ValueError, match="no Linear layer of the model matches"):
        LoRANetwork(model, include=r"nothing\.here")
    with pytest.raises(ValueError, match="not a valid regex"):
        LoRANetwork(model, include="(")


def musubi_lora_names(model) -> set[str]:
    """Oracle: the LoRA module names musubi-tuner creates for Kandinsky 5 with its defaults, as read in
    kohya-ss/musubi-tuner src/musubi_tuner/networks/lora.py (LoRANetwork.create_modules: Linear
    children of the target block classes, `f"{prefix}.{block}.{child}".replace(".", "_")`, skipped
    when an exclude pattern fullmatches and no include pattern does) and networks/lora_kandinsky.py
    (target classes, prefix "lora_unet", the include list and the `.*modulation.*` exclude)."""
    include = [re.compile(p) for p in (
        r".*self_attention\.to_query.*", r".*self_attention\.to_key.*", r".*self_attention\.to_value.*",
        r".*self_attention\.out_layer.*", r".*cross_attention\.to_query.*", r".*cross_attention\.to_key.*",
        r".*cross_attention\.to_value.*", r".*cross_attention\.out_layer.*", r".*feed_forward\.in_layer.*",
        r".*feed_forward\.out_layer.*")]
    exclude = [re.compile(r".*modulation.*")]
    names = set()
    for name, module in model.named_modules():
        if type(module).__name__ not in ("TransformerEncoderBlock", "TransformerDecoderBlock"):
            continue
        for child_name, child in module.named_modules():
            if type(child).__name__ != "Linear":
                continue
            original = f"{name}.{child_name}"
            excluded = any(p.fullmatch(original) for p in exclude)
            included = any(p.fullmatch(original) for p in include)
            if not (excluded and not included):
                names.add(f"lora_unet.{original}".replace(".", "_"))
    return names


def test_default_network_equals_musubis_module_names():
    model = tiny_model()
    assert set(LoRANetwork(model, rank=RANK).paths) == musubi_lora_names(model)


# ----------------------------------------------------------------------------- training
def test_new_network_is_identity_and_trains_only_the_lora():
    model = tiny_model()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    want = run(model)
    net = LoRANetwork(model, rank=RANK, alpha=ALPHA).apply_to()
    assert torch.equal(run(model), want)  # up starts at zero
    params = net.trainable_parameters()
    assert len(params) == 2 * 26 and all(p.requires_grad and p.dtype == torch.float32 for p in params)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_adapters" not in n)
    x, t, text, pooled = inputs()
    losses = []
    model.train()
    for _ in range(5):                             # plain SGD towards a zero output
        loss = model(x, t, text, pooled).pow(2).mean()
        loss.backward()
        with torch.no_grad():
            for p in params:
                p -= 5.0 * p.grad
                p.grad = None
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.9 * losses[0]
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_adapters" not in n)
    # the base model's own keys are untouched; the adapters add documented keys while attached
    lora_keys = [k for k in model.state_dict() if k not in base_state]
    assert lora_keys and all(".lora_adapters.network." in k for k in lora_keys)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base_state.items())
    net.remove()
    assert list(model.state_dict()) == list(base_state)
    assert torch.equal(run(model.eval()), want)


def test_lora_params_keep_their_dtype_over_a_bf16_base():
    model = tiny_model(dtype=torch.bfloat16)
    net = random_network(model).apply_to()
    assert all(p.dtype == torch.float32 for p in net.trainable_parameters())
    x, t, text, pooled = inputs(dtype=torch.bfloat16)
    out = model(x, t, text, pooled)
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in net.parameters())


def test_dropouts_act_in_training_only():
    model = tiny_model()
    want = run(model)
    net = random_network(model, module_dropout=1.0).apply_to()
    lora_out = run(model)
    assert not torch.allclose(lora_out, want)
    model.train()
    assert torch.equal(run(model), want)           # every module dropped
    net.remove()
    for kw in ({"dropout": 0.5}, {"rank_dropout": 0.5}):
        net = random_network(model, **kw).apply_to()
        assert torch.equal(run(model.eval()), lora_out)   # eval: no dropout
        torch.manual_seed(0)
        assert not torch.allclose(run(model.train()), lora_out)
        net.remove()


def test_adapters_live_in_their_blocks_for_block_swap():
    """Block swap moves whole blocks (`block.to(device)`): every adapter must be inside its block."""
    model = tiny_model()
    net = random_network(model).apply_to()
    in_blocks = {id(p) for blocks in (model.text_transformer_blocks, model.visual_transformer_blocks)
                 for b in blocks for p in b.parameters()}
    assert {id(p) for p in net.parameters()} <= in_blocks
    block = model.visual_transformer_blocks[1]
    before = run(model)
    block.to(torch.float64).to(torch.float32)      # a round trip through another placement
    assert torch.equal(run(model), before)
    assert all(p.dtype == torch.float32 for p in net.parameters())


# ----------------------------------------------------------------------------- save / load
def test_save_load_round_trip_and_metadata(tmp_path):
    model = tiny_model()
    net = random_network(model, rank_dropout=0.1)
    meta = training_metadata(task=TASK, steps=12, epoch=3, datasets=[{"items": 4, "resolution": [64, 64]}],
                             learning_rate=1e-4)
    path = net.save(tmp_path / "out" / "my_lora.safetensors", meta)
    assert [p.name for p in path.parent.iterdir()] == ["my_lora.safetensors"]   # no temp file left
    header, md = read_safetensors_header(path)
    assert "lora_unet_visual_transformer_blocks_0_self_attention_to_query.lora_down.weight" in header
    assert header["lora_unet_visual_transformer_blocks_0_self_attention_to_query.lora_up.weight"]["shape"] == [64, RANK]
    assert header["lora_unet_text_transformer_blocks_0_feed_forward_in_layer.alpha"]["shape"] == []
    assert md["ss_network_dim"] == "4" and md["ss_network_alpha"] == "2.0"
    assert md["ss_network_module"] == "networks.lora_kandinsky"
    assert md["ss_base_model_version"] == "kandinsky5" and md["modelspec.architecture"] == "Kandinsky-5/lora"
    assert md["k5_task"] == TASK and md["ss_steps"] == "12" and md["ss_epoch"] == "3"
    assert json.loads(md["ss_datasets"]) == [{"items": 4, "resolution": [64, 64]}]
    assert json.loads(md["ss_network_args"])["rank_dropout"] == 0.1
    assert md["modelspec.title"] == "my_lora"

    fresh = LoRANetwork(tiny_model(), rank=RANK, alpha=ALPHA)
    fresh.load_state_dict(load_file(path))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), net.state_dict().values()))
    assert read_lora(path, model).metadata["ss_steps"] == "12"
    with pytest.raises(LoRAError, match="rank 4; the network has rank 8"):
        LoRANetwork(tiny_model(), rank=8).load_state_dict(load_file(path))
    with pytest.raises(LoRAError, match="0 modules missing.*6 unexpected"):
        LoRANetwork(tiny_model(), rank=RANK, exclude=r"text_.*").load_state_dict(load_file(path))

    bf16 = net.save(tmp_path / "half.safetensors", dtype=torch.bfloat16)
    header, _ = read_safetensors_header(bf16)
    assert header["lora_unet_visual_transformer_blocks_0_feed_forward_in_layer.lora_up.weight"]["dtype"] == "BF16"
    assert header["lora_unet_visual_transformer_blocks_0_feed_forward_in_layer.alpha"]["dtype"] == "F32"


def test_save_refuses_non_finite_and_keeps_the_old_file(tmp_path):
    net = random_network(tiny_model())
    path = net.save(tmp_path / "l.safetensors")
    old = path.read_bytes()
    with torch.no_grad():
        net.lora_unet_visual_transformer_blocks_1_feed_forward_out_layer.lora_up.weight[0, 0] = float("nan")
    with pytest.raises(LoRAError, match="lora_unet_visual_transformer_blocks_1_feed_forward_out_layer.lora_up.weight"):
        net.save(path)
    assert path.read_bytes() == old and len(list(tmp_path.iterdir())) == 1


def test_applied_file_equals_the_trained_network(tmp_path):
    model = tiny_model()
    net = random_network(model).apply_to()
    want = run(model)
    path = net.save(tmp_path / "l.safetensors")
    net.remove()
    names = apply_loras(model, [path], merge=False)
    assert torch.equal(run(model), want)
    assert applied_loras(model) == {names[0]: {"source": str(path), "multiplier": 1.0, "merged": False}}


# ----------------------------------------------------------------------------- applying
def test_merged_equals_unmerged(tmp_path):
    path = saved_lora(tmp_path)
    base = run(tiny_model())
    unmerged, merged = tiny_model(), tiny_model()
    apply_loras(unmerged, [(path, 0.7)], merge=False)
    apply_loras(merged, [(path, 0.7)], merge=True)
    a, b = run(unmerged), run(merged)
    assert rel_err(a, base) > 1e-2          # the LoRA does something
    assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("merge", [False, True])
def test_multiplier_zero_is_the_base_model(tmp_path, merge):
    path = saved_lora(tmp_path)
    model = tiny_model()
    base = run(model)
    apply_loras(model, [(path, 0.0)], merge=merge)
    assert torch.equal(run(model), base)


@pytest.mark.parametrize("merge", [False, True])
def test_two_loras_add_up(tmp_path, merge):
    """LoRA A at 1.0 plus B at 0.5 equals one LoRA of rank 8 holding both (down stacked, up scaled)."""
    a, b = saved_lora(tmp_path, 0, "a"), saved_lora(tmp_path, 1, "b")
    sa, sb = load_file(a), load_file(b)
    both = {}
    for k in sa:
        if k.endswith(".lora_down.weight"):
            both[k] = torch.cat([sa[k], sb[k]])
        elif k.endswith(".lora_up.weight"):
            both[k] = torch.cat([sa[k] * (ALPHA / RANK), sb[k] * (0.5 * ALPHA / RANK)], dim=1)
    two, one = tiny_model(), tiny_model()
    apply_loras(two, [(a, 1.0), (b, 0.5)], merge=merge)
    apply_loras(one, [both], merge=merge)   # no alpha: alpha = rank, scale 1
    assert rel_err(run(two), run(one)) < 1e-5
    assert rel_err(run(two), run(tiny_model())) > 1e-2


def test_remove_restores_merged_weights_bit_exactly(tmp_path):
    a, b = saved_lora(tmp_path, 0, "a"), saved_lora(tmp_path, 1, "b")
    model = tiny_model(dtype=torch.bfloat16)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    base = run(model, dtype=torch.bfloat16)
    na, nb = apply_loras(model, [(a, 1.0), (b, -0.8)], merge=True)
    changed = model.state_dict()["visual_transformer_blocks.0.self_attention.to_query.weight"]
    assert not torch.equal(changed, original["visual_transformer_blocks.0.self_attention.to_query.weight"])
    only_a = tiny_model(dtype=torch.bfloat16)
    apply_loras(only_a, [a], merge=True)
    remove_loras(model, [nb])
    assert all(torch.equal(v, only_a.state_dict()[k]) for k, v in model.state_dict().items())
    set_lora_multiplier(model, na, 0.0)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    set_lora_multiplier(model, na, 1.0)
    remove_loras(model)
    assert list(model.state_dict()) == list(original)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    assert torch.equal(run(model, dtype=torch.bfloat16), base) and applied_loras(model) == {}


def test_unmerged_multiplier_switches_without_reloading(tmp_path):
    path = saved_lora(tmp_path)
    model, ref = tiny_model(), tiny_model()
    (name,) = apply_loras(model, [(path, 1.0)], merge=False)
    apply_loras(ref, [(path, 0.25)], merge=False)
    set_lora_multiplier(model, name, 0.25)
    assert torch.equal(run(model), run(ref))
    remove_loras(model)
    assert torch.equal(run(model), run(tiny_model()))


# ----------------------------------------------------------------------------- foreign formats
PATHS = list(linear_modules(build_dit(get_task(TASK))))


def foreign(sd: dict, fmt: str) -> dict:
    """Our file's tensors rewritten in another tool's key format."""
    out = {}
    for key, t in sd.items():
        stem, _, leaf = key.partition(".")
        path = next(p for p in PATHS if stem == "lora_unet_" + p.replace(".", "_"))
        alpha = sd[f"{stem}.alpha"].item()
        if fmt == "musubi-bf16":            # musubi saves every tensor in the save dtype
            out[key] = t.bfloat16()
        elif fmt in ("peft", "peft-default"):   # no alpha: the scale is baked into B
            prefix, tag = ("transformer.", "") if fmt == "peft" else ("base_model.model.", ".default")
            if leaf == "lora_down.weight":
                out[f"{prefix}{path}.lora_A{tag}.weight"] = t
            elif leaf == "lora_up.weight":
                out[f"{prefix}{path}.lora_B{tag}.weight"] = t * (alpha / RANK)
        elif fmt == "comfy":
            out[f"diffusion_model.{path}.{leaf}"] = t
        elif fmt == "comfy-AB":
            leaf = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(leaf, leaf)
            out[f"diffusion_model.{path}.{leaf}"] = t
        elif fmt == "bare":
            out[f"{path}.{leaf}"] = t
    return out


@pytest.mark.parametrize("fmt", ["musubi-bf16", "peft", "peft-default", "comfy", "comfy-AB", "bare"])
def test_foreign_key_formats_give_the_same_deltas(tmp_path, fmt):
    path = saved_lora(tmp_path)
    model = tiny_model()
    ours = read_lora(path, model).weights
    theirs = read_lora(foreign(load_file(path), fmt), model).weights
    assert set(theirs) == set(ours) and len(ours) == 26
    for p, w in ours.items():
        assert torch.allclose(theirs[p].delta(), w.delta(), rtol=1e-6, atol=1e-7), p
    net = LoRANetwork(tiny_model(), rank=RANK, alpha=ALPHA)
    net.load_state_dict(foreign(load_file(path), fmt))   # the network takes them too
    for p, a in net.adapters().items():
        assert torch.allclose(a.delta_weight(), ours[p].delta(), rtol=1e-6, atol=1e-7)


def test_peft_config_beside_the_file_gives_alpha(tmp_path):
    """The official camera LoRAs are PEFT files with the scale in config_lora.json (lora_alpha / r)."""
    path = saved_lora(tmp_path)
    model = tiny_model()
    folder = tmp_path / "camera"
    folder.mkdir()
    sd = {k: (v / (ALPHA / RANK) if ".lora_B" in k else v)      # B without the scale: alpha in the config
          for k, v in foreign(load_file(path), "peft-default").items()}
    save_file(sd, folder / "lora.safetensors")
    (folder / "config_lora.json").write_text(json.dumps({"r": RANK, "lora_alpha": ALPHA,
                                                          "target_modules": ["to_query"]}))
    got = read_lora(folder / "lora.safetensors", model).weights
    for p, w in read_lora(path, model).weights.items():
        assert torch.allclose(got[p].delta(), w.delta(), rtol=1e-6, atol=1e-7)


def comfy_key_map(model_keys) -> dict[str, str]:
    """Oracle: the LoRA key map ComfyUI builds for its native Kandinsky 5 model, re-implemented from
    pollockjj/ComfyUI comfy/lora.py `model_lora_keys_unet` (commit 618b803): for every
    `diffusion_model.*.weight` key `lora_unet_<path with _>` and `diffusion_model.<path>`; the
    Kandinsky5 branch adds `<path>` and `transformer.<path>`; `unet_to_diffusers` adds nothing
    (comfy/utils.py: no `num_res_blocks` in Kandinsky5's unet_config). ComfyUI's native model uses the
    official parameter names (comfy/ldm/kandinsky5/model.py), which K5DiT keeps."""
    key_map = {}
    for k in model_keys:
        if k.endswith(".weight"):
            key_map["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
            key_map[k[:-len(".weight")]] = k
        else:
            key_map[k] = k
    for k in model_keys:
        if k.endswith(".weight"):
            path = k[len("diffusion_model."):-len(".weight")]
            key_map[path] = k
            key_map["transformer." + path] = k
    return key_map


def comfy_load_lora(lora: dict, key_map: dict):
    """Oracle: comfy/lora.py `load_lora` with comfy/weight_adapter/lora.py `LoRAAdapter.load`
    (up/down names `.lora_up.weight`/`.lora_down.weight` or `.lora_B.weight`/`.lora_A.weight`, alpha
    at `<x>.alpha`) and `calculate_weight` (scale alpha / rank, 1.0 without alpha). Returns the
    weight deltas at strength 1 by model key and the keys ComfyUI would log as not loaded."""
    deltas, loaded = {}, set()
    for x, target in key_map.items():
        alpha = None
        if f"{x}.alpha" in lora:
            alpha = lora[f"{x}.alpha"].item()
            loaded.add(f"{x}.alpha")
        for up, down in (("lora_up.weight", "lora_down.weight"), ("lora_B.weight", "lora_A.weight")):
            if f"{x}.{up}" in lora:
                mat1, mat2 = lora[f"{x}.{up}"].float(), lora[f"{x}.{down}"].float()
                scale = alpha / mat2.shape[0] if alpha is not None else 1.0
                deltas[target] = scale * (mat1 @ mat2)
                loaded |= {f"{x}.{up}", f"{x}.{down}"}
                break
    return deltas, set(lora) - loaded


def test_saved_file_loads_in_comfyuis_native_kandinsky5_loader(tmp_path):
    model = tiny_model()
    path = saved_lora(tmp_path)
    lora = load_file(path)
    key_map = comfy_key_map([f"diffusion_model.{k}" for k in model.state_dict()])
    deltas, not_loaded = comfy_load_lora(lora, key_map)
    assert not_loaded == set()                       # ComfyUI logs no "lora key not loaded"
    ours = read_lora(path, model).weights
    assert set(deltas) == {f"diffusion_model.{p}.weight" for p in ours}
    for p, w in ours.items():
        assert torch.allclose(deltas[f"diffusion_model.{p}.weight"], w.delta(), rtol=1e-6, atol=1e-7)


class _Fp32Bfloat16:
    """diffusers' rotary step casts q/k to bfloat16; for an fp32 comparison its module sees
    `torch.bfloat16` as float32 (the same shim as tests/test_dit.py)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    bfloat16 = torch.float32


def test_peft_file_matches_diffusers_with_peft(tmp_path, monkeypatch):
    """diffusers' Kandinsky5Transformer3DModel.load_lora_adapter (PEFT) on the same PEFT file and
    weights gives the same output as apply_loras on K5DiT."""
    pytest.importorskip("peft")
    diffusers = pytest.importorskip("diffusers")
    import diffusers.models.transformers.transformer_kandinsky as dk
    monkeypatch.setattr(dk, "torch", _Fp32Bfloat16())   # as in test_dit: its rotary casts to bf16
    sd = tiny_state_dict(TASK, 0)
    ref = diffusers.Kandinsky5Transformer3DModel(
        **{k: v for k, v in diffusers_config(TASK).items() if not k.startswith("_")})
    ref.load_state_dict(sd)
    peft_sd = foreign(load_file(saved_lora(tmp_path)), "peft")
    ref.load_lora_adapter(dict(peft_sd), prefix="transformer")
    model = tiny_model()
    apply_loras(model, [peft_sd], merge=False)
    x, t, text, pooled = inputs()
    _, _, T, H, W = x.shape
    with torch.no_grad():
        want = ref.eval()(x.permute(0, 2, 3, 4, 1), text, t, pooled,
                          (torch.arange(T), torch.arange(H // 2), torch.arange(W // 2)),
                          torch.arange(text.shape[1]), scale_factor=(1.0, 2.0, 2.0),
                          return_dict=False).permute(0, 4, 1, 2, 3)
        got = model(x, t, text, pooled, scale_factor=(1.0, 2.0, 2.0))
        base = tiny_model()(x, t, text, pooled, scale_factor=(1.0, 2.0, 2.0))
    assert rel_err(got, base) > 1e-2
    assert rel_err(got, want) < 1e-4


# ----------------------------------------------------------------------------- fp8 base
def test_unmerged_lora_over_fp8_weights(tmp_path):
    fp8 = pytest.importorskip("k5core.fp8")
    path = saved_lora(tmp_path)
    model = fp8.quantize_model(tiny_model(), "e4m3fn_scaled")
    assert isinstance(model.visual_transformer_blocks[0].self_attention.to_query, fp8.FP8Linear)
    reference = tiny_model()                       # the dequantized weights in fp32, LoRA merged
    with torch.no_grad():
        for p, m in linear_modules(model).items():
            if isinstance(m, fp8.FP8Linear):
                reference.get_submodule(p).weight.copy_(m.dequantized_weight())
    with pytest.raises(LoRAError, match="cannot merge a LoRA into the torch.float8_e4m3fn weights"):
        apply_loras(model, [path], merge=True)
    assert applied_loras(model) == {}
    base = run(model)
    (name,) = apply_loras(model, [path])             # default on fp8: unmerged
    apply_loras(reference, [path], merge=True)
    assert applied_loras(model)[name]["merged"] is False
    assert rel_err(run(model), base) > 1e-2
    assert rel_err(run(model), run(reference)) < 1e-5
    remove_loras(model)
    assert torch.equal(run(model), base)
    # training over fp8: gradients reach the LoRA only
    net = random_network(model).apply_to()
    model(*inputs()).pow(2).mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_adapters" not in n)


def test_merge_refused_on_one_byte_weights_without_fp8_module(tmp_path):
    path = saved_lora(tmp_path)
    model = tiny_model()
    layer = model.visual_transformer_blocks[0].feed_forward.in_layer
    layer.weight.data = layer.weight.data.to(torch.float8_e4m3fn)
    with pytest.raises(LoRAError, match="'visual_transformer_blocks.0.feed_forward.in_layer'.*merge=False"):
        apply_loras(model, [path], merge=True)


# ----------------------------------------------------------------------------- bad input
def test_lora_for_another_model_names_unmatched_keys(tmp_path):
    sd = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
          "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4),
          "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 8)}
    save_file(sd, tmp_path / "flux.safetensors")
    with pytest.raises(LoRAError, match=r"flux.safetensors: no key matches a Linear.*3 keys.*lora_te_text_model"):
        apply_loras(tiny_model(), [tmp_path / "flux.safetensors"])


def test_pro_lora_on_lite_is_a_shape_error(tmp_path):
    bigger = K5DiT(replace(TINY, model_dim=128, ff_dim=256))   # stands in for Pro vs Lite
    path = random_network(randomize_(bigger)).save(tmp_path / "big.safetensors")
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoRAError, match=r"big.safetensors: .*\(4, 128\).*expects \('rank', 64\).*Pro LoRA on a Lite"):
        apply_loras(model, [path])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_partially_matching_file_warns_with_the_count(tmp_path):
    path = saved_lora(tmp_path)
    sd = load_file(path)
    sd["lora_unet_visual_transformer_blocks_7_self_attention_to_query.lora_down.weight"] = torch.zeros(4, 64)
    sd["lora_unet_visual_transformer_blocks_7_self_attention_to_query.lora_up.weight"] = torch.zeros(64, 4)
    save_file(sd, tmp_path / "partial.safetensors")
    with pytest.warns(LoRAWarning, match=r"partial.safetensors: 2 of 80 keys match no Linear.*blocks_7"):
        apply_loras(tiny_model(), [tmp_path / "partial.safetensors"])


def test_non_finite_weights_are_refused(tmp_path):
    sd = load_file(saved_lora(tmp_path))
    sd["lora_unet_visual_transformer_blocks_0_cross_attention_to_key.lora_down.weight"][1, 2] = float("inf")
    save_file(sd, tmp_path / "inf.safetensors")
    model = tiny_model()
    with pytest.raises(LoRAError, match="inf.safetensors: LoRA tensor 'lora_unet_visual_transformer_blocks_0_"
                                        "cross_attention_to_key.lora_down.weight' holds NaN/inf"):
        apply_loras(model, [saved_lora(tmp_path, 1, "good"), tmp_path / "inf.safetensors"])
    assert applied_loras(model) == {}                 # nothing applied when one file is bad


def test_missing_factor_and_not_a_file(tmp_path):
    sd = load_file(saved_lora(tmp_path))
    del sd["lora_unet_visual_transformer_blocks_0_cross_attention_to_key.lora_up.weight"]
    with pytest.raises(LoRAError, match="'visual_transformer_blocks.0.cross_attention.to_key' has no up factor"):
        read_lora(sd, tiny_model())
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file" * 8)
    with pytest.raises(LoRAError, match="junk.pt: not a LoRA file"):
        read_lora(junk, tiny_model())
