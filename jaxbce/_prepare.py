"""Inputs made ready for an element-wise kernel: compute dtype, masks, labels.

:func:`prepare` runs every trace-time check a loss needs (``_checks.py``) and returns
the logits and labels in the compute dtype with masked-out entries set to 0, so that
NaN or inf there (missing labels, padding) never reaches the loss or its gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxbce import _checks


def compute_dtype(dtype: Any) -> np.dtype:
    """The dtype arithmetic runs in: float64 for float64, else float32."""
    return np.dtype(np.float64 if np.dtype(dtype) == np.float64 else np.float32)


def is_narrow(dtype: Any) -> bool:
    """True for 16-bit logits (bfloat16, float16)."""
    return np.dtype(dtype).itemsize <= 2


def make_mask(
    where: ArrayLike | None,
    labels: jax.Array | None,
    ignore_index: Any,
    shape: tuple[int, ...],
    *,
    target: str = "logits",
) -> jax.Array | None:
    """``where`` and ``ignore_index`` as one boolean mask (None: keep all).

    ``ignore_index`` is compared with the labels exactly, in a dtype holding both (never
    cast to the labels' dtype: -1 would become True for bool labels, 255 for uint8), and
    a NaN ``ignore_index`` matches NaN labels.
    """
    mask = None
    if where is not None:
        where = jnp.asarray(where)
        if where.dtype != jnp.bool_:
            raise TypeError(f"where must be a boolean array; got dtype {where.dtype}.")
        mask = _checks.check_broadcast(where, "where", shape, jnp.bool_, target=target)
    if ignore_index is not None:
        if np.ndim(ignore_index) != 0:
            raise ValueError(f"ignore_index must be a scalar; got shape {np.shape(ignore_index)}.")
        if isinstance(ignore_index, (str, bytes)) or not _checks.is_real_or_bool(
            _checks.dtype_of(ignore_index)
        ):
            raise TypeError(f"ignore_index must be a real number; got {ignore_index!r}.")
        ig = jnp.asarray(ignore_index)
        with jax.numpy_dtype_promotion("standard"):  # a dtype that holds both exactly
            dt = jnp.promote_types(labels.dtype, ig.dtype)
        lab, ig = labels.astype(dt), ig.astype(dt)
        missing = lab == ig
        if jnp.issubdtype(dt, jnp.floating):
            missing = missing | (jnp.isnan(lab) & jnp.isnan(ig))
        mask = ~missing if mask is None else mask & ~missing
    return mask


def label_values(labels: jax.Array) -> jax.Array:
    """Integer labels are class indicators (nonzero is positive, as for bool); float
    labels are taken as they are (soft labels in [0, 1])."""
    if jnp.issubdtype(labels.dtype, jnp.integer):
        return labels != 0
    return labels


def _static_zero(label_smoothing: Any) -> bool:
    return bool(isinstance(label_smoothing, (int, float)) and label_smoothing == 0)


def labels_are_hard(labels: ArrayLike, label_smoothing: Any) -> bool:
    """True when every label is 0 or 1 by its dtype: bool or integer labels and no
    label smoothing (a static 0)."""
    return _checks.is_hard_dtype(_checks.dtype_of(labels)) and _static_zero(label_smoothing)


def smooth_labels(labels: jax.Array, label_smoothing: Any) -> jax.Array:
    """Keras label smoothing, ``y (1 - eps) + eps / 2`` (a no-op for a static 0)."""
    _checks.check_scalar_option(label_smoothing, "label_smoothing")
    if _static_zero(label_smoothing):
        return labels
    eps = jnp.asarray(label_smoothing, labels.dtype)
    return labels * (1 - eps) + eps / 2


def apply_mask(mask: jax.Array | None, *arrays: jax.Array) -> tuple[jax.Array, ...]:
    """Entries outside ``mask`` replaced by 0."""
    if mask is None:
        return arrays
    return tuple(jnp.where(mask, a, jnp.zeros((), a.dtype)) for a in arrays)


class Prepared(NamedTuple):
    """Checked inputs of a loss, ready for an element-wise kernel."""

    # x and y are as given, in their own dtypes, for prepare(convert=False) when there
    # is no mask and no label smoothing.
    x: jax.Array  # logits or probabilities in the compute dtype, masked entries 0
    y: jax.Array | None  # labels in the compute dtype, masked entries 0, smoothed
    weight: jax.Array | None  # broadcast to the input's shape, compute dtype
    mask: jax.Array | None  # bool, the input's shape; None keeps every entry
    axis: tuple[int, ...] | None
    dtype: np.dtype  # the input's dtype
    compute_dtype: np.dtype


def prepare(
    x: ArrayLike,
    labels: ArrayLike | None,
    weight: ArrayLike | None,
    where: ArrayLike | None,
    ignore_index: Any,
    axis: int | Sequence[int] | None,
    reduction: str,
    label_smoothing: Any = 0.0,
    *,
    name: str = "logits",
    convert: bool = True,
) -> Prepared:
    """Every trace-time check and conversion of a loss, in one place.

    ``x`` must be real floating point; ``labels`` exactly ``x``'s shape (bool, int or
    float), or None for a loss whose targets come in another form (positive indices:
    then ``y`` is None and ``label_smoothing`` is only checked); ``weight`` and ``where``
    must broadcast to ``x`` without enlarging it; ``axis`` and ``reduction`` must be
    valid. Masked-out entries become 0 before label smoothing.

    ``convert=False``, for kernels that convert by themselves (``_core``), leaves ``x``
    and ``labels`` in their own dtypes when nothing here needs them converted (no mask,
    no label smoothing): on CPU a conversion read by both the loss and the gradient is
    materialized as an N-sized array, where each of their fusions can convert for itself.
    """
    x = _checks.check_float_array(x, name)
    shape, dtype = x.shape, x.dtype
    cdt = compute_dtype(dtype)
    if labels is not None:
        labels = _checks.check_labels(labels, shape, target=name)
    axis = _checks.normalize_axis(axis, x.ndim)
    _checks.check_reduction(reduction)
    weight = _checks.check_broadcast(weight, "weight", shape, cdt, target=name)
    mask = make_mask(where, labels, ignore_index, shape, target=name)
    if labels is None:
        _checks.check_scalar_option(label_smoothing, "label_smoothing")
        (xc,) = apply_mask(mask, x.astype(cdt))
        return Prepared(xc, None, weight, mask, axis, dtype, cdt)
    if not convert and mask is None and _static_zero(label_smoothing):
        _checks.check_scalar_option(label_smoothing, "label_smoothing")
        return Prepared(x, labels, weight, mask, axis, dtype, cdt)
    xc, y = apply_mask(mask, x.astype(cdt), label_values(labels).astype(cdt))
    y = smooth_labels(y, label_smoothing)
    return Prepared(xc, y, weight, mask, axis, dtype, cdt)
