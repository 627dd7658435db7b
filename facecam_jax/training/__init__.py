"""Training: the jitted flow-matching step, the loop around it, its run state (Orbax
checkpoints of a run, not weight files: those are ``facecam_jax.checkpoints``), metrics,
preemption and multi-process set-up, and the mini VAE's reconstruction training."""
