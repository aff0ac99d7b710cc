"""The DiT against diffusers' Kandinsky5Transformer3DModel, key layouts, NABLA and bad files."""
import pytest
import torch

from k5core.attention import nabla_attention, nabla_block_mask, attention, resolve_backend, sta_mask
from k5core.loading import CheckpointError, build_dit, load_dit
from k5core.tasks import get_task
from k5core.tiny.dit import diffusers_config, tiny_state_dict, write_tiny_dit

diffusers = pytest.importorskip("diffusers")


class _Fp32Bfloat16:
    """diffusers' rotary step casts q/k to bfloat16 whatever the dtype (the official code runs in
    bf16). For an fp32 comparison the oracle's module sees `torch.bfloat16` as float32."""

    def __getattr__(self, name):
        return getattr(torch, name)

    bfloat16 = torch.float32


@pytest.fixture
def oracle(monkeypatch):
    import diffusers.models.transformers.transformer_kandinsky as dk
    monkeypatch.setattr(dk, "torch", _Fp32Bfloat16())

    def make(task, sd):
        cfg = {k: v for k, v in diffusers_config(task).items() if not k.startswith("_")}
        ref = diffusers.Kandinsky5Transformer3DModel(**cfg)
        ref.load_state_dict(sd, strict=True)
        return ref.eval()
    return make


def ours(task, sd):
    model = build_dit(get_task(task))
    model.load_state_dict(sd, strict=True)
    return model.eval()


def run_oracle(ref, x, t, text, pooled, scale_factor):
    _, _, T, H, W = x.shape
    pos = (torch.arange(T), torch.arange(H // 2), torch.arange(W // 2))
    out = ref(x.permute(0, 2, 3, 4, 1), text, t, pooled, pos, torch.arange(text.shape[1]),
              scale_factor=scale_factor, return_dict=False)
    return out.permute(0, 4, 1, 2, 3)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def inputs(batch=2, T=3, H=8, W=8, L=7, channels=33, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, T, H, W, generator=g)
    return x, torch.tensor([500.0, 930.0][:batch]), torch.randn(batch, L, 32, generator=g), \
        torch.randn(batch, 16, generator=g)


@pytest.mark.parametrize("mode", ["t2v", "i2v"])
def test_matches_diffusers(oracle, mode):
    task = f"k5-tiny-{mode}"
    sd = tiny_state_dict(task, seed=3)
    x, t, text, pooled = inputs()
    if mode == "t2v":
        x[:, 16:] = 0  # zero condition and mask, as the official T2V pipeline passes
    else:
        x[:, 32] = 0
        x[:, 32, 0] = 1  # first latent frame conditioned
    sf = get_task(task).scale_factor
    with torch.no_grad():
        got = ours(task, sd)(x, t, text, pooled, scale_factor=sf)
        want = run_oracle(oracle(task, sd), x, t, text, pooled, sf)
    assert got.shape == (2, 16, 3, 8, 8)
    assert rel_err(got, want) < 1e-4


def test_padded_text_with_mask_matches_unpadded(oracle):
    """Batched prompts of different lengths, padded and masked, equal each prompt run alone."""
    sd = tiny_state_dict(seed=4)
    x, t, text, pooled = inputs(L=9)
    lengths = [9, 5]
    mask = torch.arange(9)[None] < torch.tensor(lengths)[:, None]
    text = text * mask[..., None]  # padding is zero, as the text encoder returns it
    model, ref = ours("k5-tiny-t2v", sd), oracle("k5-tiny-t2v", sd)
    with torch.no_grad():
        got = model(x, t, text, pooled, text_mask=mask, scale_factor=(1, 2, 2))
        for i, n in enumerate(lengths):
            want = run_oracle(ref, x[i:i + 1], t[i:i + 1], text[i:i + 1, :n], pooled[i:i + 1], (1, 2, 2))
            assert rel_err(got[i:i + 1], want) < 1e-4
        garbage = text.clone()
        garbage[1, 5:] = 100.0  # whatever sits in masked positions must not matter
        again = model(x, t, garbage, pooled, text_mask=mask, scale_factor=(1, 2, 2))
    assert torch.equal(again, got)


@pytest.mark.parametrize("layout", ["comfy", "diffusers", "pt"])
def test_every_key_layout_loads_the_same_model(tmp_path, layout):
    x, t, text, pooled = inputs()
    base = load_dit(write_tiny_dit(tmp_path, seed=5))
    other = load_dit(write_tiny_dit(tmp_path, seed=5, layout=layout))
    assert other.task.name == "k5-tiny-t2v"
    with torch.no_grad():
        assert torch.equal(base(x, t, text, pooled), other(x, t, text, pooled))


def test_load_keeps_file_dtype_and_converts(tmp_path):
    path = write_tiny_dit(tmp_path, dtype=torch.bfloat16)
    assert load_dit(path).text_embeddings.in_layer.weight.dtype == torch.bfloat16
    assert load_dit(path, dtype=torch.float32).text_embeddings.in_layer.weight.dtype == torch.float32


def test_task_inferred_from_shapes_and_name(tmp_path):
    assert load_dit(write_tiny_dit(tmp_path, task="k5-tiny-t2i")).task.name == "k5-tiny-t2i"
    assert load_dit(write_tiny_dit(tmp_path, task="k5-tiny-i2i")).task.name == "k5-tiny-i2i"
    i2v = write_tiny_dit(tmp_path, task="k5-tiny-i2v")
    assert load_dit(i2v).task.name == "k5-tiny-i2v"  # same shapes as t2v, told apart by the name


# ----------------------------------------------------------------------------- bad files
def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "notes.safetensors"
    bad.write_bytes(b"this is not a model at all, just some text that is long enough")
    with pytest.raises(ValueError, match="notes.safetensors: not a safetensors file"):
        load_dit(bad)
    pt = tmp_path / "junk.pt"
    pt.write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="junk.pt: not a loadable checkpoint"):
        load_dit(pt)


def test_truncated(tmp_path):
    path = write_tiny_dit(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match="truncated safetensors file"):
        load_dit(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_dit(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("keys,what", [
    (["encoder.down.0.block.0.conv1.conv.weight", "decoder.up.0.block.0.conv1.conv.weight"], "a VAE"),
    (["model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"], "a text encoder"),
    (["foo.bar"], "unknown key layout"),
])
def test_other_model_files(tmp_path, keys, what):
    from k5core.files import save_safetensors
    path = save_safetensors({k: torch.zeros(2) for k in keys}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match=f"other.safetensors: .*{what}"):
        load_dit(path)


def test_shapes_of_another_task(tmp_path):
    path = write_tiny_dit(tmp_path)
    with pytest.raises(CheckpointError, match="do not fit task k5-lite-t2v-5s-sd.*looks like k5-tiny-t2v"):
        load_dit(path, task="k5-lite-t2v-5s-sd")
    t2i = write_tiny_dit(tmp_path, task="k5-tiny-t2i")
    with pytest.raises(CheckpointError, match="16 input channels; task expects .* 33"):
        load_dit(t2i, task="k5-tiny-t2v")


def test_missing_tensor(tmp_path):
    from k5core.files import save_safetensors
    sd = tiny_state_dict()
    del sd["visual_transformer_blocks.1.feed_forward.out_layer.weight"]
    path = save_safetensors(sd, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match="partial.safetensors: keys do not match.*1 missing"):
        load_dit(path)


# ----------------------------------------------------------------------------- attention
def test_nabla_with_everything_kept_equals_dense():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 256, 4, 16, generator=g) for _ in range(3))
    dense = attention(q, k, v)
    full_sta = torch.ones(4, 4, dtype=torch.bool)
    assert torch.allclose(nabla_attention(q, k, v, full_sta, P=0.5), dense, atol=1e-5)
    assert torch.allclose(nabla_attention(q, k, v, None, P=1.0), dense, atol=1e-5)
    sparse = nabla_attention(q, k, v, torch.eye(4, dtype=torch.bool), P=0.6)
    assert not torch.allclose(sparse, dense, atol=1e-3)
    keep = nabla_block_mask(q.transpose(1, 2), k.transpose(1, 2), torch.eye(4, dtype=torch.bool), P=0.6)
    assert 0 < keep.float().mean() < 1
    tokens = keep.repeat_interleave(64, -1).repeat_interleave(64, -2)  # (B, heads, S, S)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=tokens).transpose(1, 2)
    assert torch.allclose(sparse, want, atol=1e-5)


def test_sta_mask_windows():
    m = sta_mask(3, 2, 2, wT=3, wH=1, wW=1)  # neighbours in time only, same tile in space
    assert m.shape == (12, 12)
    assert m[0, 4] and not m[0, 8] and not m[0, 1]


def test_nabla_dit_runs_and_dense_model_matches_when_all_kept():
    from dataclasses import replace
    from k5core.tasks import Attention
    task = get_task("k5-tiny-t2v")
    model = build_dit(task)
    model.load_state_dict(tiny_state_dict(seed=6))
    x, t, text, pooled = inputs(H=32, W=32, T=2)
    with torch.no_grad():
        dense = model(x, t, text, pooled)
        everything = model(x, t, text, pooled, sparse=Attention("nabla", P=1.0))
        sparse = model(x, t, text, pooled, sparse=replace(Attention("nabla"), P=0.3, wT=1, wH=1, wW=1))
    assert torch.allclose(everything, dense, atol=1e-4)
    assert sparse.shape == dense.shape and not torch.allclose(sparse, dense, atol=1e-4)
    with pytest.raises(ValueError, match="divisible by 8"):
        model(*inputs(H=8, W=8), sparse=Attention("nabla"))


def test_backend_errors():
    assert resolve_backend("torch") == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("magic")
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="'flash2' was asked for but the package 'flash_attn'"):
            resolve_backend("flash_attn")


def test_inspect_dit_reads_headers_only(tmp_path, monkeypatch):
    from k5core import loading
    path = write_tiny_dit(tmp_path, task="k5-tiny-i2v")
    monkeypatch.setattr(loading, "iter_tensors", lambda files: pytest.fail("weights were read"))
    assert loading.inspect_dit(path).name == "k5-tiny-i2v"
    assert loading.inspect_dit(path, "k5-tiny-t2v").name == "k5-tiny-t2v"
    with pytest.raises(CheckpointError, match="do not fit task k5-pro-t2v-5s-sd"):
        loading.inspect_dit(path, "k5-pro-t2v-5s-sd")


def test_bf16_model_runs_time_embedding_and_modulation_in_fp32():
    """As the official code (fp32 autocast): bf16 weights, fp32 math for the modulation parameters."""
    model = build_dit(get_task("k5-tiny-t2v"))
    model.load_state_dict(tiny_state_dict(seed=2))
    ref = model.time_embeddings(torch.tensor([321.0]))
    model = model.to(torch.bfloat16)
    assert model.visual_transformer_blocks[0].visual_modulation.out_layer.weight.dtype == torch.bfloat16
    emb = model.time_embeddings(torch.tensor([321.0]))
    assert emb.dtype == torch.float32
    assert model.visual_transformer_blocks[0].visual_modulation(emb).dtype == torch.float32
    assert rel_err(emb, ref) < 2e-2  # only the weights were rounded to bf16
    x, t, text, pooled = inputs()
    with torch.no_grad():
        out = model(x.bfloat16(), t, text.bfloat16(), pooled.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_diffusers_folder_task_from_its_repository_name(tmp_path):
    folder = write_tiny_dit(tmp_path / "Kandinsky-5.0-I2V-Tiny-5s-Diffusers", task="k5-tiny-i2v", layout="diffusers")
    target = folder.parent / "transformer"
    folder.rename(target)
    assert load_dit(target).task.name == "k5-tiny-i2v"


def test_compiled_blocks_give_the_same_output_and_follow_lora_hooks():
    """The compile mechanism on CPU with dynamo's eager backend (inductor is the default on GPUs)."""
    from k5core.lora import LoRANetwork
    model = build_dit(get_task("k5-tiny-t2v"))
    model.load_state_dict(tiny_state_dict(seed=8))
    x, t, text, pooled = inputs()
    with torch.no_grad():
        ref = model(x, t, text, pooled)
        model.compile_blocks(backend="eager")
        assert torch.allclose(model(x, t, text, pooled), ref, atol=1e-6)
        net = LoRANetwork(model, rank=4, alpha=4)
        net.apply_to()
        for a in net.adapters().values():
            a.lora_up.weight.normal_()
        assert not torch.allclose(model(x, t, text, pooled), ref, atol=1e-3)  # no stale graph
        net.remove()
        assert torch.allclose(model(x, t, text, pooled), ref, atol=1e-6)
        from k5core.offload import enable_block_swap
        with pytest.warns(UserWarning, match="does nothing"):
            enable_block_swap(model, 1, "cpu")   # the swap runner around compiled blocks
        assert torch.allclose(model(x, t, text, pooled), ref, atol=1e-6)
        enable_block_swap(model, 0, "cpu")
        model.compile_blocks(False)
        assert all(b._compiled_call_impl is None for b in model.visual_transformer_blocks)
        assert torch.equal(model(x, t, text, pooled), ref)
