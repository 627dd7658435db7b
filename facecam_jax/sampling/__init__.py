"""Sampling: the jitted sampling program, its inputs, the experts it runs (loading, offload)
and the batched render core. The command line's planning lives in ``facecam_jax.sample``."""
