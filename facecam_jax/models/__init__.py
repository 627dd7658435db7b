"""Pure model definitions (no I/O): the Wan DiT, the Wan VAE and the umT5 text encoder."""
