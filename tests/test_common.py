"""Tests of the shared checks and reductions in jaxbce/_common.py."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxbce import _common


def test_compute_dtype_is_at_least_float32():
    assert _common.compute_dtype(jnp.bfloat16) == jnp.float32
    assert _common.compute_dtype(jnp.float16) == jnp.float32
    assert _common.compute_dtype(jnp.float32) == jnp.float32


@pytest.mark.parametrize(
    "axis, ndim, want",
    [(None, 3, None), (-1, 3, (2,)), ((2, 0), 3, (0, 2)), ([1], 2, (1,))],
)
def test_normalize_axis(axis, ndim, want):
    assert _common.normalize_axis(axis, ndim) == want


def test_check_broadcast_trailing_axes_only():
    out = _common.check_broadcast(jnp.arange(3.0), "w", (2, 3), jnp.float32)
    np.testing.assert_array_equal(out, np.broadcast_to(np.arange(3.0), (2, 3)))
    assert _common.check_broadcast(None, "w", (2, 3), jnp.float32) is None
    with pytest.raises(ValueError, match=r"w with shape \(2,\) does not broadcast to the shape"):
        _common.check_broadcast(jnp.arange(2.0), "w", (2, 3), jnp.float32)


def test_make_mask_combines_where_and_ignore_index():
    y = jnp.array([[0, -1], [1, 1]])
    m = _common.make_mask(jnp.array([True, False]), y, -1, (2, 2))
    np.testing.assert_array_equal(m, [[True, False], [True, False]])
    assert _common.make_mask(None, y, None, (2, 2)) is None
    with pytest.raises(ValueError, match="ignore_index must be a scalar"):
        _common.make_mask(None, y, jnp.array([1, 2]), (2, 2))


def test_reduce_loss_counts_only_selected_entries():
    loss = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    mask = jnp.array([[True, False], [False, False]])
    w = jnp.array([[2.0, 1.0], [1.0, 1.0]])
    kw = dict(weight=None, mask=mask, dtype=jnp.float32)
    np.testing.assert_array_equal(_common.reduce_loss(loss, axis=None, reduction="mean", **kw), 1.0)
    np.testing.assert_array_equal(
        _common.reduce_loss(loss, axis=(1,), reduction="mean", **kw), [1.0, 0.0]
    )
    np.testing.assert_allclose(
        _common.reduce_loss(
            loss, weight=w, mask=None, axis=None, reduction="weighted_mean", dtype=jnp.float32
        ),
        (2 + 2 + 3 + 4) / 5,
        rtol=1e-7,
    )
    assert _common.reduce_loss(loss, axis=None, reduction="none", **kw).shape == (2, 2)


def test_smooth_labels_static_zero_is_identity_and_traced_value_allowed():
    y = jnp.array([0.0, 1.0])
    assert _common.smooth_labels(y, 0.0) is y
    np.testing.assert_allclose(_common.smooth_labels(y, jnp.float32(0.1)), [0.05, 0.95])
