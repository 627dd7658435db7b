"""Every choice a config can name, and the frame arithmetic of a Wan video, in one place.

The config check (``runtime.config_check``) validates a config against these once, where it
is loaded; the code that acts on a choice imports the same names and trusts the value. This
module imports nothing (no JAX, no project module): any layer may use it.
"""

from __future__ import annotations

import os

# ------------------------------------------------------------------ enumerations

SOLVERS = ("euler", "unipc", "dpmpp_2m")  # sample.solver: the ODE solvers of diffusion.solvers
CACHES = ("none", "magcache")  # sample.cache: diffusion.step_cache
OFFLOADS = ("none", "experts", "blocks")  # sample.offload: where the DiT weights wait while sampling
CFG_MODES = ("batch", "sequential")  # sample.cfg: the two guidance passes as one batch or in turn
QUANTIZE = ("none", "int8", "fp8")  # model.quantize: weight-only quantization of the block linears
FRAMINGS = ("official", "source")  # sample.framing: where the camera condition puts the face
EXPERTS = ("", "high", "low")  # model.expert: the Wan2.2 A14B expert a run trains ("" : every timestep)
ASPECTS = ("config", "source")  # sample --aspect: the output's aspect ratio
# sample.extend: how a video longer than the model's window is sampled: its windows denoised
# jointly (diffusion.windows) or clip by clip, each clip continuing from the last frames of the
# one before as clean context (CameraCtrl II's clip-level extension, sampling.extend).
EXTENDS = ("joint", "clip")
DEFAULT_CAMERA_KIND = "landmarks"

_CONDITIONING = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conditioning")


def camera_kinds() -> tuple[str, ...]:
    """``camera.kind``'s choices: the modules of ``facecam_jax/conditioning/`` (a kind is the module
    of its name; files starting with ``_`` and ``base.py`` are the seam itself). Read from the
    folder, not imported, so that adding a kind is adding its module."""
    names = (f[:-3] for f in os.listdir(_CONDITIONING) if f.endswith(".py"))
    return tuple(sorted(n for n in names if not n.startswith("_") and n != "base"))


# ------------------------------------------------------------------ frames and sizes

TEMPORAL_STRIDE = 4  # the Wan VAE: 1 + 4k frames -> 1 + k latent frames
# The longest video a config may ask for: 1601 frames are 401 latent frames, twenty times
# Wan's 81. Anything longer is a typo that would only pad frames and grow memory.
MAX_FRAMES = 1601
MAX_SIZE = 4096  # pixels per side (a 4K frame)
SIZE_MULTIPLE = 16  # the Wan VAE's 8x spatial stride times the DiT's 2x2 patch


def is_video_length(frames) -> bool:
    """``frames`` is ``1 + 4k`` (what the Wan VAE encodes), 1..``MAX_FRAMES``."""
    return (isinstance(frames, int) and not isinstance(frames, bool) and 1 <= frames <= MAX_FRAMES
            and (frames - 1) % TEMPORAL_STRIDE == 0)


def latent_frames(frames: int) -> int:
    """Latent frames of a ``1 + 4k``-frame video."""
    return 1 + (frames - 1) // TEMPORAL_STRIDE


def video_frames(latents: int) -> int:
    """Video frames of ``latents`` latent frames (``latent_frames``' inverse)."""
    return 1 + TEMPORAL_STRIDE * (latents - 1)


def nearest_video_lengths(frames: int, maximum: int = MAX_FRAMES) -> tuple[int, ...]:
    """The valid lengths (``1 + 4k``, 1..``maximum``) nearest to ``frames``: one or two values."""
    below = min(maximum, max(1, video_frames(latent_frames(max(1, frames)))))
    below = video_frames(latent_frames(below))
    above = below + TEMPORAL_STRIDE
    return (below,) if above > maximum or below == frames else (below, above)


def frames_problem(frames, maximum: int = MAX_FRAMES) -> str | None:
    """Why ``frames`` is no valid video length (None when it is), with the nearest valid ones."""
    if isinstance(frames, int) and not isinstance(frames, bool) and 1 <= frames <= maximum and (
            frames - 1) % TEMPORAL_STRIDE == 0:
        return None
    if not isinstance(frames, int) or isinstance(frames, bool):
        return f"must be an integer number of frames, 1 + 4k, 1..{maximum}"
    near = " or ".join(map(str, nearest_video_lengths(frames, maximum)))
    return (f"must be 1 + 4k frames (the Wan VAE's temporal stride), 1..{maximum}; the nearest valid "
            f"{'value is' if ' or ' not in near else 'values are'} {near}")


def size_problem(pixels) -> str | None:
    """Why ``pixels`` is no valid frame height or width (None when it is)."""
    if isinstance(pixels, int) and not isinstance(pixels, bool) and 0 < pixels <= MAX_SIZE and (
            pixels % SIZE_MULTIPLE == 0):
        return None
    return f"must be a positive multiple of {SIZE_MULTIPLE}, at most {MAX_SIZE}"


def nearest_sizes(pixels: int, maximum: int = MAX_SIZE) -> tuple[int, ...]:
    """The valid sizes (positive multiples of ``SIZE_MULTIPLE``, at most ``maximum``) nearest to
    ``pixels``: one or two values."""
    below = min(maximum, max(SIZE_MULTIPLE, pixels // SIZE_MULTIPLE * SIZE_MULTIPLE))
    above = below + SIZE_MULTIPLE
    return (below,) if above > maximum or pixels <= below else (below, above)


# ------------------------------------------------------------------ command-line flags
# A flag that sets a frame count or a size passes the rule its config key passes
# (``runtime.config_check`` uses ``frames_problem`` / ``size_problem``); the message names the
# flag and the nearest values that pass.


def size_flag_problem(flag: str, pixels) -> str | None:
    """Why ``pixels``, given as ``flag`` (``--height``), is no valid size (None when it is)."""
    if size_problem(pixels) is None:
        return None
    if not isinstance(pixels, int) or isinstance(pixels, bool):
        return f"{flag} {pixels!r} {size_problem(pixels)}"
    if pixels > MAX_SIZE:
        return (f"{flag} {pixels} is more than {MAX_SIZE} pixels, the largest size (a 4K frame); use "
                f"{MAX_SIZE} or less")
    near = " or ".join(map(str, nearest_sizes(pixels)))
    return f"{flag} {pixels} is not a positive multiple of {SIZE_MULTIPLE}; use {near}"


def frames_flag_problem(flag: str, frames, *, window: int = 1, maximum: int = MAX_FRAMES,
                        limit: str | None = None) -> str | None:
    """Why ``frames``, given as ``flag`` (``--frames``), is no valid output length (None when it
    is): ``frames_problem`` within ``maximum`` (the config key ``limit`` sets it, e.g.
    ``sample.max_frames``; None: ``MAX_FRAMES``), and no shorter than the model's ``window``
    (``data.frames``: the frames it denoises at once)."""
    problem = frames_problem(frames, maximum)
    if problem is not None and (not isinstance(frames, int) or isinstance(frames, bool)):
        return f"{flag} {frames!r} {problem}"
    if window > 1 and frames < window:
        return (f"{flag} {frames} is shorter than the model's window of {window} frames (data.frames, the "
                f"frames it denoises at once); pass {window} or more (1 + 4k), or use a config with a shorter window")
    if problem is None:
        return None
    if frames < 1:
        return f"{flag} {frames} is no number of frames (1 + 4k, at least 1); pass 1 or more"
    if frames > maximum:
        nearest = nearest_video_lengths(frames, maximum)[0]
        if limit is None:
            return f"{flag} {frames} is more than {maximum} frames, the longest video; the nearest valid value is {nearest}"
        raise_it = f" (or raise {limit}, at most {MAX_FRAMES})" if maximum < MAX_FRAMES else ""
        return f"{flag} {frames} is more than {limit}={maximum}; the nearest valid value is {nearest}{raise_it}"
    return (f"{flag} {frames} is not 4k + 1 (the Wan VAE's temporal stride); pass "
            f"{' or '.join(map(str, nearest_video_lengths(frames, maximum)))}")
