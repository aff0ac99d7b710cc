"""The task table against the official configs (numbers from shared/research/k5-facts.md)."""
import pytest

from k5core.tasks import TASKS, get_task, latent_frames

OFFICIAL = {  # name: (model_dim, visual blocks, steps, guidance, shift, attention P or None, scale_factor)
    "k5-lite-t2v-5s-sd": (1792, 32, 50, 5.0, 10.0, None, (1, 2, 2)),
    "k5-lite-t2v-5s-sd-pretrain": (1792, 32, 50, 5.0, 10.0, None, (1, 2, 2)),
    "k5-lite-t2v-5s-sd-nocfg": (1792, 32, 50, 1.0, 10.0, None, (1, 2, 2)),
    "k5-lite-t2v-5s-sd-distil": (1792, 32, 16, 1.0, 5.0, None, (1, 2, 2)),
    "k5-lite-t2v-10s-sd": (1792, 32, 50, 5.0, 10.0, 0.9, (1, 2, 2)),
    "k5-lite-t2v-10s-sd-distil": (1792, 32, 16, 1.0, 10.0, 0.9, (1, 2, 2)),
    "k5-lite-i2v-5s-sd": (1792, 32, 50, 5.0, 10.0, None, (1, 2, 2)),
    "k5-lite-t2i-hd": (2560, 50, 50, 3.5, 3.0, None, (1, 1, 1)),
    "k5-lite-i2i-hd": (2560, 50, 50, 3.5, 3.0, None, (1, 1, 1)),
    "k5-pro-t2v-5s-sd": (4096, 60, 50, 5.0, 10.0, None, (1, 2, 2)),
    "k5-pro-t2v-10s-sd": (4096, 60, 50, 5.0, 10.0, 0.9, (1, 2, 2)),
    "k5-pro-t2v-5s-hd": (4096, 60, 50, 5.0, 10.0, 0.8, (1, 3.16, 3.16)),
    "k5-pro-t2v-10s-hd": (4096, 60, 50, 5.0, 10.0, 0.7, (1, 3.16, 3.16)),
    "k5-pro-i2v-5s-sd": (4096, 60, 50, 5.0, 10.0, None, (1, 2, 2)),
    "k5-pro-i2v-5s-hd": (4096, 60, 50, 5.0, 5.0, 0.8, (1, 3.16, 3.16)),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_numbers(name):
    dim, blocks, steps, guidance, shift, P, sf = OFFICIAL[name]
    t = get_task(name)
    assert (t.dit.model_dim, t.dit.num_visual_blocks, t.steps, t.guidance, t.shift) == (dim, blocks, steps, guidance, shift)
    assert (t.attention.type == "nabla") == (P is not None)
    if P is not None:
        assert (t.attention.P, t.attention.wT, t.attention.wH, t.attention.wW, t.attention.add_sta) == (P, 11, 3, 3, True)
    assert t.scale_factor == tuple(float(x) for x in sf)


def test_model_families():
    lite, pro, img = TASKS["k5-lite-t2v-5s-sd"].dit, TASKS["k5-pro-t2v-5s-sd"].dit, TASKS["k5-lite-t2i-hd"].dit
    assert (lite.ff_dim, lite.num_text_blocks, lite.axes_dims, lite.time_dim, lite.head_dim) == (7168, 2, (16, 24, 24), 512, 64)
    assert (pro.ff_dim, pro.num_text_blocks, pro.axes_dims, pro.time_dim, pro.head_dim) == (16384, 4, (32, 48, 48), 1024, 128)
    assert (img.ff_dim, img.num_text_blocks, img.axes_dims) == (10240, 2, (32, 48, 48))
    assert lite.visual_embed_dim == 33 and img.visual_embed_dim == 16
    assert TASKS["k5-lite-i2i-hd"].dit.visual_embed_dim == 33  # instruct_type: channel
    assert all(t.dit.in_text_dim == 3584 and t.dit.in_text_dim2 == 768 for n, t in TASKS.items() if "tiny" not in n)


def test_frames_buckets_and_content():
    assert TASKS["k5-lite-t2v-5s-sd"].frames == 121 and latent_frames(121) == 31
    assert TASKS["k5-pro-t2v-10s-hd"].frames == 241 and latent_frames(241) == 61
    assert TASKS["k5-lite-t2i-hd"].frames == 1 and TASKS["k5-lite-t2i-hd"].vae == "flux"
    assert (1024, 1024) in TASKS["k5-pro-t2v-5s-hd"].buckets and (512, 768) in TASKS["k5-lite-t2v-5s-sd"].buckets
    assert {t.content for t in TASKS.values()} == {"video", "image2video", "image", "image_edit"}
    assert TASKS["k5-lite-t2i-hd"].text_max_length == 512 and TASKS["k5-lite-t2v-5s-sd"].text_max_length == 256


def test_unknown_task_lists_names():
    with pytest.raises(KeyError, match="unknown task 'k5-lite-t2v'.*k5-lite-t2v-5s-sd"):
        get_task("k5-lite-t2v")
