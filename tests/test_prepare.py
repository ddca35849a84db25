"""Tests of jaxbce/_prepare.py: compute dtype, masks, labels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbce import _prepare


def test_compute_dtype_is_at_least_float32():
    assert _prepare.compute_dtype(jnp.bfloat16) == jnp.float32
    assert _prepare.compute_dtype(jnp.float16) == jnp.float32
    assert _prepare.compute_dtype(jnp.float32) == jnp.float32


def test_make_mask_combines_where_and_ignore_index():
    y = jnp.array([[0, -1], [1, 1]])
    m = _prepare.make_mask(jnp.array([True, False]), y, -1, (2, 2))
    np.testing.assert_array_equal(m, [[True, False], [True, False]])
    assert _prepare.make_mask(None, y, None, (2, 2)) is None
    with pytest.raises(ValueError, match="ignore_index must be a scalar"):
        _prepare.make_mask(None, y, jnp.array([1, 2]), (2, 2))


def test_smooth_labels_static_zero_is_identity_and_traced_value_allowed():
    y = jnp.array([0.0, 1.0])
    assert _prepare.smooth_labels(y, 0.0) is y
    np.testing.assert_allclose(_prepare.smooth_labels(y, jnp.float32(0.1)), [0.05, 0.95])


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.uint8, jnp.int32])
def test_label_values_integer_labels_are_nonzero_indicators(dtype):
    y = jnp.array(
        [0, 1, 2, 100, -3, -1]
        if jnp.issubdtype(dtype, jnp.signedinteger)
        else [0, 1, 2, 100, 255, 0],
        dtype,
    )
    out = _prepare.label_values(y)
    assert out.dtype == jnp.bool_
    np.testing.assert_array_equal(out, np.asarray(y) != 0)


def test_label_values_bool_and_float_labels_are_unchanged():
    b = jnp.array([True, False, True])
    assert _prepare.label_values(b) is b
    f = jnp.array([0.0, 0.3, 1.0, 2.0], jnp.float32)  # soft labels kept, even out of range
    assert _prepare.label_values(f) is f


@pytest.mark.parametrize(
    "labels",
    [
        np.array([True, False]),
        np.array([0, 1], np.int8),
        np.array([0, 255], np.uint8),
        np.array([0, 1], np.int64),
        jnp.array([0, 1], jnp.int32),
        [0, 1],
    ],
)
@pytest.mark.parametrize("smoothing", [0, 0.0, np.float64(0.0)])
def test_labels_are_hard_for_bool_and_integer_labels_without_smoothing(labels, smoothing):
    assert _prepare.labels_are_hard(labels, smoothing) is True


@pytest.mark.parametrize(
    "smoothing", [0, 0.0, -0.0, np.float64(0.0), np.float32(0.0), jnp.float32(0.0), 0.1, 1]
)
def test_labels_are_hard_only_where_smoothing_is_statically_a_no_op(smoothing):
    """The hard kernel is chosen only where smooth_labels returns the labels untouched."""
    y = jnp.array([0, 1, 5], jnp.int8)
    hard = _prepare.labels_are_hard(y, smoothing)
    values = _prepare.label_values(y).astype(jnp.float32)
    assert hard is (_prepare.smooth_labels(values, smoothing) is values)


def test_labels_are_hard_for_traced_integer_labels():
    seen = []

    @jax.jit
    def f(y):
        seen.append(_prepare.labels_are_hard(y, 0.0))
        return y

    f(jnp.array([0, 1], jnp.int8))
    f(jnp.array([0.0, 1.0]))
    assert seen == [True, False]


@pytest.mark.parametrize(
    "labels, smoothing",
    [
        (np.array([0.0, 1.0], np.float32), 0.0),  # float labels may be soft
        (jnp.array([0.0, 1.0], jnp.bfloat16), 0.0),
        ([0.0, 1.0], 0.0),
        (np.array([True, False]), 0.1),  # smoothing makes them soft
        (np.array([0, 1], np.int8), 1.0),
        (np.array([0, 1], np.int8), jnp.float32(0.0)),  # traced/array smoothing: unknown
        (np.array([0, 1], np.int8), np.array(0.0)),
    ],
)
def test_labels_are_not_hard_for_float_labels_or_any_smoothing(labels, smoothing):
    assert _prepare.labels_are_hard(labels, smoothing) is False
