"""Attention implementations against the XLA softmax: splash (Pallas interpret mode on CPU),
its padding and segment ids, sharded and context-parallel runs, and a TPU-target compile."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from facecam_jax import sharding as sh
from facecam_jax.models import attention as attn

TOL = 2e-5  # fp32 splash (interpret mode) vs the XLA softmax; measured ~1e-6


@pytest.fixture
def interpret(monkeypatch):
    """Runs the splash TPU kernel in Pallas interpret mode, which works on the CPU."""
    monkeypatch.setattr(attn, "SPLASH_INTERPRET", True)


def _qkv(b, lq, lk, n, h, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, lq, n, h)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, lk, n, h)), jnp.float32) for _ in range(2))
    return q, k, v


def _err(a, b):
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


@pytest.mark.parametrize("lq,lk,scale", [(72, 72, None), (72, 16, 0.3), (72, 128, None)])  # self, cross, kv unpadded
def test_splash_matches_xla(interpret, lq, lk, scale):
    q, k, v = _qkv(2, lq, lk, 2, 8)
    want = attn.attention(q, k, v, implementation="xla", scale=scale)
    got = jax.jit(lambda q, k, v: attn.attention(q, k, v, implementation="splash", scale=scale))(q, k, v)
    err = _err(got, want)
    print(f"\n[splash q{lq} kv{lk}] max abs err vs xla {err:.1e}")
    assert got.shape == want.shape and err < TOL


def test_splash_gradients_match_xla(interpret):
    # kv 128 needs no padding, so the padded query rows (segment 1) see no key of their segment:
    # a NaN there would reach dK and dV through the backward kernel's logsumexp.
    q, k, v = _qkv(1, 72, 128, 2, 8, seed=1)
    loss = lambda impl: lambda q, k, v: (attn.attention(q, k, v, implementation=impl) ** 2).sum()  # noqa: E731
    want = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    got = jax.jit(jax.grad(loss("splash"), argnums=(0, 1, 2)))(q, k, v)
    errs = [_err(g, w) for g, w in zip(got, want)]
    print(f"\n[splash grads dq dk dv] max abs err vs xla {errs}")
    assert all(np.isfinite(np.asarray(g)).all() for g in got)
    assert max(errs) < TOL


def test_splash_rejects_what_it_cannot_run(monkeypatch):
    q, k, v = _qkv(1, 8, 8, 1, 4)
    with pytest.raises(ValueError, match="TPU kernel"):  # a CPU target, not in interpret mode
        attn.attention(q, k, v, implementation="splash")
    monkeypatch.setattr(attn, "SPLASH_INTERPRET", True)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        attn.attention(*(x.astype(jnp.float16) for x in (q, k, v)), implementation="splash")


def test_splash_sharded_batch_and_heads(interpret):
    q, k, v = _qkv(2, 72, 72, 4, 8, seed=3)
    ctx = _qkv(2, 72, 16, 4, 8, seed=4)[1]
    want_self = attn.attention(q, k, v, implementation="xla")
    want_cross = attn.attention(q, ctx, ctx, implementation="xla")
    mesh = sh.make_mesh(data=2, fsdp=2, context=1, tensor=2)  # batch over data, heads over tensor
    with sh.use_mesh(mesh):
        fn = jax.jit(lambda q, k, v, c: (attn.attention(q, k, v, implementation="splash"),
                                         attn.attention(q, c, c, implementation="splash")))
        got_self, got_cross = fn(q, k, v, ctx)
        hlo = fn.lower(q, k, v, ctx).as_text()
    errs = _err(got_self, want_self), _err(got_cross, want_cross)
    print(f"\n[splash, batch x heads sharded, self/cross] max abs err vs xla {errs}")
    assert "sdy.manual_computation" in hlo and "tensor<1x72x2x8xf32>" in hlo  # per-device [b/2, L, n/2, h]
    assert max(errs) < TOL


@pytest.mark.parametrize("heads", [4, 2])  # 4 heads: Ulysses all-to-all; 1 head per tensor shard: KV all-gather
def test_splash_context_parallel(interpret, heads):
    q, k, v = _qkv(2, 144, 144, heads, 8, seed=heads)  # 72 tokens per context shard: padded
    ctx = _qkv(2, 144, 16, heads, 8, seed=5)[1]
    want_self = attn.attention(q, k, v, implementation="xla")
    want_cross = attn.attention(q, ctx, ctx, implementation="xla")
    mesh = sh.make_mesh(data=1, fsdp=2, context=2, tensor=2)
    with sh.use_mesh(mesh):
        fn = jax.jit(lambda q, k, v, c: (attn.attention(q, k, v, implementation="splash"),
                                         attn.attention(q, c, c, implementation="splash")))
        got_self, got_cross = fn(q, k, v, ctx)
        hlo = fn.lower(q, k, v, ctx).as_text()
    errs = _err(got_self, want_self), _err(got_cross, want_cross)
    print(f"\n[splash, context 2, {heads} heads, self/cross] max abs err vs xla {errs}")
    assert ("all_to_all" in hlo or "all-to-all" in hlo) if heads == 4 else ("all_gather" in hlo or "all-gather" in hlo)
    assert max(errs) < TOL


def test_auto_platform_follows_the_mesh():
    assert attn._platform() == "cpu"
    with sh.use_mesh(sh.make_mesh()):
        assert attn._platform() == "cpu"  # the TPU-mesh case is test_auto_compiles_splash_for_tpu


@pytest.fixture
def no_compilation_cache():
    """A compile-only TPU executable cannot be read back from the persistent cache by a CPU client."""
    from jax.experimental.compilation_cache import compilation_cache

    previous = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # whether the cache is used is decided once, at the first compile
    yield
    jax.config.update("jax_enable_compilation_cache", previous)
    compilation_cache.reset_cache()


@pytest.mark.parametrize("context", [1, 2])
def test_auto_compiles_splash_for_tpu(no_compilation_cache, context):
    pytest.importorskip("libtpu", reason="the TPU-target compile needs libtpu's compile-only client")
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
    mesh = sh.make_mesh(data=1, fsdp=-1, context=context, tensor=1, devices=topo.devices)
    b, l, n, h = 4, 8000, 4, 128  # 8000 tokens: padded to 8192 with blocks of 512
    with sh.use_mesh(mesh):
        spec = sh.logical_to_spec((sh.ACT_BATCH, sh.ACT_SEQ, sh.ACT_HEADS, None), (b, l, n, h), mesh)
        x = jax.ShapeDtypeStruct((b, l, n, h), jnp.bfloat16, sharding=NamedSharding(mesh, spec))
        loss = lambda q, k, v: attn.attention(q, k, v, implementation="auto").astype(jnp.float32).sum()  # noqa: E731
        start = time.perf_counter()
        lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(x, x, x)
        compiled = lowered.compile()
        seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    mib = lambda n: f"{n / 2**20:.2f} MiB"  # noqa: E731
    print(f"\n[auto -> splash, v5e:2x2, context {context}] fwd+bwd compile {seconds:.1f} s, "
          f"arguments {mib(memory.argument_size_in_bytes)}, temp {mib(memory.temp_size_in_bytes)}")
    text = lowered.as_text()
    assert "tpu_custom_call" in text  # the Mosaic kernel, not the XLA softmax
    assert ("all_to_all" in text) == (context == 2)  # Ulysses: 4 local heads over 2 sequence shards
    assert memory.argument_size_in_bytes == 3 * b * l * n * h * 2 // 4  # q, k, v split over the 4 chips
    # O(L) backward: the fused dkv+dq kernel would keep a dq per kv block (128 MiB temp here).
    assert memory.temp_size_in_bytes < memory.argument_size_in_bytes
    assert seconds < 30
