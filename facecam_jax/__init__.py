"""facecam-jax: FaceCam (portrait video camera control) on a Wan DiT in JAX / Flax NNX."""

__version__ = "0.2.0"
