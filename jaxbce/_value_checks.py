"""Opt-in checks of array values, for use under ``jax.experimental.checkify``.

The losses check shapes, dtypes and Python option values when tracing, at no run-time
cost. Array values (a label of 3, a negative weight, a traced ``label_smoothing`` of
1.5, an out-of-range class index) would cost a pass over memory to check, so they are
checked only here, on request.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax.experimental import checkify
from jax.typing import ArrayLike

from jaxbce import _checks, _prepare


def _check_range(x, name: str, lo: float, hi: float | None, mask=None) -> None:
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
    label_smoothing: ArrayLike | None = None,
    where: ArrayLike | None = None,
    ignore_index: Any = None,
) -> None:
    """Checks input values with ``checkify.check``: an error naming the argument.

    * ``logits``: no NaN; ``probs`` in [0, 1]; ``labels`` in [0, 1] except entries
      masked out by ``where`` or equal to ``ignore_index``;
    * ``weight`` and ``pos_weight`` non-negative; ``label_smoothing`` in [0, 1] (a
      Python number is checked when tracing already; this also checks a traced one).

    Call it inside the function you wrap with ``jax.experimental.checkify.checkify``
    (``jit`` inside or outside both work).

    Args:
      logits, probs, labels, weight, pos_weight, label_smoothing: arrays to check (any
        may be omitted).
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
        z = _checks.check_float_array(logits, "logits")
        checkify.check(
            ~jnp.any(jnp.isnan(z)),
            "jaxbce: logits contain {n} NaN entries.",
            n=jnp.sum(jnp.isnan(z)),
        )
    if probs is not None:
        _check_range(_checks.check_float_array(probs, "probs"), "probs", 0.0, 1.0)
    if labels is not None:
        labels = jnp.asarray(labels)
        mask = _prepare.make_mask(where, labels, ignore_index, labels.shape)
        _check_range(labels.astype(jnp.float32), "labels", 0.0, 1.0, mask)
    if weight is not None:
        _check_range(weight, "weight", 0.0, None)
    if pos_weight is not None:
        _check_range(pos_weight, "pos_weight", 0.0, None)
    if label_smoothing is not None:
        if jnp.ndim(label_smoothing) != 0:
            raise ValueError(
                f"label_smoothing must be a scalar; got shape {jnp.shape(label_smoothing)}."
            )
        _check_range(jnp.asarray(label_smoothing, jnp.float32), "label_smoothing", 0.0, 1.0)


def in_range(idx, num_classes: int):
    """``0 <= idx < num_classes`` without overflowing narrow or unsigned dtypes."""
    info = jnp.iinfo(idx.dtype)
    ok = jnp.ones(idx.shape, jnp.bool_)
    if info.min < 0:
        ok = ok & (idx >= 0)
    if num_classes <= info.max:
        ok = ok & (idx < num_classes)
    return ok


def check_positive_indices(indices: ArrayLike, num_classes: int, *, pad: int = -1) -> None:
    """Checks index values with ``checkify.check``: every entry is ``pad`` or in range.

    The sparse and fused losses check dtype, rank and shape when tracing, and values
    only when they are a NumPy array: traced indices outside ``[0, num_classes)`` are
    silently ignored like ``pad``. Call this inside a function wrapped with
    ``jax.experimental.checkify.checkify`` to get an error instead.

    Args:
      indices: ``[B, K]`` integer array of positive class indices, padded with ``pad``.
      num_classes: ``C``, the number of classes.
      pad: the padding value, not a class index.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jax.experimental import checkify
      >>> import jaxbce
      >>> def loss_fn(z, idx):
      ...     jaxbce.check_positive_indices(idx, z.shape[-1])
      ...     return jaxbce.sparse_binary_cross_entropy_with_logits(z, idx)
      >>> checked = jax.jit(checkify.checkify(loss_fn))
      >>> err, loss = checked(jnp.zeros((2, 4)), jnp.array([[0, 7], [2, -1]]))
      >>> print(err.get())  # doctest: +ELLIPSIS
      jaxbce: positive_indices has 1 entries neither pad (-1) nor in [0, 4) (first 7, row 0)...
    """
    idx = jnp.asarray(indices)
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise TypeError(f"positive_indices must be an integer array; got dtype {idx.dtype}.")
    ok = (idx == pad) | in_range(idx, num_classes)
    flat = jnp.ravel(ok)
    first = jnp.argmin(flat)
    checkify.check(
        jnp.all(ok),
        f"jaxbce: positive_indices has {{bad}} entries neither pad ({pad}) nor in "
        f"[0, {num_classes}) (first {{val}}, row {{row}}).",
        bad=jnp.sum(~ok),
        val=jnp.ravel(idx)[first],
        row=first // max(idx.shape[-1], 1) if idx.ndim > 1 else jnp.zeros((), jnp.int32),
    )
