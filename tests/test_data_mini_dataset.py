"""The carphone mini multi-view dataset: real footage rendered from known virtual cameras."""

import json
import os
import time

import numpy as np
import pytest

from facecam_jax import video_io
from facecam_jax.data import mini_dataset, sources
from facecam_jax.data import store as store_lib


@pytest.fixture(scope="module")
def built():
    start = time.perf_counter()
    dataset = mini_dataset.build()
    print(f"mini dataset ready in {time.perf_counter() - start:.1f} s (cached builds are instant)")
    return dataset


@pytest.fixture(scope="module")
def mesh(built):
    return dict(np.load(built.mesh_path))


def test_build_is_cached(built):
    start = time.perf_counter()
    again = mini_dataset.build()
    assert again == built
    assert time.perf_counter() - start < 1.0


def test_nersemble_layout(built, mesh):
    with open(built.camera_params_path) as f:
        params = json.load(f)
    serials = sorted(params["world_2_cam"])
    assert len(serials) >= 6 and serials == sorted(mesh["serials"].tolist())
    assert np.asarray(params["intrinsics"]).shape == (3, 3)
    for serial in serials:
        info = video_io.probe(built.video_path(serial))
        assert (info.num_frames, info.height, info.width) == (120, 192, 128)
        w2c = np.asarray(params["world_2_cam"][serial])
        np.testing.assert_allclose(w2c[:3, :3] @ w2c[:3, :3].T, np.eye(3), atol=1e-9)
    assert video_io.probe(os.path.join(built.wild_root, "carphone.mp4")).num_frames == 120
    found, skipped = sources.discover_nersemble(built.nersemble_root)
    assert len(found) == 1 and not skipped and len(found[0].cameras) == len(serials)


@pytest.mark.parametrize("t", [0, 70])
def test_rendered_views_follow_the_known_cameras(built, mesh, t):
    """Landmarks MediaPipe detects on each rendered view agree with projecting the fitted
    mesh through that view's camera, and views differ by the known camera motion."""
    from facecam_jax.camera import landmarks as landmarks_lib

    serials = mesh["serials"].tolist()
    height, width = int(mesh["height"]), int(mesh["width"])
    views = np.stack([video_io.read_frames(built.video_path(s), [t])[0] for s in serials])
    detected, found = landmarks_lib.detect(views, static=True)
    assert found.all()
    detected_px = detected[:, :468, :2] * [width, height] - 0.5  # [K, 468, 2]
    projected = np.stack([mini_dataset.project(mesh["vertices"][t, :468], mesh["world_2_cam"][k],
                                               mesh["intrinsics"])[0] for k in range(len(serials))])
    errors = np.median(np.linalg.norm(detected_px - projected, axis=-1), axis=-1)  # [K]
    # View-to-view motion of every landmark (camera k minus camera 0): the detected field
    # must match the one the known cameras predict, and not another camera's.
    detected_motion = detected_px[1:] - detected_px[:1]  # [K-1, 468, 2]
    predicted_motion = projected[1:] - projected[:1]

    def explained(predicted):  # fraction of the motion field's variance the prediction explains
        residual = ((detected_motion - predicted) ** 2).sum((1, 2))
        return 1.0 - residual / ((predicted - predicted.mean(1, keepdims=True)) ** 2).sum((1, 2))

    right = explained(predicted_motion)
    wrong = explained(np.roll(predicted_motion, 1, axis=0))
    print(f"frame {t}: median detection-vs-projection error per camera {np.round(errors, 2)} px; "
          f"motion-field R^2 with the true cameras {np.round(right, 2)}, with shuffled cameras "
          f"{np.round(wrong, 2)}")
    assert errors.max() < 2.0  # pixels of a 128-wide view
    assert right.min() > 0.5
    assert wrong.max() < 0.0


def test_triangles_close_the_face():
    """Tessellation cliques plus eye/mouth fans: a disc bounded by the face oval only."""
    tris = mini_dataset.face_triangles()
    assert tris.shape == (904, 3)
    assert set(np.unique(tris)) == set(range(468)) | {468, 473, mini_dataset.MOUTH_CENTER}
    edges = np.sort(np.concatenate([tris[:, [0, 1]], tris[:, [1, 2]], tris[:, [0, 2]]]), 1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    assert counts.max() == 2 and (counts == 1).sum() == 36  # the face oval


def test_rasterize_z_buffer():
    """Nearest triangle wins whatever the order; barycentric weights interpolate corners."""
    points = np.array([[2.0, 2.0], [30.0, 2.0], [2.0, 30.0]] * 2)
    depth = np.array([1.0, 1.0, 1.0, 2.0, 2.0, 2.0])
    for order in ([[0, 1, 2], [3, 4, 5]], [[3, 4, 5], [0, 1, 2]]):
        triangles = np.array(order)
        face, weights = mini_dataset.rasterize(points, depth, triangles, 32, 32)
        near = int(np.flatnonzero((triangles == [0, 1, 2]).all(1))[0])
        assert np.all(face[face >= 0] == near)
    assert face[10, 10] >= 0 and face[31, 31] == -1
    np.testing.assert_allclose(weights[face >= 0].sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(weights[2, 2], [1, 0, 0], atol=1e-6)
    # Perspective-correct: a triangle with a far corner weights that corner less at its
    # screen-space centroid than 1/3.
    face, weights = mini_dataset.rasterize(points[:3], np.array([1.0, 1.0, 4.0]),
                                           np.array([[0, 1, 2]]), 32, 32)
    assert weights[11, 11, 2] < 0.2


def test_prepared_annotations(built, mesh):
    """Every multi-view frame has landmarks and a selfie-segmentation mask covering the face."""
    (seq,), _ = sources.discover_nersemble(built.nersemble_root)
    height, width = int(mesh["height"]), int(mesh["width"])
    for k, stream in enumerate(seq.cameras):
        _, status = stream.store.read_landmarks(np.arange(stream.num_frames))
        assert np.all(status == store_lib.FOUND)
        masks = stream.read_masks([0, 60])
        assert masks.shape == (2, height, width)
        uv, _ = mini_dataset.project(mesh["vertices"][[0, 60], 4], mesh["world_2_cam"][k],
                                     mesh["intrinsics"])  # nose tip
        for m, (u, v) in zip(masks, np.round(uv).astype(int)):
            assert m[v, u] > 200  # the face is foreground
            assert m[:3, :3].mean() < 60  # the studio corner is background
    wild_store = store_lib.StreamStore(os.path.join(built.wild_root, sources.PREPARED_DIR,
                                                    "carphone"))
    assert np.all(wild_store.read_landmarks([0, 119])[1] == store_lib.FOUND)
