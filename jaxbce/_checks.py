"""Trace-time checks of every loss's arguments: shapes, dtypes and option values.

They run on shapes, dtypes and Python values while tracing, so they cost nothing
under ``jit``, and each error names the argument and what was received. Nothing is
broadcast silently: :func:`check_broadcast` refuses anything that would enlarge the
logits. Values of arrays are checked only on request (``_value_checks.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

REDUCTIONS = ("none", "sum", "mean", "weighted_mean")
_INT32_MAX = int(np.iinfo(np.int32).max)


def dtype_of(x: Any) -> np.dtype:
    """The dtype of ``x`` without converting it (so that strings get our own error)."""
    dt = getattr(x, "dtype", None)
    return np.asarray(x).dtype if dt is None else np.dtype(dt)


def is_real_or_bool(dt: Any) -> bool:
    return bool(
        jnp.issubdtype(dt, jnp.floating) or jnp.issubdtype(dt, jnp.integer) or dt == jnp.bool_
    )


def is_hard_dtype(dt: Any) -> bool:
    """Bool and integer labels: class indicators, exactly 0 or 1 once converted."""
    return bool(dt == jnp.bool_ or jnp.issubdtype(dt, jnp.integer))


def check_float_array(x: ArrayLike, name: str) -> jax.Array:
    """``x`` as an array; TypeError unless it is real floating point."""
    if not jnp.issubdtype(dtype_of(x), jnp.floating):
        raise TypeError(
            f"{name} must be a real floating-point array (float16, bfloat16, float32 or "
            f"float64); got dtype {dtype_of(x)} with shape {np.shape(x)}."
        )
    return jnp.asarray(x)


def check_labels(
    labels: ArrayLike, shape: tuple[int, ...], name: str = "labels", target: str = "logits"
) -> jax.Array:
    """Labels of exactly ``shape`` (no broadcasting) and a bool, int or float dtype."""
    if not is_real_or_bool(dtype_of(labels)):
        raise TypeError(
            f"{name} must be bool, integer or real floating point; got dtype {dtype_of(labels)}."
        )
    labels = jnp.asarray(labels)
    if labels.shape != tuple(shape):
        raise ValueError(
            f"{name} must have exactly the shape of {target}: got {name} shape "
            f"{labels.shape} and {target} shape {tuple(shape)}. jaxbce never broadcasts "
            f"{name}; reshape explicitly (e.g. {target}.squeeze(-1) for a (B, 1) output)."
        )
    return labels


def check_broadcast(
    x: ArrayLike | None, name: str, shape: tuple[int, ...], dtype: Any, *, target: str = "logits"
) -> jax.Array | None:
    """An optional ``x`` broadcast to ``shape``, refusing anything that would enlarge it."""
    if x is None:
        return None
    if not is_real_or_bool(dtype_of(x)):
        raise TypeError(f"{name} must be a real number array; got dtype {dtype_of(x)}.")
    x = jnp.asarray(x)
    try:
        out_shape = np.broadcast_shapes(x.shape, tuple(shape))
    except ValueError:
        out_shape = None
    if out_shape != tuple(shape):
        raise ValueError(
            f"{name} with shape {x.shape} does not broadcast to the shape of {target} "
            f"{tuple(shape)} (it must broadcast along trailing axes without enlarging "
            f"{target})."
        )
    return jnp.broadcast_to(x.astype(dtype), shape)


def normalize_axis(axis: int | Sequence[int] | None, ndim: int) -> tuple[int, ...] | None:
    """``axis`` as a sorted tuple of non-negative ints, or None for all axes."""
    if axis is None:
        return None
    if isinstance(axis, (int, np.integer)):
        axes = (axis,)
    elif isinstance(axis, (tuple, list)):
        axes = tuple(axis)
    else:
        raise TypeError(f"axis must be an int or a tuple of ints; got {axis!r}.")
    out = []
    for a in axes:
        if not isinstance(a, (int, np.integer)) or isinstance(a, bool):
            raise TypeError(f"axis must be an int or a tuple of ints; got {axis!r}.")
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for logits of rank {ndim}.")
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis {axis!r} repeats an axis.")
    return tuple(sorted(out))


def check_reduction(reduction: str, allowed: Sequence[str] = REDUCTIONS) -> str:
    if reduction not in allowed:
        raise ValueError(
            f"reduction must be one of {', '.join(map(repr, allowed))}; got {reduction!r}."
        )
    return reduction


def check_scalar_option(value: Any, name: str, lo: float = 0.0, hi: float | None = 1.0) -> None:
    """A scalar option in [lo, hi] (``hi=None``: >= lo; NaN never passes), checked when
    its value is known at trace time; a traced value is checked by ``check_inputs``."""
    if isinstance(value, (str, bytes)) or not is_real_or_bool(dtype_of(value)):
        raise TypeError(f"{name} must be a real number; got {value!r}.")
    if np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar; got shape {np.shape(value)}.")
    try:
        v = float(value)
    except jax.errors.ConcretizationTypeError:
        return
    if hi is None and not v >= lo:
        raise ValueError(f"{name} must be >= {lo:g}; got {v}.")
    if hi is not None and not lo <= v <= hi:
        raise ValueError(f"{name} must lie in [{lo:g}, {hi:g}]; got {v}.")


def check_positive_indices_shape(
    indices: Any, batch: int, num_classes: int, pad: Any, *, target: str = "logits"
) -> jax.Array:
    """``positive_indices``: an integer ``[B, K]`` array and a ``pad`` outside
    ``[0, num_classes)``; values too when they are a NumPy array or a list (known
    without a device round trip; traced ones: ``check_positive_indices``)."""
    dt = dtype_of(indices)
    if not jnp.issubdtype(dt, jnp.integer):
        raise TypeError(
            f"positive_indices must be an integer array of class indices; got dtype {dt}."
        )
    shape = np.shape(indices)
    if len(shape) != 2 or shape[0] != batch:
        raise ValueError(
            f"positive_indices must have shape (B, K) = ({batch}, K) for {target} of "
            f"shape ({batch}, {num_classes}); got shape {shape}."
        )
    if not isinstance(pad, (int, np.integer)) or isinstance(pad, bool):
        raise TypeError(f"pad must be a Python int; got {pad!r}.")
    if 0 <= pad < num_classes:
        raise ValueError(
            f"pad={pad} is a valid class index for {num_classes} classes; pad must lie "
            f"outside [0, {num_classes}) (e.g. -1 or {num_classes})."
        )
    if num_classes + shape[1] > _INT32_MAX:
        raise ValueError(f"num_classes + K must be below 2**31; got {num_classes} + {shape[1]}.")
    if isinstance(indices, (np.ndarray, list, tuple)):
        values = np.asarray(indices)
        bad = (values != pad) & ((values < 0) | (values >= num_classes))
        if bad.any():
            raise ValueError(
                f"positive_indices has {int(bad.sum())} entries that are neither pad "
                f"({pad}) nor a class index in [0, {num_classes}) (first: "
                f"{values[bad].flat[0]} at {tuple(int(i) for i in np.argwhere(bad)[0])})."
            )
    return jnp.asarray(indices)
