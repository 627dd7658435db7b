"""The persistent compilation cache: a program compiled in one process loads from the cache
directory in the next, several times faster."""

import os
import textwrap

import forked_runs

PROGRAM = textwrap.dedent("""
    import sys, time
    import jax, jax.numpy as jnp
    from flax import nnx
    from facecam_jax.runtime import compile_cache
    from facecam_jax.models import wan_dit as W
    compile_cache.enable(sys.argv[1], min_compile_seconds=0.0)
    model = W.WanDiT(W.PRESETS["tiny"].replace(in_dim=36), rngs=nnx.Rngs(0))
    forward = nnx.jit(lambda m, x, t, c: m(x, t, c))
    args = (jnp.ones((1, 2, 4, 4, 36)), jnp.ones((1,)), jnp.ones((1, 4, 32)))
    start = time.perf_counter()
    forward(model, *args).block_until_ready()
    print(time.perf_counter() - start)
""")


def test_the_compile_cache_is_written_and_reused(tmp_path):
    cache = str(tmp_path / "xla")
    times = []
    for _ in range(2):  # two processes (forked before JAX starts), one device as an entry point runs here
        run = forked_runs.run("-c", PROGRAM, cache, timeout=300, env={"XLA_FLAGS": ""})
        assert run.returncode == 0, run.stderr[-2000:]
        times.append(float(run.stdout.strip().splitlines()[-1]))
    print(f"\nfirst call {times[0]:.2f} s (compile), second process {times[1]:.2f} s (from the cache)")
    assert os.listdir(cache), "nothing was written to the cache directory"
    assert times[1] < times[0] / 2
