"""k5core.media: mp4 and png written atomically and read back; clear errors for broken files."""
import av
import numpy as np
import pytest
import torch
from PIL import Image

from k5core import media
from k5core.media import MediaError, probe_video, read_image, read_video_frames, write_image, write_video
from k5core.tiny.dataset import shape_frame


def clip(n=9, size=(48, 32)):
    """(n, H, W, 3) uint8 frames of a square moving right."""
    return np.stack([shape_frame(size, k / (n - 1), (230, 40, 40)) for k in range(n)])


def test_write_video_reads_back_frames_size_fps_and_metadata(tmp_path):
    frames = clip()
    path = write_video(frames, tmp_path / "a.mp4", fps=24, metadata={"prompt": "a red square", "seed": 7})
    info = probe_video(path)
    assert (info.frames, info.width, info.height, info.fps) == (9, 48, 32, 24.0)
    back = read_video_frames(path)
    assert back.dtype == torch.uint8 and back.shape == (9, 32, 48, 3)
    assert (back.float() - torch.from_numpy(frames).float()).abs().mean() < 6   # lossy but close
    with av.open(str(path)) as c:
        assert c.metadata["prompt"] == "a red square" and c.metadata["seed"] == "7"
        assert c.streams.video[0].codec_context.name in ("h264", "mpeg4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4"]               # no temp file left


def test_codec_is_h264_when_this_pyav_has_libx264():
    assert media.video_codec() == ("libx264" if "libx264" in av.codecs_available else "mpeg4")


def test_read_video_frames_follows_the_indices_given(tmp_path):
    path = write_video(clip(), tmp_path / "a.mp4")
    full = read_video_frames(path)
    picked = read_video_frames(path, [6, 0, 6])
    assert picked.shape[0] == 3
    assert torch.equal(picked[0], full[6]) and torch.equal(picked[1], full[0]) and torch.equal(picked[2], full[6])


def test_float_frames_and_odd_sizes_are_accepted(tmp_path):
    frames = torch.from_numpy(clip(5, size=(33, 17))).float() / 255              # odd W and H
    path = write_video(frames, tmp_path / "odd.mp4", fps=23.976)
    info = probe_video(path)
    assert (info.width, info.height, info.frames) == (34, 18, 5)                 # padded to even
    assert abs(info.fps - 23.976) < 1e-3


def test_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(ValueError, match=r"bad\.mp4.*\(F, H, W, 3\)"):
        write_video(np.zeros((4, 16, 16), np.uint8), tmp_path / "bad.mp4")
    assert list(tmp_path.iterdir()) == []


def test_probe_counts_packets_when_the_container_has_no_frame_count(tmp_path):
    path = tmp_path / "a.mkv"
    with av.open(str(path), "w", format="matroska") as out:
        s = out.add_stream("mpeg4", rate=24)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        for f in clip(7, (32, 32)):
            out.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(s.encode())
    info = probe_video(path)
    assert (info.frames, info.width, info.height) == (7, 32, 32)
    assert read_video_frames(path).shape == (7, 32, 32, 3)


def test_broken_videos_raise_errors_naming_the_file(tmp_path):
    empty, junk = tmp_path / "empty.mp4", tmp_path / "junk.mp4"
    empty.write_bytes(b"")
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(MediaError, match=r"empty\.mp4: empty file \(0 bytes\)"):
        probe_video(empty)
    with pytest.raises(MediaError, match=r"junk\.mp4: cannot open video"):
        read_video_frames(junk)
    with pytest.raises(MediaError, match=r"missing\.mp4: file not found"):
        probe_video(tmp_path / "missing.mp4")
    short = write_video(clip(5), tmp_path / "short.mp4")
    with pytest.raises(MediaError, match=r"short\.mp4: frame 8 requested but the video has only 5"):
        read_video_frames(short, [0, 8])


def test_truncated_video_is_an_error_not_a_crash(tmp_path):
    path = write_video(clip(9), tmp_path / "cut.mp4")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])                                     # moov atom is at the end
    with pytest.raises(MediaError, match=r"cut\.mp4"):
        read_video_frames(path)


def test_png_round_trip_is_exact_with_text_chunks(tmp_path):
    img = clip(2)[1]
    path = write_image(img, tmp_path / "a.png", metadata={"prompt": "hi", "steps": 4})
    assert torch.equal(read_image(path), torch.from_numpy(img))
    with Image.open(path) as im:
        assert im.text == {"prompt": "hi", "steps": "4"}
    write_image(torch.ones(8, 8, 3) * 0.5, tmp_path / "f.png")                  # float in [0, 1]
    assert read_image(tmp_path / "f.png").unique().tolist() == [128]


def test_read_image_expands_grey_and_drops_alpha(tmp_path):
    Image.new("L", (5, 4), 77).save(tmp_path / "g.png")
    Image.new("RGBA", (5, 4), (10, 20, 30, 0)).save(tmp_path / "a.png")
    assert read_image(tmp_path / "g.png").shape == (4, 5, 3)
    assert read_image(tmp_path / "a.png")[0, 0].tolist() == [10, 20, 30]
    assert media.image_size(tmp_path / "g.png") == (5, 4)


def test_broken_image_raises_error_naming_the_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(MediaError, match=r"bad\.png: cannot read image"):
        read_image(tmp_path / "bad.png")
    (tmp_path / "zero.jpg").write_bytes(b"")
    with pytest.raises(MediaError, match=r"zero\.jpg: empty file"):
        media.image_size(tmp_path / "zero.jpg")
