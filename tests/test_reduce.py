"""Tests of jaxbce/_reduce.py: weighting, masking, reductions and their dtypes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbce import _prepare, _reduce


def test_reduce_loss_counts_only_selected_entries():
    loss = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    mask = jnp.array([[True, False], [False, False]])
    w = jnp.array([[2.0, 1.0], [1.0, 1.0]])
    kw = dict(weight=None, mask=mask, dtype=jnp.float32)
    np.testing.assert_array_equal(_reduce.reduce_loss(loss, axis=None, reduction="mean", **kw), 1.0)
    np.testing.assert_array_equal(
        _reduce.reduce_loss(loss, axis=(1,), reduction="mean", **kw), [1.0, 0.0]
    )
    np.testing.assert_allclose(
        _reduce.reduce_loss(
            loss, weight=w, mask=None, axis=None, reduction="weighted_mean", dtype=jnp.float32
        ),
        (2 + 2 + 3 + 4) / 5,
        rtol=1e-7,
    )
    assert _reduce.reduce_loss(loss, axis=None, reduction="none", **kw).shape == (2, 2)


def _random(n, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(n).astype(dtype)


@pytest.mark.parametrize(
    "dtype, rows",
    [(jnp.float32, 1024), (jnp.float64, 1024), (jnp.bfloat16, 512), (jnp.float16, 512)],
)
def test_sum_rows_by_logits_dtype(dtype, rows):
    assert _reduce.sum_rows_for(dtype) == rows
    assert _prepare.is_narrow(dtype) == (rows == _reduce.SUM_ROWS_NARROW)


def test_sum_by_rows_matches_sum_within_float32_rounding():
    x = _random(4 * _reduce.SUM_ROWS)
    exact = np.sum(x.astype(np.float64))
    got = float(jax.jit(_reduce.sum_by_rows)(jnp.asarray(x)))
    ref = float(jnp.sum(jnp.asarray(x)))
    # A priori: each of the n - 1 additions rounds by at most eps/2 of sum |x|.
    bound = (x.size - 1) * np.finfo(np.float32).eps / 2 * np.sum(np.abs(x.astype(np.float64)))
    assert abs(got - exact) <= bound and abs(ref - exact) <= bound
    # Measured on this sample: both within 1e-5 of that bound, 1 ulp of the total apart.
    ulp = float(np.spacing(np.float32(abs(exact))))
    assert abs(got - exact) <= 2 * ulp and abs(got - ref) <= 2 * ulp, (got, ref, exact)


def test_sum_by_rows_is_exact_where_every_partial_sum_is():
    x = np.random.default_rng(1).integers(-1000, 1000, 8 * _reduce.SUM_ROWS).astype(np.float32)
    np.testing.assert_array_equal(_reduce.sum_by_rows(jnp.asarray(x)), np.sum(x))


def test_sum_by_rows_float64():
    x = _random(4 * _reduce.SUM_ROWS, seed=2, dtype=np.float64)
    with jax.enable_x64(True):
        got = _reduce.sum_by_rows(jnp.asarray(x))
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(float(got), np.sum(x), rtol=0, atol=1e-12)


def test_sum_by_rows_keeps_shape_agnostic_total():
    x = _random(2 * _reduce.SUM_ROWS, seed=3).reshape(8, 16, 16)
    np.testing.assert_allclose(
        _reduce.sum_by_rows(jnp.asarray(x)), np.sum(x, dtype=np.float64), rtol=1e-6
    )


@pytest.mark.parametrize("rows", [512, 1024, 4096])
def test_sum_by_rows_of_any_length(rows):
    x = _random(3 * rows, seed=10)
    got = _reduce.sum_by_rows(jnp.asarray(x), rows)
    np.testing.assert_allclose(float(got), np.sum(x, dtype=np.float64), rtol=2e-6, atol=1e-5)
    got = jax.jit(_reduce.sum_all, static_argnums=1)(jnp.asarray(x), rows)
    np.testing.assert_allclose(float(got), np.sum(x, dtype=np.float64), rtol=2e-6, atol=1e-5)


@pytest.mark.parametrize("shape", [(4 * 1024,), (2, 6, 256), (1000,), (7, 3), (0,), (3, 0), ()])
@pytest.mark.parametrize("jit", [False, True])
def test_sum_all_value(shape, jit):
    x = _random(int(np.prod(shape)), seed=4).reshape(shape)
    f = jax.jit(_reduce.sum_all) if jit else _reduce.sum_all
    got = f(jnp.asarray(x))
    assert got.shape == () and got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), np.sum(x, dtype=np.float64), rtol=2e-6, atol=1e-5)


def test_sum_all_of_empty_array_is_zero_with_empty_gradient():
    x = jnp.zeros((0, 4))
    np.testing.assert_array_equal(_reduce.sum_all(x), 0.0)
    g = jax.grad(_reduce.sum_all)(x)
    assert g.shape == (0, 4)


@pytest.mark.parametrize("n", [1024, 1000])
def test_sum_all_gradient_is_all_ones(n):
    x = jnp.asarray(_random(n, seed=5))
    for g in (jax.grad(_reduce.sum_all)(x), jax.jit(jax.grad(_reduce.sum_all))(x)):
        assert g.shape == x.shape and g.dtype == x.dtype
        np.testing.assert_array_equal(g, np.ones(n, np.float32))


@pytest.mark.parametrize("n", [1024, 1000])
def test_sum_all_jvp_is_sum_of_tangents(n):
    x = jnp.asarray(_random(n, seed=6))
    dx = jnp.asarray(_random(n, seed=7))
    out, tangent = jax.jvp(_reduce.sum_all, (x,), (dx,))
    np.testing.assert_array_equal(out, _reduce.sum_all(x))
    np.testing.assert_array_equal(tangent, jnp.sum(dx))


def test_sum_all_second_derivatives():
    x = jnp.asarray(_random(512, seed=8))
    h = jax.jit(jax.hessian(lambda x: _reduce.sum_all(x**2)))(x)
    np.testing.assert_array_equal(h, 2 * np.eye(512, dtype=np.float32))
    g = jax.grad(lambda x: _reduce.sum_all(jnp.sin(x)))
    np.testing.assert_allclose(
        jax.jvp(g, (x,), (jnp.ones_like(x),))[1], -np.sin(np.asarray(x)), rtol=1e-6
    )


@pytest.mark.parametrize("n", [1024, 1000])
def test_sum_all_under_vmap(n):
    x = _random(3 * n, seed=9).reshape(3, n)
    want = np.sum(x.astype(np.float64), axis=1)
    for f in (jax.vmap(_reduce.sum_all), jax.jit(jax.vmap(_reduce.sum_all))):
        np.testing.assert_allclose(f(jnp.asarray(x)), want, rtol=2e-6, atol=1e-5)
    g = jax.vmap(jax.grad(_reduce.sum_all))(jnp.asarray(x))
    np.testing.assert_array_equal(g, np.ones_like(x))


def _lowered(fn, x, platform):
    return jax.jit(fn).trace(x).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("platform", ["cuda", "rocm"])
def test_sum_all_lowers_with_an_optimization_barrier_on_gpus(platform):
    """Lowered for a GPU without one: rows and a barrier, only at multiples of the rows."""
    assert "optimization_barrier" in _lowered(_reduce.sum_all, jnp.ones(1024), platform)
    assert "optimization_barrier" in _lowered(_reduce.sum_all, jnp.ones((4, 256)), platform)
    assert "optimization_barrier" not in _lowered(_reduce.sum_all, jnp.ones(1000), platform)
    assert "optimization_barrier" not in _lowered(_reduce.sum_all, jnp.ones(512), platform)
    assert "optimization_barrier" not in _lowered(_reduce.sum_all, jnp.ones(0), platform)
    narrow = functools.partial(_reduce.sum_all, rows=4096)
    assert "optimization_barrier" in _lowered(narrow, jnp.ones(8192), platform)
    assert "optimization_barrier" not in _lowered(narrow, jnp.ones(2048), platform)


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
@pytest.mark.parametrize("n", [1024, 1000])
def test_sum_all_lowers_to_a_single_sum_on_cpu_and_tpu(n, platform):
    """One sum: XLA:TPU would write the partial sums of rows as an array of N / 8
    floats or more (benchmarks/fusion.py --tpu compiles the loss for TPUs)."""
    text = _lowered(_reduce.sum_all, jnp.ones(n), platform)
    assert "optimization_barrier" not in text
    assert text.count("stablehlo.reduce") == 1


def test_sum_all_gradient_lowers_without_the_barrier():
    """The JVP is the plain sum: the barrier never reaches a derivative."""
    x = jnp.ones(1024)
    assert "optimization_barrier" not in _lowered(jax.grad(_reduce.sum_all), x, "cuda")
    text = _lowered(jax.value_and_grad(_reduce.sum_all), x, "cuda")
    assert text.count("optimization_barrier") == 1
