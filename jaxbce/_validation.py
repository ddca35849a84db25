"""Opt-in value checks for use under ``jax.experimental.checkify``."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax.experimental import checkify
from jax.typing import ArrayLike

from jaxbce import _common


def _check_range(x, name: str, lo: float, hi: float | None, mask) -> None:
    x = jnp.asarray(x)
    ok = (x >= lo) if hi is None else ((x >= lo) & (x <= hi))
    if mask is not None:
        ok = ok | ~mask
    where = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
    checkify.check(
        jnp.all(ok),
        f"jaxbce: {name} must be {where}; found {{bad}} entries outside "
        f"(first offending value {{val}}).",
        bad=jnp.sum(~ok),
        val=jnp.ravel(x)[jnp.argmin(jnp.ravel(ok))].astype(jnp.float32),
    )


def check_inputs(
    *,
    logits: ArrayLike | None = None,
    probs: ArrayLike | None = None,
    labels: ArrayLike | None = None,
    weight: ArrayLike | None = None,
    pos_weight: ArrayLike | None = None,
    where: ArrayLike | None = None,
    ignore_index: Any = None,
) -> None:
    """Checks input values (not only shapes) with ``checkify.check``; off the hot path.

    The losses check shapes, dtypes and options at trace time for free, but do not look
    at values, so a label of 3 or a negative weight silently gives a meaningless loss.
    Call this inside the function you wrap with ``jax.experimental.checkify.checkify``
    (jit inside or outside both work) to get an error naming the argument:

    * ``logits``: no NaN; ``probs`` in [0, 1]; ``labels`` in [0, 1] except entries
      masked out by ``where`` or equal to ``ignore_index``;
    * ``weight`` and ``pos_weight`` non-negative.

    Args:
      logits, probs, labels, weight, pos_weight: arrays to check (any may be omitted).
      where: optional bool mask; labels outside it are not checked.
      ignore_index: label value of missing entries, not checked.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jax.experimental import checkify
      >>> import jaxbce
      >>> def loss_fn(z, y):
      ...     jaxbce.check_inputs(logits=z, labels=y)
      ...     return jaxbce.binary_cross_entropy_with_logits(z, y)
      >>> checked = jax.jit(checkify.checkify(loss_fn))
      >>> err, loss = checked(jnp.zeros(3), jnp.array([0.0, 1.0, 3.0]))
      >>> print(err.get())  # doctest: +ELLIPSIS
      jaxbce: labels must be [0.0, 1.0]; found 1 entries outside (first offending value 3.0)...
    """
    if logits is not None:
        z = _common.check_float_array(logits, "logits")
        checkify.check(
            ~jnp.any(jnp.isnan(z)),
            "jaxbce: logits contain {n} NaN entries.",
            n=jnp.sum(jnp.isnan(z)),
        )
    if probs is not None:
        _check_range(_common.check_float_array(probs, "probs"), "probs", 0.0, 1.0, None)
    if labels is not None:
        labels = jnp.asarray(labels)
        mask = _common.make_mask(where, labels, ignore_index, labels.shape)
        _check_range(labels.astype(jnp.float32), "labels", 0.0, 1.0, mask)
    if weight is not None:
        _check_range(weight, "weight", 0.0, None, None)
    if pos_weight is not None:
        _check_range(pos_weight, "pos_weight", 0.0, None, None)
