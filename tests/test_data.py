"""k5core.data: the musubi dataset TOML, frame windows, buckets, items and pixels."""
import json

import numpy as np
import pytest
import torch

from k5core import data
from k5core.data import (DatasetConfigError, collect_items, dataset_config_from_dict, frame_windows,
                         load_dataset_config, load_item_pixels, select_bucket)
from k5core.media import write_image, write_video
from k5core.tiny.dataset import make_tiny_dataset, shape_frame


def write_toml(tmp_path, text, dirs=("videos", "images")):
    for d in dirs:
        (tmp_path / d).mkdir(exist_ok=True)
    path = tmp_path / "dataset.toml"
    path.write_text(text)
    return path


def problems(path):
    with pytest.raises(DatasetConfigError) as e:
        load_dataset_config(path)
    return e.value.problems


# --- TOML ---------------------------------------------------------------------------------------

def test_tiny_dataset_config_loads_with_musubi_defaults_and_paths_beside_the_toml(tmp_path):
    config = load_dataset_config(make_tiny_dataset(tmp_path, frames=9))
    video, image = config.datasets
    assert (video.kind, video.source, video.cache_directory) == ("video", tmp_path / "videos", tmp_path / "cache/videos")
    assert (image.kind, image.source) == ("image", tmp_path / "images")
    assert video.resolution == (64, 64) and video.target_frames == (9,) and video.frame_extraction == "head"
    assert (video.batch_size, video.num_repeats, video.enable_bucket, video.max_frames) == (1, 1, False, 129)
    assert config.warnings == []


def test_dataset_values_override_general_and_cache_defaults_to_the_media_folder(tmp_path):
    path = write_toml(tmp_path, """
[general]
resolution = 512
batch_size = 2
enable_bucket = true
[[datasets]]
video_directory = "videos"
batch_size = 4
target_frames = [1, 25, 45]
frame_extraction = "slide"
frame_stride = 10
source_fps = 30
""")
    spec = load_dataset_config(path).datasets[0]
    assert spec.resolution == (512, 512) and spec.batch_size == 4 and spec.enable_bucket
    assert spec.cache_directory == tmp_path / "videos" and spec.source_fps == 30.0
    assert (spec.frame_extraction, spec.frame_stride, spec.target_frames) == ("slide", 10, (1, 25, 45))


def test_unknown_key_names_file_line_and_the_closest_key(tmp_path):
    path = write_toml(tmp_path, """[general]
resolution = [64, 64]

[[datasets]]
video_directory = "videos"
target_frames = [9]
frame_extration = "head"
""")
    assert problems(path) == [f"{path} line 7: [[datasets]] #1 key 'frame_extration' is unknown; "
                              f"did you mean 'frame_extraction'?"]


def test_wrong_types_are_all_reported_with_their_lines(tmp_path):
    path = write_toml(tmp_path, """[general]
enable_bucket = "yes"
[[datasets]]
image_directory = "images"
num_repeats = "2"
resolution = [64]
[[datasets]]
video_directory = "videos"
target_frames = 9
frame_extraction = "middle"
""")
    got = problems(path)
    assert len(got) == 5
    assert got[0] == f"{path} line 2: [general] key 'enable_bucket' must be true or false, got string 'yes'"
    assert got[1] == f"{path} line 5: [[datasets]] #1 key 'num_repeats' must be an integer, got string '2'"
    assert got[2].startswith(f"{path} line 6: [[datasets]] #1 key 'resolution' must be [width, height]")
    assert got[3].startswith(f"{path} line 9: [[datasets]] #2 key 'target_frames' must be a non-empty list")
    assert got[4] == (f"{path} line 10: [[datasets]] #2 key 'frame_extraction' must be one of head, chunk, slide, "
                      f"uniform, full, got string 'middle'")


@pytest.mark.parametrize("body, expected", [
    ('[[datasets]]\nimage_directory = "images"\ntarget_frames = [9]\n',
     "line 3: [[datasets]] #1 key 'target_frames' is for video datasets, but this is an image dataset"),
    ('[general]\ntarget_frames = [9]\n[[datasets]]\nvideo_directory = "videos"\n',
     "line 2: [general] key 'target_frames' must be set in each [[datasets]] table, not in [general]"),
    ('[[datasets]]\nresolution = 64\n',
     "line 1: [[datasets]] #1 needs exactly one of image_directory, image_jsonl_file, video_directory, "
     "video_jsonl_file; it has none"),
    ('[[datasets]]\nvideo_directory = "nowhere"\n',
     "line 2: [[datasets]] #1 video_directory 'nowhere' does not exist"),
    ('[[datasets]]\nvideo_jsonl_file = "list.jsonl"\n',
     "line 1: [[datasets]] #1 needs cache_directory (required with video_jsonl_file)"),
    ('[[datasets]]\nvideo_directory = "videos"\n[[datasets]]\nimage_directory = "videos"\n',
     "line 3: [[datasets]] #2 cache directory"),
    ('[genral]\nresolution = 64\n[[datasets]]\nvideo_directory = "videos"\n',
     "line 1: top level 'genral' is unknown (expected [general] and [[datasets]]); did you mean 'general'?"),
    ('[general]\narchitecture = "wan"\n[[datasets]]\nvideo_directory = "videos"\n',
     "line 2: [general] key 'architecture' must be \"kandinsky5\""),
    ('[general]\nresolution = 64\n', "no [[datasets]] table"),
    ('[[datasets]\nvideo_directory = "videos"\n', "not valid TOML"),
])
def test_bad_configs_say_what_is_wrong(tmp_path, body, expected):
    (tmp_path / "list.jsonl").write_text("")
    got = problems(write_toml(tmp_path, body))
    assert len(got) == 1 and expected in got[0], got


def test_musubi_keys_of_other_architectures_load_with_warnings_and_frames_snap_to_4k_plus_1(tmp_path):
    path = write_toml(tmp_path, """[[datasets]]
video_directory = "videos"
control_directory = "videos"
fp_latent_window_size = 9
target_frames = [1, 24, 45, 46]
frame_extraction = "uniform"
frame_sample = 1
""")
    config = load_dataset_config(path)
    spec = config.datasets[0]
    assert spec.target_frames == (1, 21, 45) and spec.frame_extraction == "head"
    text = "\n".join(config.warnings)
    assert "line 3: [[datasets]] #1 key 'control_directory' is ignored" in text
    assert "key 'fp_latent_window_size' is ignored (a FramePack setting)" in text
    assert "target_frames [1, 24, 45, 46] rounded down to 4k+1: [1, 21, 45]" in text
    assert "using \"head\"" in text


def test_config_from_dict_resolves_against_base_dir_and_checks_the_same_way(tmp_path):
    (tmp_path / "imgs").mkdir()
    config = dataset_config_from_dict({"general": {"resolution": [96, 64]},
                                       "datasets": [{"image_directory": "imgs", "cache_directory": "c"}]},
                                      base_dir=tmp_path)
    assert config.datasets[0].source == tmp_path / "imgs" and config.datasets[0].cache_directory == tmp_path / "c"
    with pytest.raises(DatasetConfigError, match=r"^<node>: \[\[datasets\]\] #1 key 'num_repeat' is unknown; "
                                                 r"did you mean 'num_repeats'\?$"):
        dataset_config_from_dict({"datasets": [{"image_directory": str(tmp_path / "imgs"), "num_repeat": 2}]})


# --- frame windows --------------------------------------------------------------------------------

def starts(windows):
    """[(start, count)] of windows, checking each is contiguous."""
    for w in windows:
        assert w == list(range(w[0], w[0] + len(w)))
    return [(w[0], len(w)) for w in windows]


def test_frame_windows_match_musubis_40_frame_examples():
    assert starts(frame_windows(40, [1, 13, 25], "head")) == [(0, 1), (0, 13), (0, 25)]
    assert starts(frame_windows(40, [13, 25], "chunk")) == [(0, 13), (13, 13), (26, 13), (0, 25)]
    assert starts(frame_windows(40, [1, 13, 25], "slide", stride=10)) == [
        (0, 1), (10, 1), (20, 1), (30, 1), (0, 13), (10, 13), (20, 13), (0, 25), (10, 25)]
    assert starts(frame_windows(40, [1, 13, 25], "uniform", sample=4)) == [
        (0, 1), (13, 1), (26, 1), (39, 1), (0, 13), (9, 13), (18, 13), (27, 13), (0, 25), (5, 25), (10, 25), (15, 25)]
    assert [starts(frame_windows(n, [1], "full", max_frames=31)) for n in (20, 25, 35)] == [
        [(0, 17)], [(0, 25)], [(0, 29)]]


def test_uniform_starts_equal_numpy_linspace_as_musubi_uses():
    for n in range(9, 80, 7):
        for count in (1, 5, 9):
            for sample in (2, 3, 5, 7):
                want = list(dict.fromkeys(np.linspace(0, n - count, sample, dtype=int).tolist()))
                assert [w[0] for w in frame_windows(n, [count], "uniform", sample=sample)] == want


def test_windows_longer_than_the_video_are_dropped():
    assert frame_windows(8, [9, 17], "head") == []
    assert frame_windows(8, [9], "slide") == [] and frame_windows(8, [9], "chunk") == []
    assert frame_windows(0, [1], "full") == []
    assert starts(frame_windows(12, [5, 17], "chunk")) == [(0, 5), (5, 5)]
    with pytest.raises(ValueError, match="frame_extraction"):
        frame_windows(10, [1], "middle")


def test_source_fps_drops_frames_to_24_fps():
    assert data.resample_indices(10, 24.0) == list(range(10))
    assert data.resample_indices(10, 48.0) == [0, 2, 4, 6, 8]
    kept = data.resample_indices(30, 30.0)
    assert len(kept) == 24 and kept[:7] == [0, 2, 3, 4, 5, 7, 8]            # musubi's rounding


# --- buckets --------------------------------------------------------------------------------------

def test_buckets_without_bucketing_are_the_resolution_snapped_to_16():
    assert select_bucket(1920, 1080, (960, 544)) == (960, 544)
    assert select_bucket(10, 10, (100, 70)) == (96, 64)
    assert select_bucket(10, 10, 64) == (64, 64)


def test_bucket_of_nearest_aspect_ratio_and_about_the_same_area():
    assert select_bucket(1920, 1080, (960, 544), enable_bucket=True) == (960, 544)
    w, h = select_bucket(1080, 1920, (960, 544), enable_bucket=True)
    assert (w, h) == (544, 960)
    for res in ((512, 512), (960, 544), (1024, 1024)):
        sizes = data.bucket_sizes(res)
        assert all(w % 16 == 0 and h % 16 == 0 for w, h in sizes)
        assert all(w * h <= res[0] * res[1] for w, h in sizes)
        assert (res[0] // 16 * 16, res[1] // 16 * 16) in sizes or res[0] != res[1]
    assert select_bucket(1000, 1000, (512, 512), enable_bucket=True) == (512, 512)


def test_bucket_no_upscale_keeps_small_sources_small():
    assert select_bucket(300, 200, (512, 512), True, bucket_no_upscale=True) == (288, 192)
    assert select_bucket(2000, 2000, (512, 512), True, bucket_no_upscale=True) == (512, 512)


# --- items and pixels -----------------------------------------------------------------------------

def test_items_of_the_tiny_dataset(tmp_path):
    config = load_dataset_config(make_tiny_dataset(tmp_path, n_videos=2, n_images=2, frames=9, corrupt=True))
    videos = collect_items(config.datasets[0])
    ok = [i for i in videos if i.ok]
    assert [i.stem for i in ok] == ["clip0", "clip1"]
    assert all(i.frame_indices == list(range(9)) and i.window == (0, 9) and i.bucket == (64, 64) for i in ok)
    assert ok[0].caption == "a red square moving right on a dark background"
    failed = {i.stem: i.error for i in videos if not i.ok}
    assert failed["empty"].endswith("empty.mp4: empty file (0 bytes)")
    assert "broken.mp4: cannot open video" in failed["broken"]
    images = collect_items(config.datasets[1])
    assert [(i.kind, i.stem, i.frames, i.original_size) for i in images] == [
        ("image", "image0", 1, (64, 64)), ("image", "image1", 1, (64, 64))]


def test_missing_caption_short_video_and_name_clash_are_failed_items(tmp_path):
    (tmp_path / "v").mkdir()
    frames = np.stack([shape_frame((32, 32), k / 8, (255, 0, 0)) for k in range(9)])
    for name in ("a", "short", "nocap"):
        write_video(frames[:5] if name == "short" else frames, tmp_path / "v" / f"{name}.mp4")
    write_video(frames, tmp_path / "v" / "a.mkv.mp4")                            # stem 'a.mkv': no clash
    write_video(frames, tmp_path / "v" / "a.mov")                                # stem 'a': clash
    for name in ("a", "short", "a.mkv"):
        (tmp_path / "v" / f"{name}.txt").write_text(f"caption {name}\n")
    config = dataset_config_from_dict({"datasets": [{"video_directory": str(tmp_path / "v"),
                                                     "target_frames": [9, 13], "resolution": 32}]})
    items = collect_items(config.datasets[0])
    by_name = {i.path.name: i for i in items}
    assert by_name["a.mov"].ok and by_name["a.mov"].caption == "caption a"     # first in name order
    assert by_name["a.mkv.mp4"].ok
    assert by_name["nocap.mp4"].error == f"{tmp_path / 'v' / 'nocap.mp4'}: caption file nocap.txt is missing"
    assert by_name["short.mp4"].error.endswith("video has 5 frames, shorter than every target_frames [9, 13]")
    assert by_name["a.mp4"].error.endswith("a.mp4: its cache name 'a' is also used by a.mov; rename one")


def test_windows_map_through_source_fps_and_pixels_follow_them(tmp_path):
    (tmp_path / "v").mkdir()
    frames = np.stack([np.full((16, 16, 3), 10 * k, np.uint8) for k in range(18)])   # brightness = 10 * index
    write_video(frames, tmp_path / "v" / "ramp.mp4", fps=48)
    (tmp_path / "v" / "ramp.txt").write_text("ramp")
    config = dataset_config_from_dict({"datasets": [{
        "video_directory": str(tmp_path / "v"), "resolution": 16, "target_frames": [5],
        "frame_extraction": "slide", "frame_stride": 2, "source_fps": 48.0}]})
    items = collect_items(config.datasets[0])
    assert [i.window for i in items] == [(0, 5), (2, 5), (4, 5)]                   # 9 frames at 24 fps
    assert items[1].frame_indices == [4, 6, 8, 10, 12]
    pixels = load_item_pixels(items[1])                                            # (3, 5, 16, 16)
    level = (pixels.mean(dim=(0, 2, 3)) + 1) / 2 * 255
    assert torch.allclose(level, torch.tensor([40.0, 60, 80, 100, 120]), atol=4)


def test_pixels_are_scaled_to_cover_the_bucket_then_center_cropped(tmp_path):
    img = np.zeros((64, 128, 3), np.uint8)                                         # 128 wide, 64 high
    img[:, 64:] = 255                                                              # right half white
    write_image(img, tmp_path / "i" / "half.png")
    (tmp_path / "i" / "half.txt").write_text("half")
    config = dataset_config_from_dict({"datasets": [{"image_directory": str(tmp_path / "i"), "resolution": 32}]})
    item = collect_items(config.datasets[0])[0]
    x = load_item_pixels(item)
    assert x.shape == (3, 1, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert x[..., :14].max() < -0.95 and x[..., 18:].min() > 0.95                  # crop kept the middle


def test_jsonl_dataset_with_relative_paths_bad_lines_and_a_folder_of_frames(tmp_path):
    frames_dir = tmp_path / "media" / "shot1"
    for k in range(5):
        write_image(np.full((16, 24, 3), 40 * k, np.uint8), frames_dir / f"{k:03d}.png")
    write_video(np.zeros((9, 16, 24, 3), np.uint8), tmp_path / "media" / "b.mp4")
    lines = [{"video_path": "media/shot1", "caption": "frames in a folder"},
             {"video_path": "media/b.mp4", "caption": "black"}, "not json", {"video_path": "media/b.mp4"},
             {"video_path": "media/gone.mp4", "caption": "x"}]
    (tmp_path / "list.jsonl").write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines))
    path = write_toml(tmp_path, '[[datasets]]\nvideo_jsonl_file = "list.jsonl"\ncache_directory = "cache"\n'
                                'target_frames = [5]\nresolution = [32, 16]\n', dirs=())
    items = collect_items(load_dataset_config(path).datasets[0])
    assert [(i.stem, i.ok) for i in items[:2]] == [("shot1", True), ("b", True)]
    assert items[0].original_size == (24, 16) and items[0].frame_indices == list(range(5))
    errors = [i.error for i in items[2:]]
    assert "list.jsonl line 3: not JSON" in errors[0]
    assert errors[1].endswith("list.jsonl line 4: needs a \"caption\" string")
    assert "gone.mp4 does not exist" in errors[2]
    x = load_item_pixels(items[0])
    assert x.shape == (3, 5, 16, 32)
    assert torch.allclose((x.mean(dim=(0, 2, 3)) + 1) * 127.5, torch.tensor([0.0, 40, 80, 120, 160]), atol=1)
