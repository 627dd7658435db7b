"""Builds data/proxy_head.npy, the generic 3D head whose projections are the inference camera condition.

    python tools/make_proxy_head.py [--out data/proxy_head.npy]

Detects MediaPipe face-mesh landmarks (static mode, refine_landmarks=True) on
`skimage.data.astronaut()` and turns them into a frontal, upright head in the official orbit
frame with FaceLift's scale (facecam_jax.camera.proxy_head documents the frame and where the
numbers come from). Deterministic: same packages, same file.
"""

import argparse

import numpy as np

from facecam_jax.camera import landmarks, proxy_head
from facecam_jax.runtime import cli, paths


def make() -> np.ndarray:
    """The proxy head [478, 3] float32, computed from the astronaut photograph."""
    import skimage.data  # lazy: only the tool needs scikit-image

    image = skimage.data.astronaut()  # [512, 512, 3] uint8 RGB
    points = landmarks.detect_one(image)
    return proxy_head.build_proxy_head(points, image.shape[0], image.shape[1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(proxy_head.data_dir() / "proxy_head.npy"))
    args = parser.parse_args(argv)
    paths.check_outputs({"--out": args.out})  # reads no file: only writable, no folder
    head = make()
    np.save(args.out, head)
    iod = np.linalg.norm(head[landmarks.LEFT_IRIS_CENTER] - head[landmarks.RIGHT_IRIS_CENTER])
    print(f"wrote {args.out}: {head.shape}, inter-pupil {iod:.3f}, centroid {np.round(head.mean(0), 3)}, "
          f"extent min {np.round(head.min(0), 3)} max {np.round(head.max(0), 3)}")


if __name__ == "__main__":
    cli.run_script(main)
