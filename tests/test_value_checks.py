"""Tests of the opt-in value checks in jaxbce/_value_checks.py."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jaxbce


def run_checked(**kwargs):
    def f(**kw):
        jaxbce.check_inputs(**kw)
        return jnp.float32(0)

    err, _ = jax.jit(checkify.checkify(f))(**kwargs)
    return err.get()


def test_valid_inputs_pass():
    assert (
        run_checked(
            logits=jnp.array([-3.0, 0.0, jnp.inf]),
            labels=jnp.array([0.0, 0.5, 1.0]),
            weight=jnp.array([0.0, 1.0, 2.0]),
            pos_weight=jnp.float32(3.0),
            probs=jnp.array([0.0, 0.5, 1.0]),
        )
        is None
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"labels": jnp.array([0.0, 1.5])}, r"labels must be \[0.0, 1.0\]; found 1 .* 1.5"),
        ({"labels": jnp.array([0, 2, 3], jnp.int32)}, r"labels .* found 2 entries"),
        ({"weight": jnp.array([1.0, -0.5])}, r"weight must be >= 0.0.* -0.5"),
        ({"pos_weight": jnp.array([-1.0])}, r"pos_weight must be >= 0.0"),
        ({"probs": jnp.array([0.2, 1.2])}, r"probs must be \[0.0, 1.0\]"),
        ({"logits": jnp.array([0.0, jnp.nan])}, r"logits contain 1 NaN"),
    ],
)
def test_each_bad_value_is_named(kwargs, message):
    msg = run_checked(**kwargs)
    assert msg is not None
    assert re.search(message, msg), msg


def test_masked_or_ignored_labels_are_not_checked():
    y = jnp.array([0.0, -1.0, 1.0, 7.0])
    assert (
        run_checked(labels=y, ignore_index=-1.0, where=jnp.array([True, True, True, False])) is None
    )
    assert run_checked(labels=y, ignore_index=-1.0) is not None


def test_throw_raises_with_the_message():
    def loss_fn(z, y):
        jaxbce.check_inputs(logits=z, labels=y)
        return jaxbce.binary_cross_entropy_with_logits(z, y)

    err, loss = checkify.checkify(loss_fn)(jnp.zeros(2), jnp.array([0.0, 2.0]))
    with pytest.raises(checkify.JaxRuntimeError, match="labels must be"):
        err.throw()
    np.testing.assert_allclose(loss, np.log(2.0) * 1.0 + 0.0, rtol=1e-6)
