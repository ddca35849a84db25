"""Binary cross-entropy with sparse positive-index targets, for extreme multi-label.

With 10^4 to 10^6 labels per sample, a dense 0/1 label array costs as much memory
traffic as the logits. Here the positives come as a padded ``[B, K]`` index array and
the dense labels are never formed: the loss is the BCE of every class as a negative
plus a correction gathered at the (deduplicated) positives, and the gradient is the
negatives' gradient with the positives' entries overwritten by one scatter.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxbce import _checks, _core, _prepare, _reduce
from jaxbce import _elementwise as ew
from jaxbce._compile import compiled
from jaxbce._value_checks import in_range


def _unique_positives(idx: jax.Array, num_classes: int):
    """Sorted, deduplicated positive columns of each row.

    Returns ``cols`` (each row's distinct valid indices in ascending order, every other
    slot replaced by a distinct out-of-range column ``num_classes + k``, so a scatter with
    ``mode="drop"`` skips it and all indices are unique), ``safe`` (the same with those
    slots at 0, for gathers) and ``keep`` (the bool mask of the real positives).
    """
    batch, k = idx.shape
    valid = in_range(idx, num_classes)
    s = jnp.sort(jnp.where(valid, idx, num_classes).astype(jnp.int32), axis=1)
    prev = jnp.pad(s, ((0, 0), (1, 0)), constant_values=-1)[:, :k]
    keep = (s != prev) & (s < num_classes)
    slot = num_classes + jnp.arange(k, dtype=jnp.int32)[None, :]
    cols = jnp.where(keep, s, slot)
    safe = jnp.where(keep, s, 0)
    return cols, safe, keep


def _view2d(x: ArrayLike | None, dtype: Any) -> jax.Array | None:
    """An operand broadcastable to ``(B, C)`` as a rank-2 array of shape ``(1|B, 1|C)``."""
    if x is None:
        return None
    x = jnp.asarray(x).astype(dtype)
    return x.reshape((1,) * (2 - x.ndim) + x.shape)


def _full(x2: jax.Array | None, shape: tuple[int, int]) -> jax.Array | None:
    return None if x2 is None else jnp.broadcast_to(x2, shape)


def _at(x2: jax.Array | None, safe: jax.Array) -> jax.Array | None:
    """``x2`` broadcast to ``(B, C)`` and read at ``(row, safe[row, k])``: shape ``(B, K)``."""
    if x2 is None:
        return None
    batch, k = safe.shape
    rows = jnp.arange(batch)[:, None] if x2.shape[0] > 1 else jnp.zeros((batch, 1), jnp.int32)
    cols = safe if x2.shape[1] > 1 else jnp.zeros_like(safe)
    return x2.at[rows, cols].get(mode="promise_in_bounds")


def _scatter(x: jax.Array, cols: jax.Array, values: jax.Array) -> jax.Array:
    """``x`` with ``x[row, cols[row, k]] = values[row, k]``; out-of-range columns dropped."""
    rows = jnp.arange(x.shape[0])[:, None]
    return x.at[rows, cols].set(values, mode="drop", unique_indices=True, indices_are_sorted=True)


def _label(y: jax.Array | None, default: float, shape, dtype) -> jax.Array:
    return jnp.full(shape, default, dtype) if y is None else jnp.broadcast_to(y, shape)


def _bce(z: jax.Array, y: jax.Array | None, pw: jax.Array | None) -> jax.Array:
    """The core BCE at a scalar label ``y``; None stands for 0 (no label smoothing).

    For y = 0 the core's value is ``softplus(z) = max(z, 0) + log1p(exp(-|z|))`` whatever
    ``pw``. Only the value is taken from here (its derivative is :func:`_d_bce`), so it is
    written without a label operand or a select, and with the constant -0.0, which no
    other fusion shares: XLA:CPU's reduction fusion (YNNPACK) then reads the logits
    alone, where a constant label, a select or a shared broadcast constant would be
    materialised as a ``[B, C]`` array first.
    """
    if y is None:
        return jnp.maximum(z, -0.0) + jnp.log1p(jnp.exp(-jnp.abs(z)))
    return _core.bce_with_logits(z, jnp.broadcast_to(y, z.shape), pw)


def _d_bce(z: jax.Array, y: jax.Array | None, pw: jax.Array | None) -> jax.Array:
    """d/dz of :func:`_bce`, element-wise: ``sigmoid(z)`` for y = 0, else the core's rule."""
    if y is None:
        e, _ = ew.log1p_exp_neg_abs(z)
        return ew.sigmoids(z, e, 1 / (1 + e))[0]
    return _core.value_and_dz(_core.bce_with_logits, z, jnp.broadcast_to(y, z.shape), pw)[1]


def _parts(z, safe, pw2):
    """The element-wise pieces shared by loss and gradient (``z`` is already masked)."""
    z_k = jnp.take_along_axis(z, safe, axis=1, mode="promise_in_bounds")
    return _full(pw2, z.shape), z_k, _at(pw2, safe)


def _dense_loss(z, cols, safe, y0, y1, pw2) -> jax.Array:
    """The per-element ``[B, C]`` loss (negatives' BCE, positives' BCE scattered in)."""
    pw, z_k, pw_k = _parts(z, safe, pw2)
    base = _core.bce_with_logits(z, _label(y0, 0.0, z.shape, z.dtype), pw)
    pos = _core.bce_with_logits(z_k, _label(y1, 1.0, z_k.shape, z.dtype), pw_k)
    return _scatter(base, cols, pos)


def _mask_weight(shape, w2, m2):
    w = _full(w2, shape)
    m = None if m2 is None else jnp.broadcast_to(m2, shape)
    return w, m


def _dense_total(axis, z, cols, safe, keep, y0, y1, w2, m2, pw2, scale) -> jax.Array:
    """Reference formulation of :func:`_sparse_total` through the dense per-element loss.

    Used for ``reduction="none"`` and for the derivatives with respect to everything but
    the logits (weights, pos_weight, label smoothing, the mean's normalisation).
    """
    loss = _dense_loss(z, cols, safe, y0, y1, pw2)
    w, m = _mask_weight(z.shape, w2, m2)
    total = _reduce.reduce_loss(
        loss, weight=w, mask=m, axis=axis, reduction="sum", dtype=loss.dtype
    )
    return total * scale


def _reduce_positives(corr: jax.Array, cols: jax.Array, axis, num_classes: int) -> jax.Array:
    """Sums ``[B, K]`` per-positive terms over ``axis`` of the ``[B, C]`` loss."""
    if axis is None or axis == (0, 1):
        return jnp.sum(corr)
    if axis == (1,):
        return jnp.sum(corr, axis=1)
    # axis == (0,): a per-class sum, one small scatter-add into C entries
    return jnp.zeros(num_classes, corr.dtype).at[cols].add(corr, mode="drop")


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _sparse_total(axis, z, cols, safe, keep, y0, y1, w2, m2, pw2, scale) -> jax.Array:
    """``scale * sum_axis(w * mask * loss)`` without forming dense labels or a dense loss.

    Every class is first taken as a negative (label ``y0``): that sum fuses with the read
    of the logits. Each distinct positive then adds ``bce(z, y1) - bce(z, y0)``, gathered
    at ``K`` entries per row.
    """
    pw, z_k, pw_k = _parts(z, safe, pw2)
    w, m = _mask_weight(z.shape, w2, m2)
    base = _bce(z, y0, pw)
    total = _reduce.reduce_loss(
        base, weight=w, mask=m, axis=axis, reduction="sum", dtype=base.dtype
    )
    pos = _core.bce_with_logits(z_k, _label(y1, 1.0, z_k.shape, z.dtype), pw_k)
    neg = _core.bce_with_logits(z_k, _label(y0, 0.0, z_k.shape, z.dtype), pw_k)
    sel = keep if m2 is None else keep & _at(m2, safe)
    corr = pos - neg
    if w2 is not None:
        corr = corr * _at(w2, safe)
    # mask last, so that an inf or NaN weight at a masked-out positive stays out
    corr = jnp.where(sel, corr, jnp.zeros((), corr.dtype))
    return (total + _reduce_positives(corr, cols, axis, z.shape[1])) * scale


# The gradient w.r.t. the logits is the negatives' gradient with the positives' entries
# overwritten (not corrected by an add, which would cancel: sigmoid(z) - 1 rounds to 0 for
# z > 17 where the dense function returns -sigmoid(-z)), with weight, mask and scale
# folded in before the scatter, so that under value_and_grad XLA writes the gradient once
# and patches K entries per row in place. Derivatives w.r.t. the other float inputs go
# through the dense formulation, which costs nothing unless they are differentiated.
@functools.partial(_sparse_total.defjvp, symbolic_zeros=True)
def _sparse_total_jvp(axis, primals, tangents):
    z, cols, safe, keep, y0, y1, w2, m2, pw2, scale = primals
    dz, _, _, _, dy0, dy1, dw2, _, dpw2, dscale = tangents
    out = _sparse_total(axis, *primals)
    terms = []
    if not ew.is_zero(dz):
        pw, z_k, pw_k = _parts(z, safe, pw2)
        w, m = _mask_weight(z.shape, w2, m2)
        s = scale if axis is None or scale.ndim == 0 else jnp.expand_dims(scale, axis)
        g = _d_bce(z, y0, pw) * s
        g_k = _d_bce(z_k, _label(y1, 1.0, z_k.shape, z.dtype), pw_k)
        g_k = g_k * (s if s.ndim == 0 else _at(s, safe))
        if w is not None:
            g, g_k = g * w, g_k * _at(w2, safe)
        if m is not None:
            zero = jnp.zeros((), g.dtype)
            g, g_k = jnp.where(m, g, zero), jnp.where(_at(m2, safe), g_k, zero)
        grad = _scatter(g, cols, g_k)
        terms.append(jnp.sum(grad * dz, axis=axis))
    rest = (y0, y1, w2, pw2, scale)
    d_rest = (dy0, dy1, dw2, dpw2, dscale)
    if not all(ew.is_zero(t) for t in d_rest):
        d_rest = tuple(
            None if p is None else (jnp.zeros_like(p) if ew.is_zero(t) else t)
            for p, t in zip(rest, d_rest, strict=True)
        )

        def dense(y0, y1, w2, pw2, scale):
            return _dense_total(axis, z, cols, safe, keep, y0, y1, w2, m2, pw2, scale)

        terms.append(jax.jvp(dense, rest, d_rest)[1])
    return out, ew.add_tangents(terms, out)


def _check_numpy_indices(args: dict[str, Any]) -> None:
    """Index values given as NumPy arrays or lists, checked before ``jit`` traces them."""
    idx, logits = args["positive_indices"], args["logits"]
    if isinstance(idx, (np.ndarray, list, tuple)) and np.ndim(logits) == 2:
        _checks.check_positive_indices_shape(idx, *np.shape(logits), args["pad"])


@compiled(scalar_options=("label_smoothing", "pad"), precheck=_check_numpy_indices)
def sparse_binary_cross_entropy_with_logits(
    logits: ArrayLike,
    positive_indices: ArrayLike,
    *,
    pad: int = -1,
    weight: ArrayLike | None = None,
    pos_weight: ArrayLike | None = None,
    label_smoothing: float | ArrayLike = 0.0,
    where: ArrayLike | None = None,
    axis: int | Sequence[int] | None = None,
    reduction: str = "mean",
) -> jax.Array:
    r"""Multi-label sigmoid BCE from logits and the indices of the positive classes.

    Equals :func:`binary_cross_entropy_with_logits` on the dense labels
    ``y[b, c] = 1 if c in positive_indices[b] else 0``, without forming them. With
    :math:`y_0 = \varepsilon / 2` and :math:`y_1 = 1 - \varepsilon / 2` the smoothed
    negative and positive labels, :math:`P_b` the distinct positives of row :math:`b`
    and :math:`\ell(z, y) = (1 - y)\operatorname{softplus}(z) + w_+ y
    \operatorname{softplus}(-z)` the core element-wise loss,

    .. math::
        \begin{aligned}
        \sum_{b, c} w_{bc}\, \ell(z_{bc}, y_{bc})
        = {} & \sum_{b, c} w_{bc}\, \ell(z_{bc}, y_0) \\
        & + \sum_b \sum_{c \in P_b} w_{bc} (1 - \varepsilon)
          \left[w_{+,bc} \operatorname{softplus}(-z_{bc})
                - \operatorname{softplus}(z_{bc})\right].
        \end{aligned}

    The first sum fuses with the one read of the logits; the second reads ``K`` entries
    per row. The gradient w.r.t. the logits (a ``jax.custom_jvp`` rule) is the
    negatives' gradient written once, with the positives' entries overwritten (not
    corrected, so it is as accurate as the dense gradient).

    The reduced loss adds each positive's ``softplus(z)`` in the first sum and takes it
    out in the second: an absolute error of about float32 eps times
    :math:`\sum_{c \in P_b} \operatorname{softplus}(z_{bc})` per row, so a well-fitted
    row can read as a tiny (even slightly negative) number, and a positive at
    ``z = +inf`` makes it NaN (the dense function gives 0). ``reduction="none"`` and the
    gradient are as accurate as the dense function.

    ``positive_indices[b]`` lists row ``b``'s positives in any order, padded with
    ``pad``; repeats count once. Indices outside ``[0, C)`` are ignored like ``pad``
    (rejected when given as a NumPy array; use :func:`check_positive_indices` under
    ``checkify`` for traced ones).

    Args:
      logits: float array ``[B, C]`` (float16, bfloat16, float32, float64); arithmetic
        runs in at least float32.
      positive_indices: integer array ``[B, K]`` of class indices in ``[0, C)``, padded
        with ``pad``.
      pad: the padding value, outside ``[0, C)`` (default -1).
      weight: optional per-element weight, broadcastable to ``[B, C]``.
      pos_weight: optional weight of the positive term, broadcastable to ``[B, C]``
        (shape ``[C]``: one per class).
      label_smoothing: ``eps`` in [0, 1]; labels become ``y * (1 - eps) + eps / 2``.
      where: optional bool mask broadcastable to ``[B, C]``; False entries contribute
        nothing and are not counted by ``"mean"``.
      axis: int or tuple of ints of ``[B, C]`` to reduce over; None (default): all.
      reduction: ``"mean"`` (default; divides by the number of selected entries,
        ``B * C`` without a mask), ``"sum"``, ``"none"`` (returns the dense ``[B, C]``
        loss) or ``"weighted_mean"`` (``sum(weight * loss) / sum(weight)``).

    Returns:
      ``[B, C]`` in the logits' dtype for ``"none"``; else a scalar (``axis=None``) or
      ``[B, C]`` without ``axis``, in at least float32.

    Raises:
      TypeError: non-float logits; non-integer ``positive_indices``; non-int ``pad``;
        non-bool ``where``.
      ValueError: logits not of rank 2; ``positive_indices`` not ``[B, K]``; ``pad`` a
        valid class index; out-of-range values in NumPy ``positive_indices``; ``weight``,
        ``pos_weight`` or ``where`` that do not broadcast to ``[B, C]``; unknown
        ``reduction``; ``axis`` out of range; ``label_smoothing`` outside [0, 1].

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import jaxbce
      >>> logits = jnp.array([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
      >>> positives = jnp.array([[0, -1], [2, 1]])  # row 0: class 0; row 1: classes 1, 2
      >>> print(jaxbce.sparse_binary_cross_entropy_with_logits(logits, positives, axis=1))
      [0.47142228 0.95622087]
      >>> print(jax.grad(jaxbce.sparse_binary_cross_entropy_with_logits)(logits, positives))
      [[-0.01986715  0.04482357  0.10374323]
       [ 0.08333334 -0.00790431 -0.1467995 ]]

      The same as :func:`binary_cross_entropy_with_logits` on the dense labels:

      >>> dense = jnp.array([[1, 0, 0], [0, 1, 1]])
      >>> print(jax.grad(jaxbce.binary_cross_entropy_with_logits)(logits, dense))
      [[-0.01986715  0.04482357  0.10374323]
       [ 0.08333334 -0.00790431 -0.1467995 ]]

    References:
      Multi-label classification with many labels (e.g. the Extreme Classification
      Repository, http://manikvarma.org/downloads/XC/XMLRepository.html); PyTorch
      ``BCEWithLogitsLoss`` semantics for every option.
    """
    p = _prepare.prepare(logits, None, weight, where, None, axis, reduction, label_smoothing)
    if p.x.ndim != 2:
        raise ValueError(
            f"logits must have shape (B, C) (rank 2); got shape {p.x.shape}. Reshape "
            "leading axes into B."
        )
    shape, cdt = p.x.shape, p.compute_dtype
    batch, num_classes = shape
    idx = _checks.check_positive_indices_shape(positive_indices, batch, num_classes, pad)
    _checks.check_broadcast(pos_weight, "pos_weight", shape, cdt)
    y0 = y1 = None  # labels 0 and 1: no label operand at all
    if not (isinstance(label_smoothing, (int, float)) and label_smoothing == 0):
        y0, y1 = (_prepare.smooth_labels(jnp.asarray(v, cdt), label_smoothing) for v in (0, 1))

    cols, safe, keep = _unique_positives(idx, num_classes)
    w2, pw2 = _view2d(weight, cdt), _view2d(pos_weight, cdt)
    m2 = None if where is None else _view2d(where, jnp.bool_)

    if reduction == "none" or p.axis == ():
        return _reduce.finish(_dense_loss(p.x, cols, safe, y0, y1, pw2), p, reduction)
    den = 1
    if reduction != "sum":
        den = _reduce.denominator(
            shape, weight=p.weight, mask=p.mask, axis=p.axis, reduction=reduction, dtype=p.dtype
        )
    scale = 1 / jnp.asarray(den, cdt)
    total = _sparse_total(p.axis, p.x, cols, safe, keep, y0, y1, w2, m2, pw2, scale)
    return total.astype(_reduce.output_dtype(p.dtype, reduction))
