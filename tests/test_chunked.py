"""Tests of jaxbce/_chunked.py: block sizes, block layout, gradients made forward."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbce import _chunked


@pytest.mark.parametrize(
    "rows, columns, want", [(512, 65536, 4096), (4096, 1 << 20, 512), (1 << 16, 10**6, 128)]
)
def test_default_chunk_keeps_a_block_under_the_budget(rows, columns, want):
    chunk = _chunked.chunk_size(rows, columns)
    assert chunk == want and chunk % _chunked.BLOCK_ALIGN == 0
    assert rows * chunk <= _chunked.BLOCK_ELEMENTS or chunk == _chunked.BLOCK_ALIGN


def test_chunk_is_capped_at_the_columns_and_requested_sizes_are_checked():
    assert _chunked.chunk_size(8, 300) == 300
    assert _chunked.chunk_size(8, 300, 1000) == 300
    assert _chunked.chunk_size(8, 300, 7) == 7
    with pytest.raises(ValueError, match="chunk_size must be a positive int; got 0"):
        _chunked.chunk_size(8, 300, 0)
    with pytest.raises(TypeError, match="chunk_size must be a positive Python int"):
        _chunked.chunk_size(8, 300, 2.5)


@pytest.mark.parametrize("columns, chunk", [(10, 3), (12, 4), (5, 5), (7, 1)])
def test_blocks_cover_every_column_once(columns, chunk):
    seen = np.zeros(columns, int)
    for i in range(_chunked.num_blocks(columns, chunk)):
        start = int(_chunked.block_start(jnp.int32(i), chunk, columns))
        fresh = np.asarray(_chunked.fresh_columns(jnp.int32(i), chunk, columns))
        assert 0 <= start and start + chunk <= columns
        seen[start : start + chunk] += fresh
    np.testing.assert_array_equal(seen, 1)


def _quadratic(wanted, a, b):
    """sum(a * b**2) and its gradients, b's only when wanted."""
    return jnp.sum(a * b**2), (b**2, 2 * a * b if wanted[1] else None)


def test_fused_vjp_gives_the_value_and_scaled_gradients():
    f = _chunked.fused_vjp(_quadratic)
    a, b = jnp.arange(3.0), jnp.array([1.0, -2.0, 0.5])
    np.testing.assert_allclose(f(a, b), np.sum(np.arange(3.0) * np.asarray(b) ** 2))
    ga, gb = jax.grad(lambda a, b: 3 * f(a, b), (0, 1))(a, b)
    np.testing.assert_allclose(ga, 3 * np.asarray(b) ** 2)
    np.testing.assert_allclose(gb, 6 * np.asarray(a) * np.asarray(b))
    v, g = jax.jit(jax.value_and_grad(f))(a, b)
    np.testing.assert_allclose(g, np.asarray(b) ** 2)


def test_fused_vjp_skips_what_is_not_differentiated():
    asked = []

    def fn(wanted, a, b):
        asked.append(wanted)
        return _quadratic(wanted, a, b)

    f = _chunked.fused_vjp(fn)
    jax.grad(f)(jnp.ones(2), jnp.ones(2))
    assert asked[-1] == (True, False)
    f(jnp.ones(2), jnp.ones(2))
    assert asked[-1] == (False, False)


def test_fused_vjp_keeps_each_gradients_dtype():
    def fn(wanted, a, b):
        a32 = a.astype(jnp.float32)
        return jnp.sum(a32 * b**2), ((b**2).astype(a.dtype), 2 * a32 * b)

    f = _chunked.fused_vjp(fn)
    a, b = jnp.ones(4, jnp.bfloat16), jnp.ones(4, jnp.float32)
    ga, gb = jax.grad(lambda a, b: f(a, b).astype(jnp.float32), (0, 1))(a, b)
    assert ga.dtype == jnp.bfloat16 and gb.dtype == jnp.float32


def test_recomputed_vjp_makes_gradients_in_the_backward_pass_with_the_cotangent():
    calls = []

    def fn(wanted, ct, a, b):
        calls.append((wanted, ct is None))
        value = a * b**2  # one value per entry: the cotangent is a vector
        if ct is None:
            return value, (None, None)
        return value, (ct * b**2, 2 * ct * a * b if wanted[1] else None)

    f = _chunked.recomputed_vjp(fn)
    a, b = jnp.arange(3.0), jnp.array([1.0, -2.0, 0.5])
    np.testing.assert_allclose(f(a, b), np.arange(3.0) * np.asarray(b) ** 2)
    ct = jnp.array([1.0, 2.0, 3.0])
    ga, gb = jax.grad(lambda a, b: jnp.sum(ct * f(a, b)), (0, 1))(a, b)
    np.testing.assert_allclose(ga, ct * b**2)
    np.testing.assert_allclose(gb, 2 * ct * a * b)
    assert ((False, False), True) in calls and ((True, True), False) in calls
    jax.grad(lambda a, b: jnp.sum(f(a, b)))(a, b)
    assert calls[-1] == ((True, False), False)


def test_varying_zeros_start_a_carry_that_sums_per_device_blocks():
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.asarray(jax.devices()[:1]), ("i",))

    def total(zeros):
        def local(x):
            def step(c, row):
                return c + row, None

            return jax.lax.psum(jax.lax.scan(step, zeros(x.shape[1:]), x)[0], "i")

        return jax.shard_map(local, mesh=mesh, in_specs=P("i"), out_specs=P())(jnp.ones((4, 2)))

    varying = functools.partial(_chunked.varying_zeros, dtype=jnp.float32, axis_name="i")
    np.testing.assert_allclose(total(varying), [4.0, 4.0])
    with pytest.raises(TypeError, match="carry"):
        total(lambda shape: jnp.zeros(shape))


def test_fused_vjp_scales_float64_gradients_in_float64():
    f = _chunked.fused_vjp(_quadratic)
    with jax.enable_x64(True):
        a, b = jnp.full(3, 1 / 3, jnp.float64), jnp.full(3, 1 / 7, jnp.float64)
        ga = jax.grad(lambda a: f(a, b) / 3)(a)
        assert ga.dtype == jnp.float64
        np.testing.assert_allclose(ga, np.full(3, (1 / 7) ** 2 / 3), rtol=1e-15)
