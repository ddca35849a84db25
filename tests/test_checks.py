"""Tests of the trace-time argument checks in jaxbce/_checks.py."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxbce import _checks


@pytest.mark.parametrize(
    "axis, ndim, want",
    [(None, 3, None), (-1, 3, (2,)), ((2, 0), 3, (0, 2)), ([1], 2, (1,))],
)
def test_normalize_axis(axis, ndim, want):
    assert _checks.normalize_axis(axis, ndim) == want


def test_check_broadcast_trailing_axes_only():
    out = _checks.check_broadcast(jnp.arange(3.0), "w", (2, 3), jnp.float32)
    np.testing.assert_array_equal(out, np.broadcast_to(np.arange(3.0), (2, 3)))
    assert _checks.check_broadcast(None, "w", (2, 3), jnp.float32) is None
    with pytest.raises(ValueError, match=r"w with shape \(2,\) does not broadcast to the shape"):
        _checks.check_broadcast(jnp.arange(2.0), "w", (2, 3), jnp.float32)
