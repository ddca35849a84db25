"""Argument checking, masking and reduction shared by every jaxbce loss.

Everything here runs at trace time on shapes, dtypes and Python option values,
or is a cheap element-wise op that XLA fuses into the loss kernel. Nothing here
broadcasts silently: every broadcast is explicit and checked first.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

REDUCTIONS = ("none", "sum", "mean", "weighted_mean")


def compute_dtype(dtype: Any) -> np.dtype:
    """The dtype arithmetic runs in: at least float32 (float64 stays float64)."""
    return jnp.promote_types(dtype, jnp.float32)


def _dtype_of(x: Any) -> np.dtype:
    """The dtype of ``x`` without converting it (so that strings get our own error)."""
    dt = getattr(x, "dtype", None)
    return np.asarray(x).dtype if dt is None else np.dtype(dt)


def _is_real_or_bool(dt: Any) -> bool:
    return bool(
        jnp.issubdtype(dt, jnp.floating) or jnp.issubdtype(dt, jnp.integer) or dt == jnp.bool_
    )


def check_float_array(x: ArrayLike, name: str) -> jax.Array:
    """Returns ``x`` as an array, raising TypeError unless it is real floating point."""
    if not jnp.issubdtype(_dtype_of(x), jnp.floating):
        raise TypeError(
            f"{name} must be a real floating-point array (float16, bfloat16, float32 or "
            f"float64); got dtype {_dtype_of(x)} with shape {np.shape(x)}."
        )
    return jnp.asarray(x)


def check_labels(
    labels: ArrayLike, shape: tuple[int, ...], name: str = "labels", target: str = "logits"
) -> jax.Array:
    """Checks labels: exactly ``shape`` (no broadcasting) and a bool, int or float dtype."""
    if not _is_real_or_bool(_dtype_of(labels)):
        raise TypeError(
            f"{name} must be bool, integer or real floating point; got dtype {_dtype_of(labels)}."
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
    """Broadcasts an optional ``x`` to ``shape``, refusing anything that would enlarge it."""
    if x is None:
        return None
    if not _is_real_or_bool(_dtype_of(x)):
        raise TypeError(f"{name} must be a real number array; got dtype {_dtype_of(x)}.")
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
    """Returns ``axis`` as a sorted tuple of non-negative ints, or None for all axes."""
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
    """Checks a scalar option lies in [lo, hi] (``hi=None``: >= lo; NaN never passes)

    when its value is known at trace time; a traced value is left to the caller.
    """
    if isinstance(value, (str, bytes)) or not _is_real_or_bool(_dtype_of(value)):
        raise TypeError(f"{name} must be a real number; got {value!r}.")
    if np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar; got shape {np.shape(value)}.")
    try:
        v = float(value)
    except jax.errors.ConcretizationTypeError:
        return  # a traced value: nothing to check at trace time
    if hi is None and not v >= lo:
        raise ValueError(f"{name} must be >= {lo:g}; got {v}.")
    if hi is not None and not lo <= v <= hi:
        raise ValueError(f"{name} must lie in [{lo:g}, {hi:g}]; got {v}.")


def make_mask(
    where: ArrayLike | None,
    labels: jax.Array,
    ignore_index: Any,
    shape: tuple[int, ...],
    *,
    target: str = "logits",
) -> jax.Array | None:
    """Combines ``where`` and ``ignore_index`` into one boolean mask (None: keep all).

    ``ignore_index`` is compared with the labels exactly (in a dtype holding both), and a
    NaN ``ignore_index`` matches NaN labels.
    """
    mask = None
    if where is not None:
        where = jnp.asarray(where)
        if where.dtype != jnp.bool_:
            raise TypeError(f"where must be a boolean array; got dtype {where.dtype}.")
        mask = check_broadcast(where, "where", shape, jnp.bool_, target=target)
    if ignore_index is not None:
        if np.ndim(ignore_index) != 0:
            raise ValueError(f"ignore_index must be a scalar; got shape {np.shape(ignore_index)}.")
        if isinstance(ignore_index, (str, bytes)) or not _is_real_or_bool(_dtype_of(ignore_index)):
            raise TypeError(f"ignore_index must be a real number; got {ignore_index!r}.")
        # Compare in a dtype that holds both exactly: never cast ignore_index to the labels'
        # dtype (-1 would become True for bool labels, 255 for uint8; 0.5 would become 0).
        ig = jnp.asarray(ignore_index)
        dt = jnp.promote_types(labels.dtype, ig.dtype)
        lab, ig = labels.astype(dt), ig.astype(dt)
        missing = lab == ig
        if jnp.issubdtype(dt, jnp.floating):
            missing = missing | (jnp.isnan(lab) & jnp.isnan(ig))  # NaN marks missing labels
        keep = ~missing
        mask = keep if mask is None else mask & keep
    return mask


def label_values(labels: jax.Array) -> jax.Array:
    """Integer labels are class indicators: nonzero is the positive class (as for bool).

    Float labels are taken as they are (soft labels in [0, 1]).
    """
    if jnp.issubdtype(labels.dtype, jnp.integer):
        return labels != 0
    return labels


def labels_are_hard(labels: ArrayLike, label_smoothing: Any) -> bool:
    """True when every label is exactly 0 or 1 by its dtype: bool or integer labels and
    no label smoothing (a static 0)."""
    dt = _dtype_of(labels)
    hard_dtype = dt == jnp.bool_ or jnp.issubdtype(dt, jnp.integer)
    no_smoothing = isinstance(label_smoothing, (int, float)) and label_smoothing == 0
    return bool(hard_dtype and no_smoothing)


def smooth_labels(labels: jax.Array, label_smoothing: Any) -> jax.Array:
    """Keras label smoothing: ``y * (1 - eps) + eps / 2`` (no-op for a static 0)."""
    check_scalar_option(label_smoothing, "label_smoothing")
    if isinstance(label_smoothing, (int, float)) and label_smoothing == 0:
        return labels
    eps = jnp.asarray(label_smoothing, labels.dtype)
    return labels * (1 - eps) + eps / 2


def apply_mask(mask: jax.Array | None, *arrays: jax.Array) -> tuple[jax.Array, ...]:
    """Replaces masked-out entries by 0 before the loss, so that NaN or inf there

    (missing labels, padding) never reaches the loss or its gradient.
    """
    if mask is None:
        return arrays
    return tuple(jnp.where(mask, a, jnp.zeros((), a.dtype)) for a in arrays)


# The first stage of :func:`sum_all` on GPU and TPU sums rows of this many elements:
# measured fastest on an H100 (XLA 0.11.2) for 32-bit logits and for 16-bit ones. With
# 512 one warp sums a row (no barrier between a block's warps), which the 16-bit logits'
# kernel, bound by latency, needs; rows of 256 take another, far slower, XLA strategy.
SUM_ROWS = 1024
SUM_ROWS_NARROW = 512


def is_narrow(dtype: Any) -> bool:
    """True for 16-bit logits (bfloat16, float16), whose kernels and sums on GPU and TPU
    are tuned for instruction count rather than memory traffic."""
    return np.dtype(dtype).itemsize <= 2


def sum_rows_for(dtype: Any) -> int:
    """The row length of :func:`sum_all` for a loss whose logits have ``dtype``."""
    return SUM_ROWS_NARROW if is_narrow(dtype) else SUM_ROWS


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def sum_all(x: jax.Array, rows: int = SUM_ROWS) -> jax.Array:
    """``jnp.sum(x)`` over every element, written so that on GPU (and TPU) XLA fuses it
    with the element-wise work that produces ``x`` into one kernel at the memory limit.

    XLA turns one large sum into a row reduction of ``[16384, 16384]`` elements whose
    fused side outputs (the gradient) run at about 81% of copy speed on an H100 for
    float32 logits with one-byte labels. Summing ``[N / rows, rows]`` rows first, then
    the row sums, runs at 96-98% (benchmarks/formulations.py, docs/performance.md). The
    optimization barrier keeps XLA from merging the two sums back into one; the JVP is
    the plain sum, so the barrier never reaches a derivative and the gradient's cotangent
    stays a broadcast scalar. CPU keeps the single sum (XLA:CPU's reduction fusion wants
    it), as does any ``N`` that is not a multiple of ``rows``.
    """
    if x.size == 0 or x.size % rows:
        return jnp.sum(x)
    return jax.lax.platform_dependent(
        x, cpu=jnp.sum, default=functools.partial(sum_by_rows, rows=rows)
    )


def sum_by_rows(x: jax.Array, rows: int = SUM_ROWS) -> jax.Array:
    """``sum(x)`` as the sum of the sums of ``[x.size / rows, rows]`` rows, with an
    optimization barrier between the two (``x.size`` must be a multiple of ``rows``)."""
    partial = jnp.sum(x.reshape(-1, rows), axis=1)
    return jnp.sum(jax.lax.optimization_barrier(partial))


@sum_all.defjvp
def _sum_all_jvp(rows, primals, tangents):
    return sum_all(primals[0], rows), jnp.sum(tangents[0])


def reduce_loss(
    loss: jax.Array,
    *,
    weight: jax.Array | None,
    mask: jax.Array | None,
    axis: tuple[int, ...] | None,
    reduction: str,
    dtype: Any,
) -> jax.Array:
    """Weights, masks and reduces an element-wise loss (in its compute dtype).

    ``"mean"`` divides by the number of selected entries (all entries when there is no
    mask, as PyTorch does, also when ``weight`` is given); ``"weighted_mean"`` divides
    by the sum of the selected weights. A mean over nothing is 0 with a zero gradient.
    The result is cast to ``dtype`` (the logits' dtype) last.
    """
    if weight is not None:
        loss = loss * weight
    if mask is not None:
        loss = jnp.where(mask, loss, jnp.zeros((), loss.dtype))
    if reduction == "none":
        return loss.astype(dtype)
    rows = sum_rows_for(dtype)
    total = sum_all(loss, rows) if axis is None else jnp.sum(loss, axis=axis)
    if reduction == "sum":
        return total.astype(dtype)
    if reduction == "mean" or weight is None:
        if mask is None:
            count = loss.size if axis is None else int(np.prod([loss.shape[a] for a in axis]))
            return (total / max(count, 1)).astype(dtype)  # an empty mean is 0, not NaN
        count = mask.astype(loss.dtype)
    else:  # weighted_mean
        count = weight if mask is None else jnp.where(mask, weight, jnp.zeros((), weight.dtype))
    count = sum_all(count, rows) if axis is None else jnp.sum(count, axis=axis)
    safe = jnp.where(count == 0, jnp.ones((), count.dtype), count)
    return (total / safe).astype(dtype)


class Prepared(NamedTuple):
    """Checked inputs of a loss, ready for an element-wise kernel."""

    x: jax.Array  # logits or probabilities in the compute dtype, masked entries 0
    y: jax.Array  # labels in the compute dtype, masked entries 0, smoothed
    weight: jax.Array | None  # broadcast to the input's shape, compute dtype
    mask: jax.Array | None  # bool, the input's shape; None keeps every entry
    axis: tuple[int, ...] | None
    dtype: np.dtype  # the input's dtype: the loss's output dtype
    compute_dtype: np.dtype


def prepare(
    x: ArrayLike,
    labels: ArrayLike,
    *,
    weight: ArrayLike | None,
    where: ArrayLike | None,
    ignore_index: Any,
    axis: int | Sequence[int] | None,
    reduction: str,
    label_smoothing: Any = 0.0,
    name: str = "logits",
) -> Prepared:
    """Every trace-time check and conversion a loss needs, in one place.

    ``x`` must be real floating point; ``labels`` exactly ``x``'s shape (bool, int or
    float); ``weight`` and ``where`` must broadcast to it without enlarging it; ``axis`` and
    ``reduction`` must be valid. Masked-out entries of ``x`` and ``labels`` become 0 (see
    :func:`apply_mask`) before label smoothing.
    """
    x = check_float_array(x, name)
    shape, dtype = x.shape, x.dtype
    cdt = compute_dtype(dtype)
    labels = check_labels(labels, shape, target=name)
    axis = normalize_axis(axis, x.ndim)
    check_reduction(reduction)
    weight = check_broadcast(weight, "weight", shape, cdt, target=name)
    mask = make_mask(where, labels, ignore_index, shape, target=name)
    xc, y = apply_mask(mask, x.astype(cdt), label_values(labels).astype(cdt))
    y = smooth_labels(y, label_smoothing)
    return Prepared(xc, y, weight, mask, axis, dtype, cdt)


def finish(loss: jax.Array, p: Prepared, reduction: str) -> jax.Array:
    """Applies :func:`reduce_loss` with the weight, mask, axis and dtype of ``p``."""
    return reduce_loss(
        loss, weight=p.weight, mask=p.mask, axis=p.axis, reduction=reduction, dtype=p.dtype
    )
